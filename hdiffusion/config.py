"""JSON config -> validated, fully defaulted dict.

hdiffusion/schema/config.schema.json is the single source of truth for keys, types, allowed values, defaults
and descriptions. This module only:

1. validates a config against the schema and turns every error into one short line,
2. fills the schema's defaults, then the few defaults that depend on other keys (d_ffs = 3 x widths, ...;
   each is documented as "null: ..." in the schema),
3. runs the checks a schema cannot express (lengths per level, patch and token-grid divisibility, ...).

All problems are reported at once in a ConfigError, one per line: `<file>: <dotted.path[index]>: <problem>`.

    python -m hdiffusion.config CONFIG       print the fully defaulted config
    python -m hdiffusion.config --markdown   print the config reference (for the README)
"""

import argparse
import copy
import difflib
import functools
import json
import math
import re
import sys
from pathlib import Path

import jsonschema

from .errors import UsageError

SCHEMA_PATH = Path(__file__).parent / "schema" / "config.schema.json"

# k-diffusion's alternative key names in sigma_sample_density, normalised to the first-named ones.
DENSITY_ALIASES = {
    "lognormal": {"loc": "mean", "scale": "std"},
    "split-lognormal": {"loc": "mean", "scale_1": "std_1", "scale_2": "std_2"},
}
DENSITY_TYPE_ALIASES = {"cosine": "v-diffusion"}


class ConfigError(UsageError):
    """A config file or dict that cannot be used. The message has one line per problem."""


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


# --- Public API -----------------------------------------------------------------------------------------------


def load_config(path) -> dict:
    """Read a JSON config file; return it validated, normalised and fully defaulted."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"{source}: cannot read the file: {reason}") from None
    try:
        config = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except _JSONProblem as error:
        raise ConfigError(f"{source}: invalid JSON: {error}") from None
    return validate_config(config, source)


def validate_config(config: dict, source: str) -> dict:
    """Validate an in-memory config (e.g. one stored in a checkpoint); return a normalised, defaulted copy.

    `source` names where the config came from, at the start of each error line. Idempotent: a config this
    function returned validates to itself.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level, got {_kind(config)}")
    problems = _Problems()
    for path, text in _schema_problems(config):
        problems.add(path, text)
    config = copy.deepcopy(config)
    _normalise_aliases(config, problems)
    config = _fill_defaults(schema(), config)
    _fill_dependent_defaults(config, problems)
    _check_semantics(config, problems)
    if problems.lines:
        raise ConfigError("\n".join(_format_line(source, path, text) for path, text in problems.lines))
    return config


# --- Problems: collected with their path, so that later checks skip what is already known to be wrong --------


class _Problems:
    def __init__(self):
        self.lines = []  # [(path, text)], in the order found, without repeats

    def add(self, path, text):
        if (tuple(path), text) not in self.lines:
            self.lines.append((tuple(path), text))

    def ok(self, *paths) -> bool:
        """True if no problem was found at, above or below any of these paths."""
        for path in paths:
            for bad, _ in self.lines:
                common = min(len(bad), len(path))
                if bad[:common] == path[:common]:
                    return False
        return True


def _format_path(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _format_line(source, path, text) -> str:
    return f"{source}: {_format_path(path)}: {text}" if path else f"{source}: {text}"


def _show(value) -> str:
    """A value as it would appear in the config, shortened."""
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


class _JSONProblem(ValueError):
    pass


def _reject_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _JSONProblem(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name):
    raise _JSONProblem(f"{name} is not allowed")


# --- Schema errors -> short messages --------------------------------------------------------------------------


def _resolve(node: dict) -> dict:
    """Follow local $refs; keywords beside a $ref (default, description) override the target's."""
    while "$ref" in node:
        target = schema()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{key: value for key, value in node.items() if key != "$ref"}}
    return node


_NOUNS = {
    "integer": ("an integer", "integers"),
    "number": ("a number", "numbers"),
    "string": ("a string", "strings"),
    "boolean": ("a boolean", "booleans"),
    "object": ("an object", "objects"),
    "array": ("a list", "lists"),
    "null": ("null", "nulls"),
}


