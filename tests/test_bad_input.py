"""Bad input to train.py and sample.py: one exact line on stderr, exit code 2, and nothing in the run folder changed.

One table over configs (types, ranges, unknown keys, wrong shapes), flags, datasets (corrupt files, empty folders,
wrong image modes) and checkpoints (other file types, truncated, tampered, old format, another model). The cases
run in this process (train.main / sample.main with argv); two run as scripts to show that no traceback reaches
stderr. Every train.py case points --out-dir at a copy of a finished run, which must come out byte for byte the
same: nothing is written before the input is known to be good.
"""

import hashlib
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from conftest import load_script, run_script, tiny_config, train_in_process


def edited(**changes):
    """tiny_config() with dotted keys changed: edited(**{"model.widths": [48, 48]})."""
    config = tiny_config()
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[key] = value
    return json.dumps(config)


def images(count, mode="L", broken=None):
    """{name: PNG bytes} of `count` 8x8 images; `broken`: the name of one that is not an image."""
    files = {}
    for i in range(count):
        array = np.full((8, 8), 15 * i, np.uint16 if mode == "I;16" else np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        files[f"images/{i}.png"] = buffer.getvalue()
    if broken:
        files[f"images/{broken}"] = b"\x89PNG cut off"
    return files


# Files made from the run's checkpoint (its bytes) in the case's folder tmp.

class Evil:
    """Unpickling this creates the file UNPICKLED: loading a pickle must never get that far."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(data, tmp):
    return pickle.dumps(Evil(tmp / "UNPICKLED"))


def truncated(data, tmp):
    return data[:len(data) // 2]


def tampered(data, tmp):
    return data[:-1] + bytes([data[-1] ^ 1])


def old_format(data, tmp):
    """The same file as the format before checksums (the same length, so the layout stays valid)."""
    return data.replace(b"hdiffusion-checkpoint/2", b"hdiffusion-checkpoint/1")


def foreign_safetensors(data, tmp):
    return safetensors.torch.save({"weight": torch.zeros(2)})


CKPT = "{run}/checkpoints/step_00000002.safetensors"
CONFIG = "{tmp}/config.json"
FOLDER = edited(dataset={"type": "imagefolder", "location": "{tmp}/images"})  # a config of the images in tmp
NEW = ["--out-dir", "{tmp}/new"]  # a new run rather than the finished one (whose checkpoint would be checked first)

# id: (script, files to create in tmp (name: text, bytes or a function of the run's checkpoint), arguments, message)
CASES = {
    # Configs: JSON, types, ranges, unknown keys, shapes.
    "config missing": ("train", {}, ["--config", "{tmp}/missing.json"], "{tmp}/missing.json: no such file"),
    "config not JSON": ("train", {"config.json": '{"model": {,}}'}, [],
                        f"{CONFIG}: invalid JSON at line 1, column 12: Expecting property name enclosed in double "
                        f"quotes"),
    "config not an object": ("train", {"config.json": "[1, 2]"}, [],
                             f"{CONFIG}: expected a JSON object at the top level, got a list"),
    "config wrong type": ("train", {"config.json": edited(**{"model.sigma_data": "0.5"})}, [],
                          f"{CONFIG}: model.sigma_data: expected a number > 0, got '0.5'"),
    "config out of range": ("train", {"config.json": edited(**{"model.dropout_rate": 1.0})}, [],
                            f"{CONFIG}: model.dropout_rate: expected a number in [0, 1), got 1.0"),
    "config unknown key": ("train", {"config.json": edited(**{"model.widht": [32]})}, [],
                           f"{CONFIG}: model.widht: unknown key (did you mean 'widths'?)"),
    "config wrong enum": ("train", {"config.json": edited(**{"model.loss_weighting": "min-snr"})}, [],
                          f"{CONFIG}: model.loss_weighting: expected one of 'karras', 'soft-min-snr', 'snr', got "
                          f"'min-snr'"),
    "config wrong shape": ("train", {"config.json": edited(**{"model.patch_size": [3, 3]})}, [],
                           f"{CONFIG}: model.patch_size: expected a divisor of model.input_size [8, 8] on each axis, "
                           f"got [3, 3]"),
    "config list lengths differ": ("train", {"config.json": edited(**{"model.depths": [1]})}, [],
                                   f"{CONFIG}: model.depths: expected 2 entries (one per level, as in model.widths), "
                                   f"got 1"),
    # Flags.
    "flag not a number": ("train", {}, ["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    "flag out of range": ("train", {}, ["--batch-size", 0], "--batch-size must be at least 1, got 0"),
    "flag unknown": ("train", {}, ["--batch-sise", 8], "unrecognized arguments: --batch-sise 8"),
    "flag wrong choice": ("train", {}, ["--mixed-precision", "fp8"],
                          "argument --mixed-precision: invalid choice: 'fp8' (choose from 'no', 'fp16', 'bf16')"),
    "flag batch not divisible": ("train", {}, ["--grad-accum-steps", 3],
                                 "--batch-size 16 must be divisible by --grad-accum-steps x processes = 3"),
    "flag nonfinite limit": ("train", {}, ["--max-nonfinite-steps", 0], "--max-nonfinite-steps must be at least 1, "
                                                                        "got 0"),
    "flag fsdp in one process": ("train", {}, ["--fsdp"],
                                 "--fsdp shards the model over the processes of a distributed launch (accelerate "
                                 "launch --num_processes N with N >= 2, or torchrun); this is one process"),
    "flag extractor": ("train", {}, ["--evaluate-with", "clip"],
                       "--evaluate-with: feature extractor 'clip': expected inception, dinov2 or torchscript:PATH"),
    # Datasets.
    "dataset corrupt image": (
        "train", {**images(16, broken="16.png"), "config.json": FOLDER}, NEW,
        "{tmp}/images/16.png: cannot read image (cannot identify image file '{tmp}/images/16.png')"),
    "dataset 16-bit images": (
        "train", {**images(16, mode="I;16"), "config.json": FOLDER}, NEW,
        "{tmp}/images/0.png: cannot read image (mode I;16, more than 8 bits per channel; convert the images to 8 "
        "bits first)"),
    "dataset empty folder": (
        "train", {"images/": None, "config.json": FOLDER}, NEW,
        "dataset.location: {tmp}/images: no images found (extensions: .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, "
        ".webp)"),
    "dataset missing folder": (
        "train", {"config.json": edited(dataset={"type": "imagefolder", "location": "{tmp}/nowhere"})}, NEW,
        "dataset.location: {tmp}/nowhere: no such folder"),
    "dataset too small": (
        "train", {**images(4), "config.json": FOLDER}, NEW,
        "dataset: 4 images is fewer than --batch-size 16; use a smaller batch or more images"),
    "dataset label out of range": (
        "train", {"config.json": edited(**{"dataset.num_classes": 5})}, NEW,
        "dataset.num_classes: digits image 9 has label 9, so num_classes must be at least 10, got 5"),
    "dataset zip not a zip": (
        "train", {"data.zip": b"not a zip", "config.json": edited(dataset={"type": "zip",
                                                                            "location": "{tmp}/data.zip"})}, NEW,
        "dataset.location: {tmp}/data.zip: not a zip file (File is not a zip file)"),
    "dataset custom file missing": (
        "train", {"config.json": edited(dataset={"type": "custom", "location": "data.py"})}, NEW,
        "dataset.location: {tmp}/data.py: no such Python file"),
    "dataset custom function missing": (
        "train", {"data.py": "x = 1\n", "config.json": edited(dataset={"type": "custom", "location": "data.py"})},
        NEW, "dataset.get_dataset: {tmp}/data.py defines no function 'get_dataset'"),
    # Checkpoints given to --resume.
    "resume missing": ("train", {}, ["--resume", "{tmp}/nowhere"], "{tmp}/nowhere: no such checkpoint file"),
    "resume folder without checkpoints": ("train", {"empty/": None}, ["--resume", "{tmp}/empty"],
                                          "{tmp}/empty: no checkpoint in this folder (expected checkpoints/latest)"),
    "resume text file": ("train", {"notes.txt": "step 2\n"}, ["--resume", "{tmp}/notes.txt"],
                         "{tmp}/notes.txt: not a safetensors file"),
    "resume pickle": ("train", {"model.pth": evil_pickle}, ["--resume", "{tmp}/model.pth"],
                      "{tmp}/model.pth: a pickle file (torch.save, or a k-diffusion .pth checkpoint); hdiffusion "
                      "reads only its own safetensors files and never unpickles"),
    "resume foreign safetensors": ("train", {"other.safetensors": foreign_safetensors},
                                   ["--resume", "{tmp}/other.safetensors"],
                                   "{tmp}/other.safetensors: not an hdiffusion checkpoint (no "
                                   "'hdiffusion-checkpoint/2' metadata)"),
    "resume truncated": ("train", {"cut.safetensors": truncated}, ["--resume", "{tmp}/cut.safetensors"],
                         "{tmp}/cut.safetensors: truncated: {cut_size} bytes, its header describes {size}; an "
                         "incomplete copy or write: use another checkpoint"),
    "resume tampered": ("train", {"bad.safetensors": tampered}, ["--resume", "{tmp}/bad.safetensors"],
                        "{tmp}/bad.safetensors: checksum mismatch: its contents differ from what was saved (a corrupt "
                        "or edited file); nothing was loaded"),
    "resume old format": ("train", {"old.safetensors": old_format}, ["--resume", "{tmp}/old.safetensors"],
                          "{tmp}/old.safetensors: written by an older hdiffusion (format hdiffusion-checkpoint/1, "
                          "without a checksum); this version reads hdiffusion-checkpoint/2 and hdiffusion-inference/2"),
    "resume inference file": ("train", {}, ["--resume", "{run}/ema.safetensors"],
                              "{run}/ema.safetensors: an inference file holds only EMA weights and cannot resume "
                              "training; pass a file from the run's checkpoints/ folder"),
    "resume another model": ("train", {"config.json": edited(**{"model.widths": [48, 48]})}, ["--resume", CKPT],
                             f"{CKPT}: the checkpoint's model differs from {CONFIG}: model.d_ffs: [96, 96] -> "
                             f"[144, 144]; model.widths: [32, 32] -> [48, 48]"),
    "resume another class count": ("train", {"config.json": edited(**{"dataset.num_classes": 12})}, [],
                                   f"{CKPT}: the checkpoint's model differs from {CONFIG}: dataset.num_classes: 10 -> "
                                   f"12"),
    "run folder with no intact checkpoint": (
        "train", {"broken/checkpoints/step_00000002.safetensors": tampered,
                  "broken/checkpoints/latest": "step_00000002.safetensors\n"}, ["--resume", "{tmp}/broken"],
        "{tmp}/broken: no intact checkpoint to resume from ({tmp}/broken/checkpoints/step_00000002.safetensors: "
        "checksum mismatch: its contents differ from what was saved (a corrupt or edited file); nothing was loaded); "
        "pass one with --resume, or start a new run in another folder"),
    # sample.py: checkpoints and flags.
    "sample missing checkpoint": ("sample", {}, ["--checkpoint", "{tmp}/missing.safetensors"],
                                  "{tmp}/missing.safetensors: no such checkpoint file"),
    "sample text file": ("sample", {"notes.txt": "x" * 64}, ["--checkpoint", "{tmp}/notes.txt"],
                         "{tmp}/notes.txt: not a safetensors file"),
    "sample foreign safetensors": ("sample", {"other.safetensors": foreign_safetensors},
                                   ["--checkpoint", "{tmp}/other.safetensors"],
                                   "{tmp}/other.safetensors: not an hdiffusion checkpoint (no "
                                   "'hdiffusion-checkpoint/2' metadata)"),
    "sample tampered": ("sample", {"bad.safetensors": tampered}, ["--checkpoint", "{tmp}/bad.safetensors"],
                        "{tmp}/bad.safetensors: checksum mismatch: its contents differ from what was saved (a corrupt "
                        "or edited file); nothing was loaded"),
    "sample no-ema of an inference file": ("sample", {}, ["--checkpoint", "{run}/ema.safetensors", "--no-ema"],
                                           "{run}/ema.safetensors: an inference file holds only EMA weights; --no-ema "
                                           "needs a training checkpoint"),
    "sample unknown sampler": ("sample", {}, ["--sampler", "dpm_3"], "unknown sampler 'dpm_3'; expected one of "
                               "euler, euler_ancestral, heun, dpm_2, dpm_2_ancestral, lms, ddim, dpm_fast, "
                               "dpm_adaptive, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m, dpmpp_2m_sde, "
                               "dpmpp_2m_sde_heun, dpmpp_3m_sde"),
    "sample class out of range": ("sample", {}, ["--class", 10],
                                  "class 10 is out of range: this model has 10 classes (0 to 9)"),
    "sample classes not numbers": ("sample", {}, ["--classes", "1,x"], "--classes '1,x': expected class numbers like "
                                                                         "0,1,2"),
    "sample seeds open range": ("sample", {}, ["--seeds", "0-"], "--seeds '0-': '0-' is not a seed or a range like "
                                                                 "0-63"),
    "sample seeds backwards": ("sample", {}, ["--seeds", "5-2"], "--seeds '5-2': the range 5-2 runs backwards"),
    "sample seeds repeated": ("sample", {}, ["--seeds", "1,2,1"], "--seeds '1,2,1': seed 1 appears more than once"),
    "sample grid too large": ("sample", {}, ["--seeds", "0-3", "--grid", "3x2"],
                              "--grid 3x2: needs 6 images, but only 4 are sampled"),
    "sample grid malformed": ("sample", {}, ["--grid", "8by8"], "--grid '8by8': expected COLUMNSxROWS, e.g. 8x8"),
    "sample unknown schedule": ("sample", {}, ["--schedule", "cosine"],
                                "unknown schedule 'cosine'; expected one of karras, exponential, polyexponential, vp"),
    "sample rho without use": ("sample", {}, ["--schedule", "vp", "--rho", 3],
                               "--rho applies to the karras and polyexponential schedules, not vp"),
    "sample sigma range": ("sample", {}, ["--sigma-min", 5, "--sigma-max", 1],
                           "schedule karras: need 0 < sigma_min <= sigma_max, got 5.0 and 1.0"),
    "sample eta without use": ("sample", {}, ["--eta", 0.5], "--eta applies to euler_ancestral, dpm_2_ancestral, "
                               "dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde; not to "
                               "dpmpp_2m"),
    "sample cfg interval": ("sample", {}, ["--cfg-interval", "2"],
                            "--cfg-interval '2': expected two noise levels LO,HI, e.g. 0.28,2.9"),
    "sample steps zero": ("sample", {}, ["--steps", 0], "--steps must be at least 1, got 0"),
    "sample steps not a number": ("sample", {}, ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of tiny_config() stopped at step 2: a checkpoint, ema.safetensors, metrics."""
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "config.json").write_text(edited())
    assert train_in_process("--config", tmp / "config.json", "--out-dir", tmp / "run", "--end-step", 2,
                            "--batch-size", 16, "--demo-every", 0, "--num-workers", 0, "--no-progress") == 0
    return tmp / "run"


