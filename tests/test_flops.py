"""count_macs against the HDiT paper's numbers and against closed forms; parameter counts in closed form."""

import pytest
import torch

from hdiffusion import HDiT
from hdiffusion.flops import count_macs


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_hdit_paper_ablation_model_e():
    """HDiT paper, table 1, model E (neighborhood + global attention, 128x128): 31.4 GMAC."""
    model = HDiT(
        in_channels=3, out_channels=3, patch_size=4, widths=[384], middle_width=768, depths=[2], middle_depth=11,
        mapping_width=768, mapping_depth=1, num_classes=1000,
        self_attns=[{"type": "neighborhood", "d_head": 64, "kernel_size": 7}],
        middle_self_attn={"type": "global", "d_head": 64},
    )
    macs = count_macs(model, (3, 128, 128))
    print(f"HDiT ablation model E at 128x128: {macs / 1e9:.2f} GMAC, {n_params(model) / 1e6:.1f}M parameters")
    assert macs == pytest.approx(31.4e9, rel=0.02)


def test_pixel_space_dit_b4():
    """DiT-B/4 in pixel space at 128x128, as the HDiT paper compares it (figure 1): 106 GMAC. One global level of
    width 768 and depth 12; a GEGLU with d_ff = 8w/3 = 2048 costs what DiT's 4w GELU MLP costs."""
    model = HDiT(
        in_channels=3, out_channels=3, patch_size=4, widths=[], middle_width=768, depths=[], middle_depth=12,
        mapping_width=768, mapping_depth=1, middle_d_ff=2048, middle_self_attn={"type": "global", "d_head": 64},
    )
    macs = count_macs(model, (3, 128, 128))
    print(f"pixel-space DiT-B/4 shape at 128x128: {macs / 1e9:.2f} GMAC, {n_params(model) / 1e6:.1f}M parameters")
    assert macs == pytest.approx(106e9, rel=0.01)


def tiny(outer_attn, num_classes=7, mapping_cond_dim=5):
    return HDiT(
        in_channels=3, out_channels=4, patch_size=(2, 4), widths=[16], middle_width=32, depths=[2], middle_depth=3,
        mapping_width=8, mapping_depth=2, d_ffs=[24], middle_d_ff=40, mapping_d_ff=12, self_attns=[outer_attn],
        middle_self_attn={"type": "global", "d_head": 16}, num_classes=num_classes, mapping_cond_dim=mapping_cond_dim,
    )


OUTER_ATTNS = [
    {"type": "neighborhood", "d_head": 8, "kernel_size": 3},
    {"type": "shifted-window", "d_head": 4, "window_size": 4},
    {"type": "global", "d_head": 8},
    {"type": "none"},
]


def keys_per_query(attn, tokens):
    return {"neighborhood": lambda: attn["kernel_size"] ** 2, "shifted-window": lambda: attn["window_size"] ** 2,
            "global": lambda: tokens, "none": lambda: 0}[attn["type"]]()


@pytest.mark.parametrize("outer_attn", OUTER_ATTNS, ids=lambda a: a["type"])
def test_tiny_model_macs_in_closed_form(outer_attn):
    # 16x32 image, patch 2x4: an 8x8 grid (T0 = 64 tokens) of width w0 = 16, then 4x4 (T1 = 16) of width w1 = 32.
    c, o, p, w0, w1, f0, f1, m, fm, q = 3, 4, 2 * 4, 16, 32, 24, 40, 8, 12, 5
    t0, t1 = 64, 16
    layer_linear = lambda w, f: 4 * w * w + w * 2 * f + f * w  # qkv, out, GEGLU up (2f outputs), down  # noqa: E731
    ff_linear = lambda w, f: w * 2 * f + f * w  # noqa: E731
    outer_layer = (layer_linear if outer_attn["type"] != "none" else ff_linear)(w0, f0)
    n_norms_outer = 2 if outer_attn["type"] != "none" else 1  # AdaRMSNorms per layer, one row per image each

    expected = (
        t0 * c * p * w0  # patch in
        + 2 * m * m + q * m + 2 * (m * 2 * fm + fm * m)  # time and aug in-projections, mapping_cond, mapping net
        + 4 * (t0 * outer_layer + n_norms_outer * m * w0 + 2 * t0 * keys_per_query(outer_attn, t0) * w0)
        + 3 * (t1 * layer_linear(w1, f1) + 2 * m * w1 + 2 * t1 * t1 * w1)
        + t1 * 4 * w0 * w1 + t1 * w1 * 4 * w0  # 2x2 merge and split
        + t0 * w0 * o * p  # patch out
    )
    assert count_macs(tiny(outer_attn), (3, 16, 32)) == expected


def test_neighborhood_counted_by_kernel_whatever_the_backend():
    model = tiny(OUTER_ATTNS[0])
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "reference"  # dense masked attention if it ran; the count must not change
    assert count_macs(model, (3, 16, 32)) == count_macs(tiny(OUTER_ATTNS[0]), (3, 16, 32))


def test_count_is_cheap_at_1024():
    """Runs on the meta device: a 1024x1024 model (65536 tokens at the first level) costs no real compute."""
    model = HDiT(3, 3, 4, [32, 64], 128, [1, 1], 1, 32, 1, self_attns=[{"type": "neighborhood", "d_head": 32,
                 "kernel_size": 7}] * 2, middle_self_attn={"type": "global", "d_head": 32})
    assert count_macs(model, (3, 1024, 1024)) > 0
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


@pytest.mark.parametrize("outer_attn", OUTER_ATTNS, ids=lambda a: a["type"])
def test_tiny_model_parameters_in_closed_form(outer_attn):
    c, o, p, w0, w1, f0, f1, m, fm, q, k = 3, 4, 8, 16, 32, 24, 40, 8, 12, 5, 7
    heads = lambda w, attn: w // attn["d_head"]  # noqa: E731
    ff = lambda w, f: m * w + w * 2 * f + f * w  # AdaRMSNorm, GEGLU up, down  # noqa: E731
    attn = lambda w, spec: m * w + 3 * w * w + heads(w, spec) + w * w  # AdaRMSNorm, qkv, scale, out  # noqa: E731
    outer_layer = ff(w0, f0) + (attn(w0, outer_attn) if outer_attn["type"] != "none" else 0)
    middle_layer = ff(w1, f1) + attn(w1, {"d_head": 16})
    expected = (
        c * p * w0  # patch in
        + 2 * m * m + (k + 1) * m + q * m  # time and aug in-projections, class embedding with null class, mapping_cond
        + 2 * m + 2 * (m + m * 2 * fm + fm * m)  # mapping network: in/out norms, two blocks
        + 4 * outer_layer + 3 * middle_layer
        + 4 * w0 * w1 + w1 * 4 * w0 + 1  # merge, split and its lerp factor
        + w0 + w0 * o * p  # out norm, patch out
    )
    assert n_params(tiny(outer_attn)) == expected
    assert torch.is_tensor(tiny(outer_attn).time_emb.weight)  # Fourier weights are buffers, not parameters


@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 2), (8, 1)])
def test_conv2d_macs_in_closed_form(groups, stride):
    """A conv costs (in_channels / groups) * kh * kw MACs per output element."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 16, 3, stride=stride, padding=1, groups=groups)

        def forward(self, x, c_noise):
            return self.conv(x)

    out_side = 12 // stride
    assert count_macs(Net(), (8, 12, 12)) == 16 * out_side**2 * (8 // groups) * 3 * 3
