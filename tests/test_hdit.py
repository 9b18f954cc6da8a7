"""HDiT on CPU with tiny models: shapes, zero init, attention kinds, parameter groups, autocast, checkpointing."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from hdiffusion import HDiT
from hdiffusion.errors import UsageError
from hdiffusion.models import compile_blocks, make_model
from hdiffusion.models.attention import ShiftedWindowAttention
from hdiffusion.models.layers import AdaRMSNorm

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NEIGHBORHOOD = {"type": "neighborhood", "d_head": 8, "kernel_size": 3}
GLOBAL = {"type": "global", "d_head": 8}


def tiny_hdit(**overrides):
    """Patch 2, one outer level of width 16 and a middle level of width 32: 16x16 images are 8x8 then 4x4 tokens."""
    kwargs = dict(
        in_channels=3, out_channels=3, patch_size=2, widths=[16], middle_width=32, depths=[1], middle_depth=1,
        mapping_width=16, mapping_depth=1, self_attns=[NEIGHBORHOOD], middle_self_attn=GLOBAL,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return HDiT(**kwargs)


def randomize_zero_init(model, std=0.1):
    """Give the zero-initialised projections random weights, so that every block changes the output."""
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0.0, std)
    return model


def inputs(n=2, h=16, w=16, channels=3, num_classes=0, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, h, w, generator=generator)
    c_noise = torch.randn(n, generator=generator)
    cond = {"class_cond": torch.randint(0, num_classes + 1, (n,), generator=generator)} if num_classes else {}
    return x, c_noise, cond


@pytest.mark.parametrize("h, w", [(16, 16), (16, 24), (24, 16)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape(h, w, num_classes):
    model = randomize_zero_init(tiny_hdit(num_classes=num_classes, out_channels=5))
    x, c_noise, cond = inputs(h=h, w=w, num_classes=num_classes)
    with torch.no_grad():
        y = model(x, c_noise, **cond)
    assert y.shape == (2, 5, h, w)
    assert torch.isfinite(y).all()


def test_fresh_model_outputs_zero_until_trained():
    model = tiny_hdit(num_classes=10)
    x, c_noise, cond = inputs(num_classes=10)
    assert torch.equal(model(x, c_noise, **cond), torch.zeros_like(x))

    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-3, weight_decay=0.01))
    loss = (model(x, c_noise, **cond) - torch.randn_like(x)).square().mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert model(x, c_noise, **cond).abs().max() > 0


@pytest.mark.parametrize("self_attn", [
    NEIGHBORHOOD,
    GLOBAL,
    {"type": "shifted-window", "d_head": 8, "window_size": 4},
    {"type": "none"},
])
def test_every_attention_kind_runs_forward_and_backward(self_attn):
    model = randomize_zero_init(tiny_hdit(self_attns=[self_attn], depths=[2], middle_self_attn=self_attn))
    x, c_noise, _ = inputs()
    model(x, c_noise).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.patch_in.proj.weight.grad.abs().sum() > 0
    if self_attn["type"] != "none":
        assert model.down_levels[0][0].self_attn.qkv_proj.weight.grad.abs().sum() > 0
    else:
        assert model.down_levels[0][0].self_attn is None


@pytest.mark.parametrize("self_attn", [
    dict(NEIGHBORHOOD, backend="flex"),  # the CUDA default: its block mask must be built before the layer runs
    dict(NEIGHBORHOOD, backend="reference"),
    GLOBAL,
    {"type": "shifted-window", "d_head": 8, "window_size": 4},
])
def test_compiled_layers_have_no_graph_breaks(self_attn, monkeypatch):
    """Regional compilation must compile each layer whole: a graph break splits it into several graphs, each with
    its own launches and guard checks on the host at every step. (dynamo's graphs run uncompiled here; inference
    only, as FlexAttention has no backward on CPU.)"""
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend=keep_graph, **kw))
    eager = randomize_zero_init(tiny_hdit(self_attns=[self_attn], middle_self_attn=GLOBAL))
    model = compile_blocks(copy.deepcopy(eager))
    x, c_noise, _ = inputs()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = eager(x, c_noise)
        first = model(x, c_noise)
        graphs_after_first = len(graphs)
        second = model(x, c_noise)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= graphs_after_first <= 3 and len(graphs) == graphs_after_first  # at most one per layer, once
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


def test_shifted_windows_alternate_across_down_and_up_halves():
    window = {"type": "shifted-window", "d_head": 8, "window_size": 4}
    model = tiny_hdit(self_attns=[window], depths=[1], middle_self_attn=window, middle_depth=2)
    shifts = lambda level: [layer.self_attn.attention.shift for layer in level]  # noqa: E731
    assert shifts(model.down_levels[0]) == [0]
    assert shifts(model.up_levels[0]) == [2]  # layer index 1: the up half continues from the down half
    assert shifts(model.mid_level) == [0, 2]
    assert all(isinstance(layer.self_attn.attention, ShiftedWindowAttention) for layer in model.mid_level)


def test_hdit_package_keywords():
    model = HDiT(in_channels=3, out_channels=3, patch_size=[4, 4], widths=[128, 256], middle_width=512,
                 depths=[2, 2], middle_depth=4, mapping_width=256, mapping_depth=2)
    assert model.input_channels == 3 and model.patch_size == (4, 4) and model.num_classes == 0
    x, c_noise, _ = inputs(n=1, h=64, w=64)  # 16x16, 8x8 and 4x4 tokens; kernel 7 fits the two outer levels
    with torch.no_grad():
        assert model(x, c_noise).shape == (1, 3, 64, 64)


def test_param_groups_partition_the_parameters():
    model = tiny_hdit(num_classes=10, mapping_cond_dim=4)
    groups = model.param_groups(lr=1e-3, weight_decay=0.05, mapping_lr_scale=0.25)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert all(set(group) == {"params", "lr", "weight_decay"} for group in groups)

    def group_of(param):
        (group,) = [g for g in groups if any(p is param for p in g["params"])]
        return group["lr"], group["weight_decay"]

    block = model.down_levels[0][0]
    assert group_of(model.patch_in.proj.weight) == (1e-3, 0.05)
    assert group_of(block.self_attn.qkv_proj.weight) == (1e-3, 0.05)
    assert group_of(model.splits[0].fac) == (1e-3, 0.0)
    assert group_of(block.self_attn.scale) == (1e-3, 0.0)
    assert group_of(model.out_norm.scale) == (1e-3, 0.0)
    assert group_of(model.class_emb.weight) == (1e-3, 0.0)
    assert group_of(model.time_in_proj.weight) == (1e-3, 0.0)  # conditioning in-projections: no decay
    assert group_of(model.mapping_cond_in_proj.weight) == (1e-3, 0.0)
    assert group_of(block.ff.norm.linear.weight) == (0.25e-3, 0.05)  # AdaRMSNorm: mapping, decayed
    assert group_of(model.mapping.blocks[0].up_proj.weight) == (0.25e-3, 0.05)
    assert group_of(model.mapping.in_norm.scale) == (0.25e-3, 0.0)
    assert all(isinstance(m, AdaRMSNorm) for m in [block.ff.norm, block.self_attn.norm])
    torch.optim.AdamW(groups)  # a valid optimizer configuration


def test_bf16_autocast_is_close_to_fp32():
    model = randomize_zero_init(tiny_hdit(num_classes=10))
    x, c_noise, cond = inputs(num_classes=10)
    with torch.no_grad():
        expected = model(x, c_noise, **cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(x, c_noise, **cond)
    assert actual.dtype == torch.bfloat16
    relative_error = (actual.float() - expected).norm() / expected.norm()
    assert relative_error < 0.05, relative_error


@pytest.mark.parametrize("self_attn", [NEIGHBORHOOD, {"type": "shifted-window", "d_head": 8, "window_size": 4}])
def test_checkpointing_gives_the_same_gradients(self_attn):
    model = randomize_zero_init(tiny_hdit(self_attns=[self_attn], depths=[2], num_classes=10))
    checkpointed = copy.deepcopy(model)
    checkpointed.checkpointing = True
    x, c_noise, cond = inputs(num_classes=10)
    for m in (model, checkpointed):
        m(x, c_noise, **cond).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_conditioning_errors_are_clear():
    model = tiny_hdit(num_classes=10, mapping_cond_dim=4)
    x, c_noise, cond = inputs(num_classes=10)
    mapping_cond = torch.randn(2, 4)
    with pytest.raises(ValueError, match="class_cond is required"):
        model(x, c_noise, mapping_cond=mapping_cond)
    with pytest.raises(ValueError, match="mapping_cond"):
        model(x, c_noise, **cond)
    with pytest.raises(ValueError, match="c_noise"):
        model(x, c_noise[:1], mapping_cond=mapping_cond, **cond)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_hdit()(x, c_noise, **cond)
    with pytest.raises(ValueError, match="kernel_size 3"):
        tiny_hdit(self_attns=[NEIGHBORHOOD], middle_self_attn=NEIGHBORHOOD)(*inputs(h=8, w=8)[:2])  # 2x2 middle
    with pytest.raises(ValueError, match="patch size"):
        tiny_hdit()(*inputs(h=15, w=16)[:2])
    with pytest.raises(ValueError, match="d_head"):
        tiny_hdit(middle_self_attn={"type": "global", "d_head": 12})


def model_config(**overrides):
    config = {
        "type": "image_transformer_v2", "input_channels": 3, "input_size": [16, 16], "patch_size": [2, 2],
        "widths": [16, 32], "depths": [1, 1], "d_ffs": [48, 96], "self_attns": [NEIGHBORHOOD, GLOBAL],
        "dropout_rate": [0.0, 0.1], "mapping_width": 16, "mapping_depth": 1, "mapping_d_ff": 48,
        "mapping_cond_dim": 0, "mapping_dropout_rate": 0.0, "sigma_data": 0.5, "loss_weighting": "soft-min-snr",
    }
    config.update(overrides)
    return config


def test_make_model_from_config():
    model = make_model(model_config(checkpointing=True), num_classes=10)
    assert isinstance(model, HDiT)
    assert model.level_widths == [16, 32] and model.level_d_ffs == [48, 96] and model.level_dropout_rates == [0.0, 0.1]
    assert model.checkpointing and model.class_emb.num_embeddings == 11 and model.out_channels == 3
    assert not make_model(model_config(), num_classes=0).checkpointing
    x, c_noise, cond = inputs(num_classes=10)
    assert model(x, c_noise, **cond).shape == x.shape
    with pytest.raises(UsageError, match="kernel_size 3"):
        make_model(model_config(input_size=[8, 8], self_attns=[NEIGHBORHOOD, NEIGHBORHOOD]), num_classes=0)
    with pytest.raises(UsageError, match="model.type"):
        make_model(model_config(type="unet"), num_classes=0)