def snapshot(folder):
    """{relative path: (mtime, SHA-256)} of every file and folder under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(folder.rglob("*"))}


def create(files, tmp, checkpoint):
    """The case's files in tmp: a name ending in / is a folder; a function makes bytes from the checkpoint's."""
    data = checkpoint.read_bytes()
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif callable(content):
            path.write_bytes(content(data, tmp))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{tmp}", str(tmp)))
    return len(data)


@pytest.mark.parametrize("script, files, args, message", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_changes_nothing(finished_run, tmp_path, capsys, script, files, args,
                                                          message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    size = create(files, tmp_path, run_dir / "checkpoints" / "step_00000002.safetensors")
    if "config.json" not in files:
        (tmp_path / "config.json").write_text(edited())
    fill = lambda text: str(text).format(tmp=tmp_path, run=run_dir, size=f"{size:,}", cut_size=f"{size // 2:,}")
    before = snapshot(tmp_path)
    if script == "train":
        common = ["--config", CONFIG, "--out-dir", "{run}", "--end-step", 4, "--batch-size", 16, "--num-workers", 0,
                  "--demo-every", 0, "--no-progress"]
        code = train_in_process(*map(fill, common + args))
    else:
        common = ["--checkpoint", "{run}", "--out-dir", "{tmp}/samples", "--steps", 2, "--no-progress"]
        code = load_script("sample").main(list(map(fill, common + args)))
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {fill(message)}\n")
    assert snapshot(tmp_path) == before  # the run folder, the case's files: nothing written, nothing changed


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--config", "missing.json", "--out-dir", "{tmp}/run"], "missing.json: no such file"),
    ("sample.py", ["--seeds", "0-3"], "the following arguments are required: --checkpoint"),
])
def test_bad_input_as_a_script_prints_no_traceback(tmp_path, script, args, message):
    result = run_script(script, *(str(a).format(tmp=tmp_path) for a in args), check=False)
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    assert not list(tmp_path.iterdir())
