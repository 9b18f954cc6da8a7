"""DiffiT on CPU, tiny models: TMSA against the paper's equations, windows, conditioning, sizes, config, training."""

import copy
import json
import math

import pytest
import torch

from conftest import run_script
from hdiffusion import DiffiT
from hdiffusion.config import ConfigError, validate_config
from hdiffusion.flops import count_macs
from hdiffusion.models import make_model
from hdiffusion.models.attention import shifted_window_attention
from hdiffusion.models.diffit import TMSA


def tiny_diffit(**overrides):
    """Two stages, widths 16 and 32: 8x8 images are 8x8 then 4x4 feature maps; 4x4 windows, so stage 0 has four
    windows and stage 1 attends globally."""
    kwargs = dict(in_channels=3, out_channels=3, widths=[16, 32], depths=[1, 1], num_heads=[2, 4],
                  window_sizes=[4, 4], time_width=16, mlp_ratio=2.0, num_groups=4, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return DiffiT(**kwargs)


def randomize(module, std=0.1):
    """Random values for every parameter, the zero-initialised projections and position biases included."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


# --- TMSA: the paper's equations ------------------------------------------------------------------------------


def naive_window_logits_bias(table, window_size):
    """B[h, i, j] = table[offset(i, j), h], built with loops from the definition of a relative position."""
    w = window_size
    positions = [(y, x) for y in range(w) for x in range(w)]
    bias = torch.empty(table.shape[1], w * w, w * w)
    for i, (yi, xi) in enumerate(positions):
        for j, (yj, xj) in enumerate(positions):
            bias[:, i, j] = table[(yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)]
    return bias


def naive_tmsa(tmsa, x, time_token):
    """Equations 3-6 with explicit matrices, one window and one head at a time."""
    n, h, w, c = x.shape
    heads, d, ws = tmsa.num_heads, tmsa.d_head, tmsa.position_bias.window_size
    w_s, b_s = tmsa.qkv_spatial.weight, tmsa.qkv_spatial.bias
    w_t = tmsa.qkv_time.weight
    W_qs, W_ks, W_vs = w_s[:c].T, w_s[c:2 * c].T, w_s[2 * c:].T
    W_qt, W_kt, W_vt = w_t[:c].T, w_t[c:2 * c].T, w_t[2 * c:].T
    b_q, b_k, b_v = b_s[:c], b_s[c:2 * c], b_s[2 * c:]
    B = naive_window_logits_bias(tmsa.position_bias.table, ws)
    out = torch.empty(n, h, w, c)
    for sample in range(n):
        x_t = time_token[sample]
        for wy in range(0, h, ws):
            for wx in range(0, w, ws):
                x_s = x[sample, wy:wy + ws, wx:wx + ws].reshape(ws * ws, c)  # row-major within the window
                q_s = x_s @ W_qs + b_q + x_t @ W_qt
                k_s = x_s @ W_ks + b_k + x_t @ W_kt
                v_s = x_s @ W_vs + b_v + x_t @ W_vt
                head_outputs = []
                for head in range(heads):
                    cols = slice(head * d, (head + 1) * d)
                    logits = q_s[:, cols] @ k_s[:, cols].T / math.sqrt(d) + B[head]
                    head_outputs.append(torch.softmax(logits, dim=-1) @ v_s[:, cols])
                y = torch.cat(head_outputs, dim=-1) @ tmsa.out_proj.weight.T + tmsa.out_proj.bias
                out[sample, wy:wy + ws, wx:wx + ws] = y.view(ws, ws, c)
    return out


@pytest.mark.parametrize("size, window_size", [(8, 4), (4, 4), (6, 2)])
def test_tmsa_equals_the_papers_equations(size, window_size):
    tmsa = randomize(TMSA(width=12, time_width=6, num_heads=3, window_size=window_size))
    x, time_token = torch.randn(2, size, size, 12), torch.randn(2, 6)
    torch.testing.assert_close(tmsa(x, time_token), naive_tmsa(tmsa, x, time_token), atol=1e-5, rtol=1e-5)


def attention_pattern(tmsa, x, time_token):
    """Softmax(Q K^T / sqrt(d) + B) of a single window that covers x: [N, heads, tokens, tokens]."""
    q, k, _ = (t.flatten(1, 2).transpose(1, 2) for t in tmsa.qkv(x, time_token))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(tmsa.d_head) + tmsa.position_bias(), dim=-1)


def test_attention_pattern_depends_on_the_time_token():
    tmsa = randomize(TMSA(width=8, time_width=4, num_heads=2, window_size=4))
    x = torch.randn(1, 4, 4, 8)
    early, late = torch.randn(1, 4), torch.randn(1, 4)
    assert (attention_pattern(tmsa, x, early) - attention_pattern(tmsa, x, late)).abs().max() > 1e-2

    # The time term of the keys adds one vector to every key of a sample: the softmax cancels it.
    with torch.no_grad():
        tmsa.qkv_time.weight[:8].zero_()  # W_qt = 0, W_kt and W_vt kept
    torch.testing.assert_close(attention_pattern(tmsa, x, early), attention_pattern(tmsa, x, late))

    # Time-independent attention (W_qt = W_kt = W_vt = 0, plain MSA): the time token changes nothing at all.
    with torch.no_grad():
        tmsa.qkv_time.weight.zero_()
    torch.testing.assert_close(tmsa(x, early), tmsa(x, late))


# --- Window attention with a bias --------------------------------------------------------------------------------


def naive_window_attention(q, k, v, window_size, shift, bias):
    """Per window of the rolled grid, tokens attend to the tokens of their window on their side of the seam."""
    n, h, w, heads, d = q.shape
    q, k, v = (torch.roll(t, (shift, shift), (1, 2)) for t in (q, k, v))
    region = 2 * (torch.arange(h) < shift)[:, None] + (torch.arange(w) < shift)[None, :]
    out = torch.empty_like(q)
    for wy in range(0, h, window_size):
        for wx in range(0, w, window_size):
            window = (slice(None), slice(wy, wy + window_size), slice(wx, wx + window_size))
            qw, kw, vw = (t[window].flatten(1, 2).transpose(1, 2) for t in (q, k, v))  # [N, heads, ws^2, d]
            logits = qw @ kw.transpose(-1, -2) + bias
            r = region[wy:wy + window_size, wx:wx + window_size].flatten()
            logits = logits.masked_fill(r[:, None] != r[None, :], float("-inf"))
            out[window] = (torch.softmax(logits, -1) @ vw).transpose(1, 2).unflatten(1, (window_size, window_size))
    return torch.roll(out, (-shift, -shift), (1, 2))


@pytest.mark.parametrize("h, w, window_size, shift", [(8, 8, 4, 0), (8, 12, 4, 0), (8, 8, 4, 2), (4, 4, 4, 0)])
def test_window_attention_with_bias_equals_naive(h, w, window_size, shift):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, w, 3, 8) for _ in range(3))
    bias = torch.randn(3, window_size**2, window_size**2)
    expected = naive_window_attention(q, k, v, window_size, shift, bias)
    torch.testing.assert_close(shifted_window_attention(q, k, v, window_size, shift, bias=bias), expected,
                               atol=1e-5, rtol=1e-5)
    # A zero bias is no bias.
    torch.testing.assert_close(shifted_window_attention(q, k, v, window_size, shift, bias=bias * 0),
                               shifted_window_attention(q, k, v, window_size, shift), atol=1e-6, rtol=1e-6)


# --- The model -------------------------------------------------------------------------------------------------


def test_output_shape_zero_init_and_class_conditioning():
    model = tiny_diffit()
    x, c_noise = torch.randn(3, 3, 8, 8), torch.randn(3)
    labels = torch.tensor([0, 4, 10])  # 10: the null class
    assert torch.equal(model(x, c_noise, class_cond=labels), torch.zeros(3, 3, 8, 8))  # the head starts at zero
    randomize(model)
    out = model(x, c_noise, class_cond=labels)
    assert out.shape == (3, 3, 8, 8) and out.isfinite().all()
    other = model(x, c_noise, class_cond=torch.tensor([1, 4, 3]))
    assert not torch.allclose(out[0], other[0]) and torch.equal(out[1], other[1])  # per-sample conditioning
    assert not torch.allclose(out[2], other[2])  # the null class has its own embedding
    assert not torch.allclose(out, model(x, c_noise + 1, class_cond=labels))  # and the noise level matters
    assert not torch.allclose(out, model(x, c_noise, aug_cond=torch.randn(3, 9), class_cond=labels))


def test_bad_calls_are_rejected():
    model, x, c_noise = tiny_diffit(), torch.randn(1, 3, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="class_cond is required"):
        model(x, c_noise)
    with pytest.raises(ValueError, match="mapping_cond"):
        model(x, c_noise, class_cond=torch.zeros(1, dtype=torch.long), mapping_cond=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_diffit(num_classes=0)(x, c_noise, class_cond=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.randn(1, 3, 9, 9), c_noise, class_cond=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="window size 4 does not tile"):
        model(torch.randn(1, 3, 12, 12), c_noise, class_cond=torch.zeros(1, dtype=torch.long))


def expected_params(in_ch, widths, depths, heads, windows, time_width, hidden_ratio, num_classes):
    """Parameters of DiffiT, counted from the architecture's description."""
    t = time_width
    embedding = 2 * t * t + (num_classes + 1) * t + 2 * (t * t + t)  # two in-projections, classes, time MLP

    def cell(c, h, w):
        m = int(hidden_ratio * c)
        return (2 * c + 9 * c * c + c                        # GroupNorm, conv3x3
                + 2 * c + 3 * c * c + 3 * c + 3 * c * t      # LayerNorm, W_{q,k,v}s with bias, W_{q,k,v}t
                + (2 * w - 1) ** 2 * h + c * c + c           # relative position bias, output projection
                + 2 * c + c * m + m + m * c + c)             # LayerNorm, MLP

    cells = sum(2 * d * cell(c, h, w) for c, d, h, w in zip(widths, depths, heads, windows))
    between = sum(2 * (9 * a * b) + b + a + 2 * a * a + a for a, b in zip(widths, widths[1:]))  # down, up, merge
    ends = 9 * in_ch * widths[0] + widths[0] + 2 * widths[0] + 9 * widths[0] * in_ch + in_ch  # tokenizer, head
    return embedding + cells + between + ends


def expected_macs(in_ch, size, widths, depths, windows, time_width, hidden_ratio):
    """Forward multiply-accumulates per image, in the convention of hdiffusion.flops."""
    t = time_width
    macs = 2 * t * t + 2 * t * t  # in-projections, time MLP
    for i, (c, d, w) in enumerate(zip(widths, depths, windows)):
        tokens = (size >> i) ** 2
        m = int(hidden_ratio * c)
        per_cell = (tokens * 9 * c * c + 3 * c * t                   # conv3x3, time projections
                    + tokens * (3 * c * c + c * c + 2 * c * m)        # q/k/v, output projection, MLP
                    + 2 * tokens * w * w * c)                         # Q K^T and A V over w^2 keys per query
        macs += 2 * d * per_cell
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        high, low = (size >> i) ** 2, (size >> (i + 1)) ** 2
        macs += low * 9 * a * b + high * 9 * b * a + high * 2 * a * a  # down, up, skip merge
    return macs + size * size * 9 * in_ch * widths[0] * 2  # tokenizer and head


def test_parameter_count_and_macs_in_closed_form():
    model = tiny_diffit(depths=[2, 1], window_sizes=[2, 4])
    assert sum(p.numel() for p in model.parameters()) == expected_params(
        3, [16, 32], [2, 1], [2, 4], [2, 4], 16, 2.0, 10)
    assert count_macs(model, (3, 8, 8)) == expected_macs(3, 8, [16, 32], [2, 1], [2, 4], 16, 2.0)


def test_cifar10_config_size():
    config = validate_config(json.loads(open("configs/cifar10_diffit.json").read()), "cifar10_diffit.json")
    m = config["model"]
    model = make_model(m, 10)
    assert m["window_size"] == [8, 8, 8, 4]  # 8x8 windows at 32x32 and 16x16, global attention at 8x8 and 4x4
    args = (3, m["widths"], m["depths"], m["num_heads"], m["window_size"], m["time_width"], m["mlp_ratio"])
    assert sum(p.numel() for p in model.parameters()) == expected_params(*args, 10) == 21_863_475
    assert count_macs(model, (3, 32, 32)) == expected_macs(3, 32, m["widths"], m["depths"], m["window_size"],
                                                           m["time_width"], m["mlp_ratio"])


def test_position_index_is_not_a_weight():
    model = tiny_diffit()
    assert not any("index" in name for name in model.state_dict())
    copy_ = tiny_diffit()
    copy_.load_state_dict(randomize(model).state_dict())
    x, c_noise, labels = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([1, 2])
    assert torch.equal(copy_(x, c_noise, class_cond=labels), model(x, c_noise, class_cond=labels))


def test_param_groups_cover_every_parameter_once():
    model = tiny_diffit()
    groups = model.param_groups(lr=1.0, weight_decay=0.1, mapping_lr_scale=0.5)
    ids = [id(p) for group in groups for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    by_id = {id(p): group for group in groups for p in group["params"]}
    assert {group["lr"] for group in groups} == {1.0}  # one learning rate, as in the paper: no mapping network
    tmsa = model.encoder[0][0].block.attn
    assert by_id[id(tmsa.qkv_time.weight)]["weight_decay"] == 0.1
    assert by_id[id(tmsa.qkv_spatial.weight)]["weight_decay"] == 0.1
    assert by_id[id(tmsa.position_bias.table)]["weight_decay"] == 0.0
    assert by_id[id(model.class_emb.weight)]["weight_decay"] == 0.0
    assert by_id[id(model.time_in_proj.weight)]["weight_decay"] == 0.0
    assert by_id[id(model.encoder[0][0].conv.weight)]["weight_decay"] == 0.1


def test_checkpointing_gives_the_same_gradients():
    model = randomize(tiny_diffit())
    x, c_noise, labels = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([1, 10])
    grads = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        model.zero_grad()
        model(x, c_noise, class_cond=labels).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_runs():
    model = randomize(tiny_diffit())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8), torch.randn(2), class_cond=torch.tensor([0, 10]))
    assert out.isfinite().all()


