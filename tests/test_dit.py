"""DiT (Peebles & Xie 2022): the paper's parameter and Gflop counts, adaLN-Zero, conditioning, config, end to end."""

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from conftest import ROOT, run_script
from hdiffusion import DiT
from hdiffusion.config import ConfigError, load_config, schema, validate_config
from hdiffusion.flops import count_macs
from hdiffusion.models import compile_blocks, make_model
from hdiffusion.models.dit import PRESETS, DiTBlock, sincos_pos_emb


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --- The paper's numbers ----------------------------------------------------------------------------------------

# Table 4 of the paper: Gflops of one forward pass for the 256x256 ImageNet setting (a 32x32x4 latent, 1000
# classes, learn_sigma: 8 output channels). Its "flops" are fvcore's, one per multiply-accumulate: GMAC here.
# Parameters in millions per model size (the paper's 33M, 130M, 458M, 675M; the patch size moves them by < 1%).
TABLE_4_GMAC = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


def paper_model(name):
    with torch.device("meta"):  # XL/2 is 675M parameters: counted without allocating or initialising them
        return DiT(4, 32, **PRESETS[name], out_channels=8, num_classes=1000)


@pytest.mark.parametrize("name", TABLE_4_GMAC)
def test_presets_match_table_4(name):
    model = paper_model(name)
    params, gmac = n_params(model) / 1e6, count_macs(model, (4, 32, 32)) / 1e9
    print(f"{name}: {params:.2f}M parameters, {gmac:.3f} GMAC")
    assert params == pytest.approx(PARAMS_M[name.split("-")[1].split("/")[0]], rel=0.01)
    assert gmac == pytest.approx(TABLE_4_GMAC[name], rel=0.01)


def test_presets_are_the_schema_enum():
    assert schema()["$defs"]["dit"]["properties"]["preset"]["enum"] == [*PRESETS, None]
    assert PRESETS["DiT-XL/2"] == {"depth": 28, "width": 1152, "num_heads": 16, "patch_size": 2}