def _expected(node: dict, types=None, plural=False) -> str:
    """What a schema node accepts, in words: 'an integer >= 1 or a list of 2 integers >= 1'."""
    node = _resolve(node)
    if "const" in node:
        return f"{_show(node['const'])} (the only supported value)"
    if "enum" in node:
        values = [_show(value) for value in node["enum"]]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    declared = node.get("type", [])
    declared = [declared] if isinstance(declared, str) else declared
    if types is not None:
        declared = [kind for kind in declared if kind in types] or declared
    return " or ".join(_describe_type(kind, node, plural) for kind in declared)


def _describe_type(kind: str, node: dict, plural: bool) -> str:
    singular, many = _NOUNS[kind]
    noun = many if plural else singular
    if kind in ("integer", "number"):
        return noun + _bounds(node)
    if kind == "string" and node.get("minLength") == 1:
        return ("non-empty strings" if plural else "a non-empty string")
    if kind == "array":
        items = _expected(node["items"], plural=True) if "items" in node else "items"
        low, high = node.get("minItems"), node.get("maxItems")
        if low is not None and low == high:
            return f"{noun} of {low} {items}"
        if low == 1 and high is None:
            return f"{'non-empty lists' if plural else 'a non-empty list'} of {items}"
        return f"{noun} of {items}"
    return noun


def _bounds(node: dict) -> str:
    low = ("[", node["minimum"]) if "minimum" in node else ("(", node.get("exclusiveMinimum"))
    high = ("]", node["maximum"]) if "maximum" in node else (")", node.get("exclusiveMaximum"))
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{_show(low[1])}, {_show(high[1])}{high[0]}"
    if low[1] is not None:
        return f" {'>=' if low[0] == '[' else '>'} {_show(low[1])}"
    if high[1] is not None:
        return f" {'<=' if high[0] == ']' else '<'} {_show(high[1])}"
    return ""


def _schema_problems(config: dict):
    """Yield (path, text) for every schema error, in short human words."""
    for error in _validator().iter_errors(config):
        path, keyword, instance = tuple(error.absolute_path), error.validator, error.instance
        got = f"got {_show(instance)}"
        if keyword == "type":
            yield path, f"expected {_expected(error.schema)}, {got}"
        elif keyword in ("enum", "const"):
            yield path, f"expected {_expected(error.schema)}, {got}"
        elif keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            yield path, f"expected {_expected(error.schema, types={'integer', 'number'})}, {got}"
        elif keyword in ("minItems", "maxItems"):
            yield path, f"expected {_expected(error.schema, types={'array'})}, {got}"
        elif keyword == "minLength":
            yield path, f"expected {_expected(error.schema, types={'string'})}, {got}"
        elif keyword == "required":
            # Requirements inside an if/then depend on the object's type; say which.
            needed_by = ""
            if "then" in error.relative_schema_path and "type" in instance:
                needed_by = f" (required for type {_show(instance['type'])})"
            for key in error.validator_value:
                if key not in instance:
                    yield path + (key,), f"missing required key{needed_by}"
        elif keyword == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in instance:
                if key not in allowed:
                    yield path + (key,), _unknown_key(key, allowed)
        else:  # a keyword the schema does not use today; keep jsonschema's words rather than hide it
            yield path, error.message


def _unknown_key(key: str, allowed: list) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    if len(allowed) <= 8:
        return "unknown key (allowed: " + ", ".join(map(repr, allowed)) + ")"
    return "unknown key"


# --- Normalisation and defaults -------------------------------------------------------------------------------


def _normalise_aliases(config: dict, problems: _Problems):
    """k-diffusion's alias names in sigma_sample_density -> the canonical ones (before defaults are filled)."""
    path = ("model", "sigma_sample_density")
    model = _checked_model(config, problems)
    density = model.get("sigma_sample_density") if model else None
    if not isinstance(density, dict) or not problems.ok(path):
        return
    density["type"] = DENSITY_TYPE_ALIASES.get(density["type"], density["type"])
    for alias, name in DENSITY_ALIASES.get(density["type"], {}).items():
        if alias not in density:
            continue
        if name in density:
            problems.add(path + (alias,), f"give {name} or its alias {alias}, not both")
        else:
            density[name] = density.pop(alias)