# --- Config --------------------------------------------------------------------------------------------------

BASE = {
    "model": {"type": "diffit", "input_size": [32, 32], "widths": [64, 128, 128], "depths": [1, 1, 1]},
    "dataset": {"type": "cifar10", "num_classes": 10},
}


def model_edited(**edits):
    config = copy.deepcopy(BASE)
    config["model"].update(edits)
    return config


def test_defaults_are_filled_per_stage():
    model = validate_config(BASE, "test")["model"]
    assert model["num_heads"] == [4, 4, 4] and model["dropout_rate"] == [0.0, 0.0, 0.0]
    assert model["window_size"] == [8, 8, 8]  # 32x32, 16x16, 8x8: the last stage attends globally
    assert model["time_width"] == 256 and model["soft_min_snr_gamma"] == 1.0
    assert validate_config(model_edited(window_size=16), "test")["model"]["window_size"] == [16, 16, 8]
    assert validate_config({**BASE, "model": model}, "test")["model"] == model  # idempotent


BAD = {
    "list length": (dict(num_heads=[4, 4]),
                    "model.num_heads: expected 3 entries (one per stage, as in model.widths), got 2"),
    "heads": (dict(num_heads=[4, 3, 4]), "model.widths[1]: expected a multiple of 3 (model.num_heads[1]), got 128"),
    "groups": (dict(num_groups=128), "model.widths[0]: expected a multiple of 128 (model.num_groups), got 64"),
    "input size": (dict(input_size=[34, 32]), "model.input_size: expected a multiple of 4 on each axis for the 3 "
                                              "stages of model.widths, got [34, 32]"),
    "window": (dict(window_size=[8, 8, 3]), "model.window_size[2]: expected a divisor of the feature map of stage 2, "
                                            "[8, 8], got 3"),
    "window from an int": (dict(input_size=[24, 24], window_size=5),
                           "model.window_size: expected a divisor of the feature map of stage 0, [24, 24], or a "
                           "list of windows, one per stage, got 5"),
    "odd time width": (dict(time_width=33), "model.time_width: expected an even number (Fourier features), got 33"),
    "HDiT key": (dict(patch_size=[2, 2]), "model.patch_size: unknown key (did you mean 'input_size'?)"),
}


