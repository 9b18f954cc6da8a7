"""Model architectures, built from the `model` section of a config by make_model.

Each architecture registers one builder, keyed by model_config["type"]. Builders import their module when called,
so that importing hdiffusion.models loads no architecture and no optional attention backend.
"""

from ..errors import UsageError


def _image_transformer_v2(model_config, num_classes):
    from .hdit import HDiT

    # k-diffusion lists levels outermost first with the middle level last; HDiT takes the middle level apart.
    self_attns = [dict(spec) for spec in model_config["self_attns"]]
    model = HDiT(
        in_channels=model_config["input_channels"],
        out_channels=model_config["input_channels"],
        patch_size=model_config["patch_size"],
        widths=model_config["widths"][:-1],
        middle_width=model_config["widths"][-1],
        depths=model_config["depths"][:-1],
        middle_depth=model_config["depths"][-1],
        mapping_width=model_config["mapping_width"],
        mapping_depth=model_config["mapping_depth"],
        d_ffs=model_config["d_ffs"][:-1],
        middle_d_ff=model_config["d_ffs"][-1],
        self_attns=self_attns[:-1],
        middle_self_attn=self_attns[-1],
        dropout_rates=model_config["dropout_rate"][:-1],
        middle_dropout_rate=model_config["dropout_rate"][-1],
        mapping_d_ff=model_config["mapping_d_ff"],
        mapping_dropout_rate=model_config["mapping_dropout_rate"],
        num_classes=num_classes,
        mapping_cond_dim=model_config["mapping_cond_dim"],
        checkpointing=model_config.get("checkpointing", False),
    )
    model.check_input_size(*model_config["input_size"])  # fail at startup, not at the first training step
    return model


def _dit(model_config, num_classes):
    from .dit import DiT

    return DiT(
        in_channels=model_config["input_channels"],
        input_size=model_config["input_size"],
        patch_size=model_config["patch_size"],
        depth=model_config["depth"],
        width=model_config["width"],
        num_heads=model_config["num_heads"],
        mlp_ratio=model_config["mlp_ratio"],
        pos_emb=model_config["pos_emb"],
        dropout_rate=model_config["dropout_rate"],
        num_classes=num_classes,
        mapping_cond_dim=model_config["mapping_cond_dim"],
        checkpointing=model_config.get("checkpointing", False),
    )


def _diffit(model_config, num_classes):
    from .diffit import DiffiT

    model = DiffiT(
        in_channels=model_config["input_channels"],
        out_channels=model_config["input_channels"],
        widths=model_config["widths"],
        depths=model_config["depths"],
        num_heads=model_config["num_heads"],
        window_sizes=model_config["window_size"],
        time_width=model_config["time_width"],
        mlp_ratio=model_config["mlp_ratio"],
        num_groups=model_config["num_groups"],
        dropout_rates=model_config["dropout_rate"],
        num_classes=num_classes,
        checkpointing=model_config.get("checkpointing", False),
    )
    model.check_input_size(*model_config["input_size"])  # fail at startup, not at the first training step
    return model


MODELS = {
    "image_transformer_v2": _image_transformer_v2,
    "dit": _dit,
    "diffit": _diffit,
}


def make_model(model_config, num_classes):
    """The nn.Module described by a validated, fully defaulted `model` config section.

    num_classes is the number of real classes (0: unconditional); class-conditional models get one more
    embedding, index num_classes, for the null class of classifier-free guidance.
    """
    model_type = model_config["type"]
    if model_type not in MODELS:
        raise UsageError(f"model.type: unknown model type {model_type!r}; known types: {', '.join(MODELS)}")
    try:
        return MODELS[model_type](model_config, num_classes)
    except ValueError as error:  # the architecture rejects the configured shapes: a config error
        raise UsageError(f"model: {error}") from error


def blocks(model):
    """The model's repeated blocks (transformer layers, DiT blocks, DiffiT residual cells), outermost first: the
    units of regional compilation and of FSDP sharding."""
    from .diffit import DiffiTResBlock
    from .dit import DiTBlock
    from .hdit import TransformerLayer

    return [module for module in model.modules() if isinstance(module, (TransformerLayer, DiTBlock, DiffiTResBlock))]


def compile_blocks(model):
    """Regional compilation: torch.compile each block in place, not the whole model.

    Identical layers share one compiled graph, so compile time grows with the number of distinct layer shapes
    rather than with depth, and the code between layers stays eager. Each distinct shape is one more entry in
    dynamo's cache of the shared forward; the limit is raised so that deep hierarchies do not fall back to eager.
    """
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    for module in blocks(model):
        module.compile(dynamic=False)
    return model