def _checked_model(config: dict, problems: _Problems):
    """config['model'] if it is an object of a known type (so that the schema checked its keys), else None."""
    model = config.get("model")
    if isinstance(model, dict) and problems.ok(("model", "type")) and model.get("type") in _MODEL_TYPES:
        return model
    return None


def _matches(node: dict, value) -> bool:
    return jsonschema.Draft202012Validator(node).is_valid(value)


def _fill_defaults(node: dict, value):
    """Fill the schema's defaults into `value` (where it is an object), recursively; ints stay ints.

    Tolerates invalid input: it descends only where the value has the shape the schema describes. Objects come
    back with their keys in schema order.
    """
    node = _resolve(node)
    if isinstance(value, dict):
        properties = dict(node.get("properties", {}))
        for branch in node.get("allOf", []):
            if "then" in branch and _matches(branch["if"], value):
                # A type-dependent key (if/then) replaces the general one: its default wins.
                properties.update(_resolve(branch["then"]).get("properties", {}))
        for key, sub in properties.items():
            sub_resolved = _resolve(sub)
            if key not in value and "default" in sub_resolved:
                value[key] = copy.deepcopy(sub_resolved["default"])
            if key in value:
                value[key] = _fill_defaults(sub, value[key])
        ordered = {key: value[key] for key in properties if key in value}
        return ordered | value
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, list) and "items" in node:
        return [_fill_defaults(node["items"], item) for item in value]
    if isinstance(value, float) and value.is_integer() and "integer" in types and "number" not in types:
        return int(value)  # JSON Schema counts 2.0 as an integer; layer sizes must be ints
    return value


def _fill_dependent_defaults(config: dict, problems: _Problems):
    """The defaults that depend on other keys, documented as 'null: ...' in the schema."""
    model = _checked_model(config, problems)
    if model is None:
        return
    for key in ("input_size", "patch_size"):
        if problems.ok(("model", key)) and isinstance(model.get(key), int):
            model[key] = [model[key], model[key]]
    _MODEL_TYPES[model["type"]].fill_defaults(model, problems)
    _fill_density_defaults(model, problems)


def _fill_density_defaults(model: dict, problems: _Problems):
    keys = ("sigma_sample_density", "sigma_data", "sigma_min", "sigma_max", "input_size")
    if not problems.ok(*[("model", key) for key in keys]):
        return
    density = model["sigma_sample_density"]
    size = max(model["input_size"])
    dependent = {
        "loglogistic": {"loc": math.log(model["sigma_data"])},
        "loguniform": {"min_value": model["sigma_min"], "max_value": model["sigma_max"]},
        "cosine-interpolated": {
            "image_d": size,
            "noise_d_high": size,
            "min_value": min(model["sigma_min"], 1e-3),
            "max_value": max(model["sigma_max"], 1e3),
        },
    }
    for key, value in dependent.get(density["type"], {}).items():
        if density[key] is None:
            density[key] = value


# --- Checks a schema cannot express -------------------------------------------------------------------------


def _check_semantics(config: dict, problems: _Problems):
    model = _checked_model(config, problems)
    if model is not None:
        _MODEL_TYPES[model["type"]].check(model, problems)
        _check_model_common(model, problems)
    if isinstance(config.get("dataset"), dict):
        _check_dataset(config["dataset"], problems)
    if isinstance(config.get("optimizer"), dict):
        _check_optimizer(config["optimizer"], problems)
    if isinstance(config.get("ema_sched"), dict):
        _check_ema_sched(config["ema_sched"], problems)