@pytest.mark.parametrize("edits, expected", BAD.values(), ids=BAD.keys())
def test_bad_config_message(edits, expected):
    with pytest.raises(ConfigError) as caught:
        validate_config(model_edited(**edits), "config.json")
    assert str(caught.value) == f"config.json: {expected}"


# --- End to end: train.py, then sample.py from its checkpoint ----------------------------------------------------


def test_train_then_sample(tmp_path):
    config = {
        "model": {"type": "diffit", "input_channels": 1, "input_size": [8, 8], "widths": [16, 32], "depths": [1, 1],
                  "num_heads": [2, 4], "window_size": 4, "num_groups": 4, "time_width": 16, "mlp_ratio": 2,
                  "sigma_data": 0.5, "loss_weighting": "soft-min-snr", "augment_prob": 0.5},
        "dataset": {"type": "digits", "num_classes": 10},
        "optimizer": {"type": "adamw", "lr": 2e-3},
        "ema_sched": {"type": "inverse", "power": 0.75, "max_value": 0.999},
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    run_script("train.py", "--config", config_path, "--out-dir", run_dir, "--end-step", 3, "--batch-size", 8,
               "--log-every", 1, "--demo-every", 3, "--sample-n", 4, "--demo-steps", 2, "--num-workers", 0,
               "--no-progress", "--seed", 7)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003.safetensors"
    run_script("sample.py", "--checkpoint", run_dir, "--n", 2, "--steps", 2, "--cfg-scale", 2, "--class", 3,
               "--out-dir", tmp_path / "samples", "--no-progress")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["seed000000.png", "seed000001.png"]