def test_params_and_macs_in_closed_form():
    """Every layer of DiT's reference code, with this implementation's aug_cond and mapping_cond projections."""
    c, o, size, p, n_blocks, w, heads, q, classes = 3, 6, (8, 12), 2, 3, 32, 4, 5, 7
    model = DiT(c, size, out_channels=o, patch_size=p, depth=n_blocks, width=w, num_heads=heads, num_classes=classes,
                mapping_cond_dim=q, pos_emb="learned")
    t, f = (size[0] // p) * (size[1] // p), 256  # tokens, Fourier features of the noise level and of aug_cond
    block = (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w) + (6 * w * w + 6 * w)
    assert n_params(model) == (
        c * p * p * w + w + t * w  # patch embedding, learned position embedding
        + f * w + w + w * w + w + f * w + (classes + 1) * w + q * w  # noise level MLP, aug, class, mapping_cond
        + n_blocks * block
        + 2 * w * w + 2 * w + w * p * p * o + p * p * o  # final adaLN and decoder
    )
    assert count_macs(model, (c, *size)) == (
        t * c * p * p * w  # patchify
        + f * w + w * w + f * w + q * w  # conditioning (the class embedding is a lookup)
        + n_blocks * (t * 12 * w * w + 2 * t * t * w + 6 * w * w)  # qkv, out, MLP; QK^T and AV; adaLN once per image
        + 2 * w * w + t * w * p * p * o
    )


# --- adaLN-Zero and the interface -------------------------------------------------------------------------------


def tiny(**kwargs):
    torch.manual_seed(0)
    args = dict(patch_size=2, depth=2, width=32, num_heads=4, num_classes=10) | kwargs
    return DiT(3, 8, **args)


def randomise_zero_init(model):
    """Give the zero-initialised layers random weights, so that the output depends on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.1)
    return model


def test_fresh_model_outputs_exactly_zero_and_blocks_are_identities():
    model = tiny(mapping_cond_dim=3)
    x, c_noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    out = model(x, c_noise, aug_cond=torch.randn(2, 9), class_cond=torch.tensor([1, 10]),
                mapping_cond=torch.randn(2, 3))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    tokens, cond = torch.randn(2, 4, 4, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, cond), tokens)
    # The extra conditioning inputs start at zero: a fresh model's conditioning is DiT's t + y.
    kwargs = dict(class_cond=torch.tensor([1, 10]))
    torch.testing.assert_close(model.conditioning(2, c_noise, torch.randn(2, 9), mapping_cond=torch.randn(2, 3),
                                                  **kwargs),
                               model.time_emb(c_noise) + model.class_emb(kwargs["class_cond"]))


def test_attention_is_scaled_dot_product():
    attn = tiny().blocks[0].attn
    x = torch.randn(2, 4, 4, 32)
    q, k, v = attn.qkv_proj(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)  # [N, heads, tokens, d]
    expected = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v).transpose(1, 2).reshape(2, 4, 4, 32)
    torch.testing.assert_close(attn(x), attn.out_proj(expected))


def test_sincos_pos_emb():
    emb = sincos_pos_emb(3, 5, 16)  # 4 frequencies: 10000**(-i / 4)
    assert emb.shape == (3, 5, 16)
    omega = 10000.0 ** -(torch.arange(4) / 4)
    torch.testing.assert_close(emb[2, 3, :4], torch.sin(2 * omega))  # row: sin, then cos
    torch.testing.assert_close(emb[2, 3, 4:8], torch.cos(2 * omega))
    torch.testing.assert_close(emb[2, 3, 8:12], torch.sin(3 * omega))  # column
    assert "pos_emb" not in tiny().state_dict()  # fixed: a function of the grid, not saved
    assert "pos_emb" in tiny(pos_emb="learned").state_dict()


def test_class_conditioning_and_null_class():
    model = randomise_zero_init(tiny())
    assert model.class_emb.num_embeddings == 11  # 10 classes and the null class, index 10
    x, c_noise = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1), torch.zeros(3)
    out = model(x, c_noise, class_cond=torch.tensor([0, 1, 10]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    with pytest.raises(ValueError, match="class_cond is required.*index 10 for the unconditional"):
        model(x, c_noise)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(x, c_noise, class_cond=torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional model"):
        tiny(num_classes=0)(x, c_noise, class_cond=torch.zeros(3, dtype=torch.long))
    # aug_cond=None is the zero vector (no augmentation), as at sampling time.
    labels = torch.tensor([0, 1, 10])
    torch.testing.assert_close(model(x, c_noise, class_cond=labels),
                               model(x, c_noise, aug_cond=torch.zeros(3, 9), class_cond=labels))
    with pytest.raises(ValueError, match=r"aug_cond must have shape \[3, 9\]"):
        model(x, c_noise, aug_cond=torch.zeros(3, 4), class_cond=labels)


def test_pixel_and_latent_shapes_and_input_checks():
    for channels, size in ((1, (8, 8)), (3, (32, 16)), (4, (32, 32))):
        model = DiT(channels, size, patch_size=4, depth=1, width=16, num_heads=2)
        assert model(torch.randn(2, channels, *size), torch.zeros(2)).shape == (2, channels, *size)
    with pytest.raises(ValueError, match="built for 32x32 inputs.*got 16x16"):
        model(torch.randn(2, 4, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="not divisible by the patch size 3x3"):
        DiT(3, 8, patch_size=3)
    with pytest.raises(ValueError, match="not a multiple of num_heads 5"):
        DiT(3, 8, width=32, num_heads=5)


def test_param_groups_decay_linear_weights_only():
    model = tiny(pos_emb="learned", mapping_cond_dim=3)
    groups = model.param_groups(1e-3, 0.05, mapping_lr_scale=1 / 3)
    assert all(group["lr"] == 1e-3 for group in groups)  # one learning rate, as in the paper
    decayed = {id(p) for group in groups if group["weight_decay"] == 0.05 for p in group["params"]}
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    block = model.blocks[0]
    for param in (block.attn.qkv_proj.weight, block.mlp[0].weight, block.ada_ln[1].weight,
                  model.final_layer.linear.weight, model.patch_embed.weight, model.time_emb.mlp[2].weight):
        assert id(param) in decayed
    for param in (block.attn.qkv_proj.bias, model.pos_emb, model.class_emb.weight, model.time_emb.mlp[0].weight,
                  model.aug_in_proj.weight, model.mapping_cond_in_proj.weight):
        assert id(param) not in decayed


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = randomise_zero_init(tiny(checkpointing=checkpointing))
        model(torch.ones(2, 3, 8, 8), torch.zeros(2), class_cond=torch.tensor([0, 1])).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_compile_blocks_compiles_each_dit_block(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: compiled.append(self))
    model = tiny()
    compile_blocks(model)
    assert compiled == list(model.blocks) and all(isinstance(block, DiTBlock) for block in compiled)


# --- Config -----------------------------------------------------------------------------------------------------


def dit_config(**model):
    return {"model": {"type": "dit", "input_size": 8, "input_channels": 1, **model},
            "dataset": {"type": "digits", "num_classes": 10}}


def test_preset_fills_what_is_not_given():
    config = validate_config(dit_config(preset="DiT-B/4", depth=2), "test")
    model = config["model"]
    assert (model["depth"], model["width"], model["num_heads"], model["patch_size"]) == (2, 768, 12, [4, 4])
    assert validate_config(config, "checkpoint") == config  # a stored config re-reads to itself
    assert model["soft_min_snr_gamma"] == 1.0 and model["mlp_ratio"] == 4.0 and model["pos_emb"] == "sincos"


def test_shipped_cifar10_config():
    config = load_config(ROOT / "configs" / "cifar10_dit.json")
    assert validate_config(config, "checkpoint") == config
    model = make_model(config["model"], config["dataset"]["num_classes"])
    assert isinstance(model, DiT) and len(model.blocks) == 12 and model.grid == (16, 16)  # DiT-S/2 on 32x32 pixels
    assert n_params(model) / 1e6 == pytest.approx(32.6, abs=0.05)
    assert count_macs(model, (3, 32, 32)) / 1e9 == pytest.approx(6.05, abs=0.01)


@pytest.mark.parametrize("model, expected", [
    ({"preset": "DiT-M/2"}, "model.preset: expected one of 'DiT-S/2', 'DiT-S/4', "),
    ({"preset": "DiT-S/2", "num_heads": 5}, "model.width: expected a multiple of 5 (model.num_heads), got 384"),
    ({"preset": "DiT-S/2", "width": 90, "num_heads": 3},
     "model.width: expected a multiple of 4 for pos_emb 'sincos'"),
    ({"preset": "DiT-S/2", "input_size": 12, "patch_size": 8},
     "model.patch_size: expected a divisor of model.input_size [12, 12] on each axis, got [8, 8]"),
    ({"width": 32, "num_heads": 2, "patch_size": 2},
     "model.depth: expected an integer >= 1 (or a model.preset to take it from), got null"),
    ({"preset": "DiT-S/2", "heads": 6}, "model.heads: unknown key (did you mean 'num_heads'?)"),
    ({"preset": "DiT-S/2", "has_variance": True}, "model.has_variance: expected false (the only supported value)"),
], ids=["unknown preset", "heads", "sincos width", "patch", "no preset", "unknown key", "learn_sigma"])
def test_bad_config_message(model, expected):
    with pytest.raises(ConfigError) as error:
        validate_config(dit_config(**model), "c.json")
    assert f"c.json: {expected}" in str(error.value)


# --- End to end: train.py, resume, sample.py with every sampler and guidance -------------------------------------


def test_train_resume_and_sample_with_every_sampler(tmp_path, capsys):
    config = dit_config(patch_size=2, depth=2, width=32, num_heads=2, sigma_data=0.5, loss_weighting="soft-min-snr",
                        augment_prob=0.5)
    config["optimizer"] = {"type": "adamw", "lr": 2e-3}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    args = ["--config", config_path, "--out-dir", run_dir, "--batch-size", 16, "--log-every", 1, "--demo-every",
            0, "--num-workers", 0, "--no-progress", "--seed", 7]
    result = run_script("train.py", *args, "--end-step", 3)
    assert "GMAC per image" in result.stdout
    result = run_script("train.py", *args, "--end-step", 5)
    assert "resuming from" in result.stdout and "at step 3" in result.stdout
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)

    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    sample_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_cli)
    for sampler in sample_cli.SAMPLER_NAMES:
        out_dir = tmp_path / sampler
        code = sample_cli.main(["--checkpoint", str(run_dir), "--sampler", sampler, "--steps", "2", "--seeds", "0-1",
                                "--class", "3", "--cfg-scale", "2", "--out-dir", str(out_dir), "--no-progress"])
        assert code == 0, (sampler, capsys.readouterr().err)
        assert sorted(p.name for p in out_dir.iterdir()) == ["seed000000.png", "seed000001.png"], sampler