def _check_model_common(model: dict, problems: _Problems):
    at = ("model",)
    if problems.ok(at + ("sigma_min",), at + ("sigma_max",)) and model["sigma_min"] >= model["sigma_max"]:
        problems.add(at + ("sigma_min",), f"expected less than model.sigma_max ({_show(model['sigma_max'])}), "
                                          f"got {_show(model['sigma_min'])}")
    density_at = at + ("sigma_sample_density",)
    density = model.get("sigma_sample_density")
    if problems.ok(density_at) and isinstance(density, dict):
        low, high = density.get("min_value"), density.get("max_value")
        if low is not None and high is not None and low >= high:
            problems.add(density_at + ("min_value",), "expected less than model.sigma_sample_density.max_value "
                                                      f"({_show(high)}), got {_show(low)}")


def _check_dataset(dataset: dict, problems: _Problems):
    at = ("dataset",)
    if not problems.ok(at + ("type",), at + ("num_classes",), at + ("classes",), at + ("class_key",)):
        return
    # Class-conditional training needs labels; these two types have them only when asked to.
    num_classes = dataset["num_classes"]
    if num_classes > 0 and dataset["type"] == "imagefolder" and dataset["classes"] is None:
        problems.add(at + ("num_classes",), "expected 0 for an unlabelled imagefolder dataset (set dataset.classes to "
                                            f"'folders' or use type 'imagefolder-class'), got {num_classes}")
    if num_classes > 0 and dataset["type"] == "huggingface" and dataset["class_key"] is None:
        problems.add(at + ("num_classes",), f"expected 0 for a huggingface dataset without dataset.class_key, "
                                            f"got {num_classes}")


def _check_optimizer(optimizer: dict, problems: _Problems):
    at = ("optimizer",)
    if problems.ok(at + ("type",), at + ("momentum",), at + ("nesterov",)):
        if optimizer["type"] == "sgd" and optimizer["nesterov"] and optimizer["momentum"] == 0:
            problems.add(at + ("nesterov",), "expected false when optimizer.momentum is 0 (Nesterov momentum needs "
                                             "momentum > 0), got true")


def _check_ema_sched(ema_sched: dict, problems: _Problems):
    at = ("ema_sched",)
    if problems.ok(at + ("min_value",), at + ("max_value",)) and ema_sched["min_value"] > ema_sched["max_value"]:
        problems.add(at + ("min_value",), f"expected at most ema_sched.max_value ({_show(ema_sched['max_value'])}), "
                                          f"got {_show(ema_sched['min_value'])}")


# --- Model types: the per-architecture defaults and checks. A new type adds its schema and an entry here. -----


def _fill_soft_min_snr_gamma(model: dict, problems: _Problems):
    at = ("model",)
    if problems.ok(at + ("sigma_data",), at + ("soft_min_snr_gamma",)) and model["soft_min_snr_gamma"] is None:
        # gamma = sigma_data**-2 makes 1 / (sigma**2 + 1 / gamma) k-diffusion's soft-min-snr weighting.
        model["soft_min_snr_gamma"] = model["sigma_data"] ** -2


def _check_lengths(model: dict, keys, unit: str, problems: _Problems):
    """Each list in `keys` has one entry per `unit` (level, stage), as model.widths has."""
    n = len(model["widths"])
    for key in keys:
        value = model.get(key)
        if problems.ok(("model", key)) and isinstance(value, list) and len(value) != n:
            problems.add(("model", key), f"expected {_count(n, 'entry', 'entries')} (one per {unit}, as in "
                                         f"model.widths), got {len(value)}")


