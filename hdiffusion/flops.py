"""Multiply-accumulates of one forward pass per image, in the convention of the DiT and HDiT papers.

Counted: every nn.Linear, in_features * out_features per row it maps (GEGLU's up projection has 2 * d_ff outputs);
every nn.Conv2d, in_channels / groups * kernel area per output element;
every attention op (hdiffusion.models.attention.GridAttention), QK^T plus AV = 2 * queries * keys per query * d_head
per head, where a query sees all tokens (global), kernel_size^2 keys (neighborhood) or window_size^2 keys (shifted
window). Not counted: norms, softmax, RoPE, Fourier features, embeddings lookups, elementwise ops.

The count follows what the architecture computes, not what a backend runs: neighborhood attention counts
kernel_size^2 keys per query even where the dense masked reference would compute all of them. The forward runs on
the meta device, with meta stand-ins for the parameters, so counting a 1024x1024 model costs no compute or memory.
"""

import torch
from torch import nn

from .models.attention import GridAttention


def count_macs(model, input_shape):
    """MACs of model(x, c_noise, ...) for one image x of shape input_shape = (C, H, W)."""
    macs = 0

    def count_linear(module, args, output):
        nonlocal macs
        rows = args[0].numel() // module.weight.shape[1]
        macs += rows * module.weight.numel()

    def count_conv(module, args, output):
        nonlocal macs
        macs += output.numel() * module.weight[0].numel()  # weight [out, in / groups, kh, kw]

    def count_attention(module, args, output):
        nonlocal macs
        q = args[0]  # [1, H, W, heads, d_head]
        _, h, w, heads, d_head = q.shape
        macs += 2 * h * w * module.keys_per_query(h, w) * heads * d_head

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(count_linear))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(count_conv))
        elif isinstance(module, GridAttention):
            hooks.append(module.register_forward_hook(count_attention))

    meta = {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.zeros(1, *input_shape, device="meta")
    c_noise = torch.zeros(1, device="meta")
    cond = {}
    if getattr(model, "num_classes", 0):
        cond["class_cond"] = torch.zeros(1, dtype=torch.long, device="meta")
    if getattr(model, "mapping_cond_dim", 0):
        cond["mapping_cond"] = torch.zeros(1, model.mapping_cond_dim, device="meta")
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta, (x, c_noise), cond)
    finally:
        for hook in hooks:
            hook.remove()
    return macs
