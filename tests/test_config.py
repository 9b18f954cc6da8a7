"""Config loading: the schema, defaults, normalisation and one exact message per kind of mistake."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from hdiffusion.config import (ConfigError, documented_keys, load_config, schema, schema_markdown,
                               validate_config)
from hdiffusion.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.json"))
K_DIFFUSION_COPIES = ["mnist_transformer.json", "oxford_flowers.json", "oxford_flowers_shifted_window.json"]

# Smallest valid config: two levels, token grid 16 x 16 then 8 x 8.
BASE = {
    "model": {"type": "image_transformer_v2", "input_size": [32, 32], "patch_size": [2, 2],
              "widths": [128, 256], "depths": [2, 2]},
    "dataset": {"type": "cifar10"},
}
DELETE = object()


def edited(edits: dict) -> dict:
    """BASE with {'dotted.path': value} applied; value DELETE removes the key."""
    config = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, key = dotted.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return config


def load_bad(tmp_path, monkeypatch, config) -> str:
    monkeypatch.chdir(tmp_path)
    Path("config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ConfigError) as caught:
        load_config("config.json")
    return str(caught.value)


# --- The schema itself ----------------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_key_has_a_description_and_a_default():
    for path, type_name, _, rows in documented_keys():
        for key, node, required in rows:
            node = {**node, **_deref(node)}
            where = f"{path} ({type_name}): {key}"
            assert node.get("description"), where
            is_alias = node["description"].startswith("Alias of")
            assert required or is_alias or "default" in node, where


def _deref(node):
    while "$ref" in node:
        target = schema()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def test_markdown_lists_every_key():
    markdown = schema_markdown()
    for _, _, _, rows in documented_keys():
        for key, _, _ in rows:
            assert f"| `{key}` |" in markdown
    assert "### `model`, type `image_transformer_v2`" in markdown
    assert "| `widths` | non-empty list of integers >= 1 | required |" in markdown
    assert "| `lr` | number > 0 | `0.0005` |" in markdown


# --- Good configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_configs_load_and_are_stable(path):
    config = load_config(path)
    jsonschema.Draft202012Validator(schema()).validate(config)
    assert validate_config(config, "checkpoint") == config  # a stored config re-reads to itself
    assert all(section in config for section in ("model", "dataset", "optimizer", "lr_sched", "ema_sched"))


def test_the_expected_configs_ship():
    names = {path.name for path in CONFIGS}
    assert names >= set(K_DIFFUSION_COPIES) | {"cifar10_transformer.json", "quickstart_digits.json", "in128_E.json"}


def test_mnist_transformer_fully_defaulted():
    config = load_config(REPO / "configs" / "mnist_transformer.json")
    assert config == {
        "model": {
            "type": "image_transformer_v2", "input_channels": 1, "input_size": [28, 28], "patch_size": [4, 4],
            "widths": [256], "depths": [8], "d_ffs": [768], "self_attns": [{"type": "global", "d_head": 64, "backend": "auto"}],
            "dropout_rate": [0.05],
            "mapping_width": 256, "mapping_depth": 2, "mapping_d_ff": 768, "mapping_cond_dim": 0,
            "mapping_dropout_rate": 0.0, "checkpointing": False,
            "sigma_data": 0.6162, "sigma_min": 0.01, "sigma_max": 80,
            "sigma_sample_density": {"type": "cosine-interpolated", "image_d": 28, "noise_d_low": 32,
                                     "noise_d_high": 28, "min_value": 0.001, "max_value": 1000.0},
            "loss_config": "karras", "loss_weighting": "soft-min-snr", "soft_min_snr_gamma": 0.6162 ** -2,
            "loss_scales": 1, "augment_prob": 0.12, "augment_wrapper": False, "skip_stages": 0,
            "has_variance": False,
        },
        "dataset": {
            "type": "mnist", "location": "data", "num_classes": 10, "cond_dropout_rate": 0.1, "download": True,
            "classes": None, "image_key": "image", "class_key": None, "name": None, "split": "train",
            "get_dataset": "get_dataset", "config": {}, "random_flip": False, "skip_bad_images": False,
            "cache": None,
        },
        "optimizer": {"type": "adamw", "lr": 5e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-4,
                      "momentum": 0.0, "nesterov": False, "mapping_lr_scale": 1 / 3},
        "lr_sched": {"type": "constant", "warmup": 0.0, "inv_gamma": 20000.0, "power": 1.0, "num_steps": 50000,
                     "decay": 0.5, "min_lr": 0.0},
        "ema_sched": {"type": "inverse", "power": 0.6667, "inv_gamma": 1.0, "max_value": 0.9999, "min_value": 0.0,
                      "start_at": 0},
    }


@pytest.mark.parametrize("name", K_DIFFUSION_COPIES)
def test_k_diffusion_configs_get_k_diffusion_defaults(name):
    raw = json.loads((REPO / "configs" / name).read_text())
    model = load_config(REPO / "configs" / name)["model"]
    assert model["d_ffs"] == [3 * width for width in model["widths"]]
    assert model["mapping_d_ff"] == 3 * model["mapping_width"]
    assert model["soft_min_snr_gamma"] == pytest.approx(model["sigma_data"] ** -2)
    assert len(model["dropout_rate"]) == len(model["widths"])
    for given, filled in zip(raw["model"].get("self_attns", []), model["self_attns"]):
        expected = dict(given, backend="auto") if given["type"] in ("global", "neighborhood") else given
        assert filled == expected
    density = model["sigma_sample_density"]
    size = max(raw["model"]["input_size"])
    assert density == {"type": "cosine-interpolated", "image_d": size, "noise_d_low": 32, "noise_d_high": size,
                       "min_value": min(raw["model"]["sigma_min"], 1e-3),
                       "max_value": max(raw["model"]["sigma_max"], 1e3)}


def test_default_self_attns_are_neighborhood_then_global():
    config = validate_config(edited({"model.widths": [128, 256, 256], "model.depths": [1, 1, 1],
                                     "model.input_size": 64}), "test")
    assert config["model"]["self_attns"] == [
        {"type": "neighborhood", "d_head": 64, "kernel_size": 7, "backend": "auto"},
        {"type": "neighborhood", "d_head": 64, "kernel_size": 7, "backend": "auto"},
        {"type": "global", "d_head": 64, "backend": "auto"},
    ]
    assert config["model"]["input_size"] == [64, 64]


def test_self_attn_items_are_filled_per_type():
    attns = [{"type": "shifted-window"}, {"type": "none"}]
    model = validate_config(edited({"model.self_attns": attns}), "test")["model"]
    assert model["self_attns"] == [{"type": "shifted-window", "d_head": 64, "window_size": 8}, {"type": "none"}]


def test_normalisation():
    model = validate_config(edited({
        "model.patch_size": 2, "model.widths": [128.0, 256], "model.dropout_rate": 0.1,
        "model.sigma_sample_density": {"type": "lognormal", "loc": -1.0, "scale": 1.5},
    }), "test")["model"]
    assert model["patch_size"] == [2, 2]
    assert model["widths"] == [128, 256] and isinstance(model["widths"][0], int)
    assert model["dropout_rate"] == [0.1, 0.1]
    assert model["sigma_sample_density"] == {"type": "lognormal", "mean": -1.0, "std": 1.5}


@pytest.mark.parametrize("density, filled", [
    ({"type": "cosine"}, {"type": "v-diffusion", "min_value": 0.0, "max_value": None}),
    ({"type": "loglogistic"}, {"type": "loglogistic", "loc": 0.0, "scale": 0.5, "min_value": 0.0, "max_value": None}),
    ({"type": "loguniform"}, {"type": "loguniform", "min_value": 0.01, "max_value": 80.0}),
    ({"type": "split-lognormal", "scale_2": 2.0},
     {"type": "split-lognormal", "mean": -1.2, "std_1": 1.2, "std_2": 2.0}),
])
def test_density_defaults(density, filled):
    assert validate_config(edited({"model.sigma_sample_density": density}), "test")["model"]["sigma_sample_density"] \
        == filled


def test_dataset_location_defaults_by_type():
    assert validate_config(BASE, "test")["dataset"]["location"] == "data"
    assert validate_config(edited({"dataset": {"type": "digits"}}), "test")["dataset"]["location"] is None


def test_dataset_location_null_only_where_unused(tmp_path, monkeypatch):
    message = load_bad(tmp_path, monkeypatch, edited({"dataset.location": None}))
    assert message == "config.json: dataset.location: expected a string, got null"


def test_config_error_is_a_usage_error():
    assert issubclass(ConfigError, UsageError) and ConfigError.exit_code == 2


# --- Bad configs: one exact message each ----------------------------------------------------------------------

NEIGHBORHOOD_THEN_GLOBAL = [{"type": "neighborhood", "d_head": 64}, {"type": "global", "d_head": 64}]

BAD = {
    "wrong type": (
        {"model.sigma_data": "0.5"}, "model.sigma_data: expected a number > 0, got '0.5'"),
    "wrong type, boolean": (
        {"model.checkpointing": "yes"}, "model.checkpointing: expected a boolean, got 'yes'"),
    "wrong type, list": (
        {"model.widths": 256}, "model.widths: expected a non-empty list of integers >= 1, got 256"),
    "wrong type, section": (
        {"model": [1]}, "model: expected an object, got [1]"),
    "enum": (
        {"model.loss_weighting": "min-snr"},
        "model.loss_weighting: expected one of 'karras', 'soft-min-snr', 'snr', got 'min-snr'"),
    "model type": (
        {"model.type": "unet"}, "model.type: expected one of 'image_transformer_v2', 'dit', 'diffit', got 'unet'"),
    "const": (
        {"model.loss_scales": 2}, "model.loss_scales: expected 1 (the only supported value), got 2"),
    "unknown top-level key": (
        {"optimiser": {}}, "optimiser: unknown key (did you mean 'optimizer'?)"),
    "unknown model key": (
        {"model.widht": [256]}, "model.widht: unknown key (did you mean 'widths'?)"),
    "unknown self_attn key": (
        {"model.self_attns": [{"type": "neighborhood", "kernel_sise": 7}, {"type": "global"}]},
        "model.self_attns[0].kernel_sise: unknown key (did you mean 'kernel_size'?)"),
    "key of another self_attn type": (
        {"model.self_attns": [{"type": "neighborhood"}, {"type": "global", "kernel_size": 7}]},
        "model.self_attns[1].kernel_size: unknown key (allowed: 'type', 'd_head', 'backend')"),
    "below minimum": (
        {"model.depths": [0, 2]}, "model.depths[0]: expected an integer >= 1, got 0"),
    "above exclusive maximum": (
        {"model.dropout_rate": 1.0}, "model.dropout_rate: expected a number in [0, 1), got 1.0"),
    "integer or pair, below minimum": (
        {"model.input_size": 0}, "model.input_size: expected an integer >= 1, got 0"),
    "pair too short": (
        {"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected a list of 2 numbers in [0, 1), got [0.9]"),
    "missing section": (
        {"model": DELETE}, "model: missing required key"),
    "missing model key": (
        {"model.widths": DELETE}, "model.widths: missing required key (required for type 'image_transformer_v2')"),
    "missing location": (
        {"dataset.type": "imagefolder"}, "dataset.location: missing required key (required for type 'imagefolder')"),
    "width not a multiple of d_head": (
        {"model.widths": [128, 100], "model.self_attns": NEIGHBORHOOD_THEN_GLOBAL},
        "model.widths[1]: expected a multiple of 64 (model.self_attns[1].d_head), got 100"),
    "patch does not divide input": (
        {"model.patch_size": [3, 3]},
        "model.patch_size: expected a divisor of model.input_size [32, 32] on each axis, got [3, 3]"),
    "kernel even": (
        {"model.self_attns": [{"type": "neighborhood", "kernel_size": 8}, {"type": "global"}]},
        "model.self_attns[0].kernel_size: expected an odd number, got 8"),
    "kernel larger than the token grid": (
        {"model.self_attns": [{"type": "neighborhood"}, {"type": "neighborhood", "kernel_size": 9}]},
        "model.self_attns[1].kernel_size: expected at most 8 (the token grid at level 1 is [8, 8]), got 9"),
    "window does not divide the token grid": (
        {"model.self_attns": [{"type": "shifted-window", "window_size": 6}, {"type": "global"}]},
        "model.self_attns[0].window_size: expected a divisor of the token grid at level 0, [16, 16], got 6"),
    "length mismatch": (
        {"model.depths": [2]}, "model.depths: expected 2 entries (one per level, as in model.widths), got 1"),
    "length mismatch, one level": (
        {"model.widths": [128], "model.depths": [2, 2]},
        "model.depths: expected 1 entry (one per level, as in model.widths), got 2"),
    "token grid not divisible for the merges": (
        {"model.input_size": [28, 28], "model.widths": [128, 256, 256], "model.depths": [1, 1, 1]},
        "model.input_size: expected a token grid (input_size / patch_size) divisible by 4 on each axis for the "
        "3 levels of model.widths, got [14, 14]"),
    "sigma_min not below sigma_max": (
        {"model.sigma_min": 80, "model.sigma_max": 10},
        "model.sigma_min: expected less than model.sigma_max (10), got 80"),
    "density range": (
        {"model.sigma_sample_density": {"type": "loguniform", "min_value": 5.0, "max_value": 1.0}},
        "model.sigma_sample_density.min_value: expected less than model.sigma_sample_density.max_value (1.0), "
        "got 5.0"),
    "density alias and name": (
        {"model.sigma_sample_density": {"type": "lognormal", "loc": 0.0, "mean": 0.0}},
        "model.sigma_sample_density.loc: give mean or its alias loc, not both"),
    "ema range": (
        {"ema_sched": {"min_value": 0.5, "max_value": 0.1}},
        "ema_sched.min_value: expected at most ema_sched.max_value (0.1), got 0.5"),
    "classes without labels": (
        {"dataset": {"type": "imagefolder", "location": "images", "num_classes": 10}},
        "dataset.num_classes: expected 0 for an unlabelled imagefolder dataset (set dataset.classes to 'folders' "
        "or use type 'imagefolder-class'), got 10"),
    "nesterov without momentum": (
        {"optimizer": {"type": "sgd", "nesterov": True}},
        "optimizer.nesterov: expected false when optimizer.momentum is 0 (Nesterov momentum needs momentum > 0), "
        "got true"),
}


@pytest.mark.parametrize("edits, expected", BAD.values(), ids=BAD.keys())
def test_bad_config_message(tmp_path, monkeypatch, edits, expected):
    assert load_bad(tmp_path, monkeypatch, edited(edits)) == f"config.json: {expected}"


def test_all_problems_reported_at_once(tmp_path, monkeypatch):
    message = load_bad(tmp_path, monkeypatch, edited({
        "modle": {}, "model.widht": [1], "model.depths": [0, 2], "model.loss_weighting": "min-snr",
        "model.patch_size": [3, 3], "model.sigma_min": 100.0, "ema_sched": {"min_value": 0.5, "max_value": 0.1},
    }))
    assert message.splitlines() == [
        "config.json: modle: unknown key (did you mean 'model'?)",
        "config.json: model.widht: unknown key (did you mean 'widths'?)",
        "config.json: model.depths[0]: expected an integer >= 1, got 0",
        "config.json: model.loss_weighting: expected one of 'karras', 'soft-min-snr', 'snr', got 'min-snr'",
        "config.json: model.patch_size: expected a divisor of model.input_size [32, 32] on each axis, got [3, 3]",
        "config.json: model.sigma_min: expected less than model.sigma_max (80.0), got 100.0",
        "config.json: ema_sched.min_value: expected at most ema_sched.max_value (0.1), got 0.5",
    ]


def test_semantic_checks_skip_keys_with_schema_errors(tmp_path, monkeypatch):
    # widths is wrong, so nothing per level is checked: one line, not a cascade.
    message = load_bad(tmp_path, monkeypatch, edited({"model.widths": [128, "256"], "model.depths": [2]}))
    assert message == "config.json: model.widths[1]: expected an integer >= 1, got '256'"


# --- Bad files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"model": {,}}',
     "config.json: invalid JSON at line 1, column 12: Expecting property name enclosed in double quotes"),
    ("[1, 2]", "config.json: expected a JSON object at the top level, got a list"),
    ('{"model": {}, "model": {}}', "config.json: invalid JSON: duplicate key 'model'"),
    ('{"model": NaN}', "config.json: invalid JSON: NaN is not allowed"),
])
def test_bad_file(tmp_path, monkeypatch, text, expected):
    assert load_bad(tmp_path, monkeypatch, text) == expected


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^nope\.json: no such file$"):
        load_config("nope.json")


def test_validate_config_rejects_a_non_object():
    with pytest.raises(ConfigError, match=r"^checkpoint: expected a JSON object at the top level, got a string$"):
        validate_config("model", "checkpoint")


# --- CLI ----------------------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hdiffusion.config", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edited({"model.widht": [1]})))
    result = run_cli(str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"{bad}: model.widht: unknown key (did you mean 'widths'?)"


def test_cli_prints_the_defaulted_config():
    result = run_cli("configs/mnist_transformer.json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == load_config(REPO / "configs" / "mnist_transformer.json")


def test_cli_markdown():
    result = run_cli("--markdown")
    assert result.returncode == 0
    assert result.stdout == schema_markdown()


def test_config_reference_in_docs_is_current():
    from hdiffusion.config import schema_markdown

    reference = (Path(__file__).resolve().parents[1] / "docs" / "config_reference.md").read_text()
    assert reference.strip() == schema_markdown().strip(), "regenerate: python -m hdiffusion.config --markdown"