def _patch_grid(model: dict, problems: _Problems):
    """input_size / patch_size [h, w], or None (and a problem) where the patches do not tile the image."""
    input_size, patch_size = model["input_size"], model["patch_size"]
    if any(side % patch for side, patch in zip(input_size, patch_size)):
        problems.add(("model", "patch_size"), f"expected a divisor of model.input_size {input_size} on each axis, "
                                              f"got {patch_size}")
        return None
    return [side // patch for side, patch in zip(input_size, patch_size)]


class _ImageTransformerV2:
    """HDiT: levels outermost first; each level after the first merges 2x2 tokens, halving the token grid."""

    per_level = ("depths", "d_ffs", "self_attns", "dropout_rate")

    @staticmethod
    def fill_defaults(model: dict, problems: _Problems):
        at = ("model",)
        if problems.ok(at + ("mapping_width",), at + ("mapping_d_ff",)) and model["mapping_d_ff"] is None:
            model["mapping_d_ff"] = 3 * model["mapping_width"]
        _fill_soft_min_snr_gamma(model, problems)
        if not problems.ok(at + ("widths",)):
            return
        widths = model["widths"]
        if problems.ok(at + ("d_ffs",)) and model["d_ffs"] is None:
            model["d_ffs"] = [3 * width for width in widths]
        if problems.ok(at + ("self_attns",)) and model["self_attns"] is None:
            neighborhood = {"type": "neighborhood", "d_head": 64, "kernel_size": 7, "backend": "auto"}
            global_ = {"type": "global", "d_head": 64, "backend": "auto"}
            model["self_attns"] = [dict(neighborhood) for _ in widths[:-1]] + [global_]
        if problems.ok(at + ("dropout_rate",)) and not isinstance(model["dropout_rate"], list):
            model["dropout_rate"] = [model["dropout_rate"]] * len(widths)

    @classmethod
    def check(cls, model: dict, problems: _Problems):
        at = ("model",)
        if not problems.ok(at + ("widths",)):
            return
        widths = model["widths"]
        n_levels = len(widths)
        _check_lengths(model, cls.per_level, "level", problems)
        grid = cls._token_grid(model, n_levels, problems)
        if not problems.ok(at + ("self_attns",)):
            return
        for level, (width, attn) in enumerate(zip(widths, model["self_attns"])):
            attn_at = at + ("self_attns", level)
            if "d_head" in attn and width % attn["d_head"]:
                problems.add(at + ("widths", level), f"expected a multiple of {attn['d_head']} "
                                                     f"({_format_path(attn_at + ('d_head',))}), got {width}")
            level_grid = [side >> level for side in grid] if grid else None
            if attn["type"] == "neighborhood":
                kernel_size = attn["kernel_size"]
                if kernel_size % 2 == 0:
                    problems.add(attn_at + ("kernel_size",), f"expected an odd number, got {kernel_size}")
                if level_grid and kernel_size > min(level_grid):
                    problems.add(attn_at + ("kernel_size",), f"expected at most {min(level_grid)} (the token grid at "
                                                             f"level {level} is {level_grid}), got {kernel_size}")
            if attn["type"] == "shifted-window" and level_grid:
                window_size = attn["window_size"]
                if any(side % window_size for side in level_grid):
                    problems.add(attn_at + ("window_size",), "expected a divisor of the token grid at level "
                                                             f"{level}, {level_grid}, got {window_size}")

    @staticmethod
    def _token_grid(model: dict, n_levels: int, problems: _Problems):
        """The first level's token grid [h, w], or None (and a problem) if the patches or merges do not fit."""
        at = ("model",)
        if not problems.ok(at + ("input_size",), at + ("patch_size",)):
            return None
        grid = _patch_grid(model, problems)
        if grid is None:
            return None
        merges = 2 ** (n_levels - 1)
        if any(side % merges for side in grid):
            problems.add(at + ("input_size",), f"expected a token grid (input_size / patch_size) divisible by "
                                               f"{merges} on each axis for the {n_levels} levels of model.widths, "
                                               f"got {grid}")
            return None
        return grid


class _DiT:
    """DiT: one grid of tokens; a preset (a model of the paper) fills the architecture keys left null."""

    architecture = ("depth", "width", "num_heads", "patch_size")

    @classmethod
    def fill_defaults(cls, model: dict, problems: _Problems):
        at = ("model",)
        _fill_soft_min_snr_gamma(model, problems)
        preset = model["preset"] if problems.ok(at + ("preset",)) else None
        if preset is not None:
            from .models.dit import PRESETS  # the paper's table, beside the model

            for key in cls.architecture:
                if problems.ok(at + (key,)) and model[key] is None:
                    value = PRESETS[preset][key]
                    model[key] = [value, value] if key == "patch_size" else value
        for key in cls.architecture:
            if problems.ok(at + (key,), at + ("preset",)) and model[key] is None:
                wanted = "an integer >= 1 or a list of 2 integers >= 1" if key == "patch_size" else "an integer >= 1"
                problems.add(at + (key,), f"expected {wanted} (or a model.preset to take it from), got null")

    @staticmethod
    def check(model: dict, problems: _Problems):
        at = ("model",)

        def known(*keys):  # valid and not null (keys stay null when the preset is invalid)
            return problems.ok(*[at + (key,) for key in keys]) and all(model[key] is not None for key in keys)

        if known("width", "num_heads") and model["width"] % model["num_heads"]:
            problems.add(at + ("width",), f"expected a multiple of {model['num_heads']} (model.num_heads), "
                                          f"got {model['width']}")
        if known("width", "pos_emb") and model["pos_emb"] == "sincos" and model["width"] % 4:
            problems.add(at + ("width",), "expected a multiple of 4 for pos_emb 'sincos' (sine and cosine of the row "
                                          f"and of the column), got {model['width']}")
        if known("input_size", "patch_size"):
            _patch_grid(model, problems)


class _DiffiT:
    """DiffiT: resolution stages outermost first; stage i works at input_size / 2**i."""

    per_stage = ("depths", "num_heads", "window_size", "dropout_rate")

    @staticmethod
    def _stage_sizes(model: dict, problems: _Problems):
        """[[h, w] of each stage], or None (and a problem) if input_size does not halve that many times."""
        at = ("model",)
        if not problems.ok(at + ("input_size",), at + ("widths",)):
            return None
        n_stages, input_size = len(model["widths"]), model["input_size"]
        factor = 2 ** (n_stages - 1)
        if any(side % factor for side in input_size):
            problems.add(at + ("input_size",), f"expected a multiple of {factor} on each axis for the {n_stages} "
                                               f"stages of model.widths, got {input_size}")
            return None
        return [[side >> stage for side in input_size] for stage in range(n_stages)]

    @classmethod
    def fill_defaults(cls, model: dict, problems: _Problems):
        at = ("model",)
        if problems.ok(at + ("sigma_data",), at + ("soft_min_snr_gamma",)) and model["soft_min_snr_gamma"] is None:
            # gamma = sigma_data**-2 makes 1 / (sigma**2 + 1 / gamma) k-diffusion's soft-min-snr weighting.
            model["soft_min_snr_gamma"] = model["sigma_data"] ** -2
        if not problems.ok(at + ("widths",)):
            return
        widths = model["widths"]
        if problems.ok(at + ("time_width",)) and model["time_width"] is None:
            model["time_width"] = 4 * widths[0]
        for key in ("num_heads", "dropout_rate"):
            if problems.ok(at + (key,)) and not isinstance(model[key], list):
                model[key] = [model[key]] * len(widths)
        sizes = cls._stage_sizes(model, problems)
        window_size = model["window_size"]
        if problems.ok(at + ("window_size",)) and not isinstance(window_size, list) and sizes:
            # One number is a largest window: stages whose feature map is smaller attend over all of it.
            windows = [min(window_size, *size) for size in sizes]
            for stage, (window, size) in enumerate(zip(windows, sizes)):
                if any(side % window for side in size):
                    problems.add(at + ("window_size",),
                                 f"expected a divisor of the feature map of stage {stage}, {size}, or a list of "
                                 f"windows, one per stage, got {window_size}")
                    return
            model["window_size"] = windows

    @classmethod
    def check(cls, model: dict, problems: _Problems):
        at = ("model",)
        if not problems.ok(at + ("widths",)):
            return
        widths = model["widths"]
        _check_lengths(model, cls.per_stage, "stage", problems)
        for stage, width in enumerate(widths):
            if problems.ok(at + ("num_heads",)) and width % model["num_heads"][stage]:
                problems.add(at + ("widths", stage), f"expected a multiple of {model['num_heads'][stage]} "
                                                     f"(model.num_heads[{stage}]), got {width}")
            if problems.ok(at + ("num_groups",)) and width % model["num_groups"]:
                problems.add(at + ("widths", stage), f"expected a multiple of {model['num_groups']} "
                                                     f"(model.num_groups), got {width}")
        if problems.ok(at + ("time_width",)) and model["time_width"] % 2:
            problems.add(at + ("time_width",), f"expected an even number (Fourier features), got {model['time_width']}")
        sizes = cls._stage_sizes(model, problems)
        if sizes and problems.ok(at + ("window_size",)) and isinstance(model["window_size"], list):
            for stage, (window, size) in enumerate(zip(model["window_size"], sizes)):
                if any(side % window for side in size):
                    problems.add(at + ("window_size", stage), f"expected a divisor of the feature map of stage "
                                                              f"{stage}, {size}, got {window}")


_MODEL_TYPES = {"image_transformer_v2": _ImageTransformerV2, "dit": _DiT, "diffit": _DiffiT}


# --- Reference documentation generated from the schema --------------------------------------------------------


def documented_keys():
    """Yield (path, type name or None, description, [(key, schema node, required)]) for every object in the schema.

    Tagged unions (a `type` plus if/then branches with keys of their own) give one table for `type` and one per
    type name.
    """
    for section, node in schema()["properties"].items():
        yield from _documented_object(node, section)


def _documented_object(node: dict, path: str):
    node = _resolve(node)
    tables = []
    if node.get("properties"):
        tables.append((None, node, list(node["properties"].items())))
    for branch in node.get("allOf", []):
        then = _resolve(branch.get("then", {}))
        if then.get("additionalProperties") is False:  # one type of a tagged union
            tag = then["properties"]["type"]
            names = [tag["const"]] if "const" in tag else tag["enum"]
            rows = [(key, sub) for key, sub in then["properties"].items() if key != "type"]
            tables.append((", ".join(names), then, rows))
    nested = {}
    for type_name, table_node, rows in tables:
        required = table_node.get("required", [])
        yield path, type_name, table_node.get("description", ""), [(key, sub, key in required) for key, sub in rows]
        for key, sub in rows:
            resolved = _resolve(sub)
            items = _resolve(resolved["items"]) if "items" in resolved else {}
            if "properties" in resolved or "allOf" in resolved:
                nested.setdefault(f"{path}.{key}", sub)
            elif "properties" in items or "allOf" in items:
                nested.setdefault(f"{path}.{key}[]", resolved["items"])
    for sub_path, sub in nested.items():
        yield from _documented_object(sub, sub_path)


def schema_markdown() -> str:
    """The config reference as Markdown tables (key, type, default, description), generated from the schema."""
    root = schema()
    lines = [
        "<!-- Generated from hdiffusion/schema/config.schema.json by `python -m hdiffusion.config --markdown`. -->",
        "",
        root["description"],
    ]
    for path, type_name, description, rows in documented_keys():
        if not rows:
            continue
        lines += ["", f"### `{path}`" + (f", type `{type_name}`" if type_name else ""), ""]
        if description:
            lines += [_cell(description), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, sub, required in rows:
            resolved = _resolve(sub)
            kind = re.sub(r"(^| or )an? ", r"\1", _expected(resolved))
            default = "required" if required else (
                f"`{json.dumps(resolved['default'])}`" if "default" in resolved else "none (alias)")
            lines.append(f"| `{key}` | {_cell(kind)} | {default} | {_cell(resolved.get('description', ''))} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- CLI -------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdiffusion.config",
                                     description="Validate a config and print it fully defaulted, or print the "
                                                 "config reference.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("config", nargs="?", help="the JSON config file to validate and print with its defaults")
    what.add_argument("--markdown", action="store_true", help="print the config reference as Markdown")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(schema_markdown())
        return 0
    try:
        config = load_config(args.config)
    except UsageError as error:
        print(error, file=sys.stderr)
        return error.exit_code
    print(dumps(config))
    return 0


def dumps(config: dict) -> str:
    """JSON with 4-space indents and lists of plain values on one line, as in the files of configs/."""
    text = json.dumps(config, indent=4)
    return re.sub(r"\[\s*([^\[\]{}\"]*?)\s*\]", lambda match: "[" + ", ".join(
        part.strip() for part in match.group(1).split(",") if part.strip()) + "]", text)


if __name__ == "__main__":
    sys.exit(main())
