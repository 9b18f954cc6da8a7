"""sample.py end to end on CPU: seeds, samplers, classes, guidance, grids, two processes (bad input:
test_bad_input.py)."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, launch_command, load_script, run_script, tiny_config
from hdiffusion.sampling import SAMPLERS


sample_cli = load_script("sample")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny class-conditional model (10 classes) after 4 training steps."""
    tmp = tmp_path_factory.mktemp("run")
    config_path = tmp / "config.json"
    config_path.write_text(json.dumps(tiny_config()))
    run_script("train.py", "--config", config_path, "--out-dir", tmp / "run", "--end-step", 4, "--batch-size", 16,
               "--demo-every", 0, "--num-workers", 0, "--no-progress", "--seed", 7)
    return tmp / "run"


def sample(capsys, *args):
    """Run sample.py in this process; returns (exit code, stdout, stderr)."""
    code = sample_cli.main([str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def pngs(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("seed*.png"))}


def test_sample_is_reproducible_per_seed(run_dir, tmp_path):
    # As a script: a run folder and its EMA inference file, other batch sizes, the same images per seed.
    run_script("sample.py", "--checkpoint", run_dir, "--n", 4, "--batch-size", 4, "--steps", 3,
               "--out-dir", tmp_path / "a", "--grid", "--no-progress")
    run_script("sample.py", "--checkpoint", run_dir / "ema.safetensors", "--n", 2, "--seed", 2, "--batch-size",
               1, "--steps", 3, "--out-dir", tmp_path / "b", "--no-progress")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "grid.png", "seed000000.png", "seed000001.png", "seed000002.png", "seed000003.png"]
    for name in ["seed000002.png", "seed000003.png"]:  # same seed, other batch size and file: same image
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_unwritable_out_dir_is_one_line_and_exit_74(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = sample_cli.main(["--checkpoint", str(run_dir), "--n", "1", "--steps", "2", "--out-dir",
                            str(blocker / "samples"), "--no-progress"])
    assert code == 74
    assert capsys.readouterr().err == (f"error: cannot write {blocker / 'samples'}: Not a directory; free space or "
                                       "choose another --out-dir\n")


def test_sampler_names_match_the_package():
    assert sample_cli.SAMPLER_NAMES == list(SAMPLERS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_each_seed_its_image_whatever_the_batch(run_dir, tmp_path, capsys, sampler):
    common = ["--checkpoint", run_dir, "--sampler", sampler, "--steps", 4, "--seeds", "3,0,7"]
    assert sample(capsys, *common, "--batch-size", 3, "--out-dir", tmp_path / "a")[0] == 0
    assert sample(capsys, *common, "--batch-size", 2, "--out-dir", tmp_path / "b")[0] == 0
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert list(a) == ["seed000000.png", "seed000003.png", "seed000007.png"] and a == b
    assert len(set(a.values())) == 3


def test_seed_lists_and_ranges(run_dir, tmp_path, capsys):
    code, out, _ = sample(capsys, "--checkpoint", run_dir, "--seeds", "0-2,10,20-21", "--steps", 2,
                          "--out-dir", tmp_path / "a")
    assert code == 0 and "6 images" in out
    assert list(pngs(tmp_path / "a")) == [f"seed{s:06d}.png" for s in (0, 1, 2, 10, 20, 21)]
    # --seed S --n N is S..S+N-1; --seeds wins over both.
    sample(capsys, "--checkpoint", run_dir, "--seed", 20, "--n", 2, "--steps", 2, "--out-dir", tmp_path / "b")
    sample(capsys, "--checkpoint", run_dir, "--seeds", "21", "--seed", 5, "--n", 9, "--steps", 2,
           "--out-dir", tmp_path / "c")
    a, b, c = pngs(tmp_path / "a"), pngs(tmp_path / "b"), pngs(tmp_path / "c")
    assert b == {name: a[name] for name in ["seed000020.png", "seed000021.png"]}
    assert c == {"seed000021.png": a["seed000021.png"]}


def test_grids(run_dir, tmp_path, capsys):
    code, out, _ = sample(capsys, "--checkpoint", run_dir, "--seeds", "0-4", "--steps", 2, "--grid", "2x2",
                          "--out-dir", tmp_path / "a")
    assert code == 0 and "grid.png" in out
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape[:2] == (2 * 10 + 2, 2 * 10 + 2)  # 8x8 images with 2-pixel borders
    tiles = [grid[2:10, 2:10], grid[2:10, 12:20], grid[12:20, 2:10], grid[12:20, 12:20]]
    for seed, tile in enumerate(tiles):  # row by row, in seed order
        image = np.asarray(Image.open(tmp_path / "a" / f"seed{seed:06d}.png"))
        assert np.array_equal(tile.reshape(8, 8, -1)[..., 0], image)
    sample(capsys, "--checkpoint", run_dir, "--seeds", "0-4", "--steps", 2, "--grid", "--out-dir", tmp_path / "b")
    assert np.asarray(Image.open(tmp_path / "b" / "grid.png")).shape[:2] == (2 * 10 + 2, 3 * 10 + 2)


def test_classes_and_guidance(run_dir, tmp_path, capsys):
    common = ["--checkpoint", run_dir, "--seeds", "0-3", "--steps", 3]
    code, out, _ = sample(capsys, *common, "--out-dir", tmp_path / "random")
    assert code == 0 and "random class per seed" in out
    code, out, _ = sample(capsys, *common, "--class", 3, "--out-dir", tmp_path / "class")
    assert code == 0 and "class 3" in out
    sample(capsys, *common, "--classes", "3", "--out-dir", tmp_path / "classes")
    assert pngs(tmp_path / "class") == pngs(tmp_path / "classes")
    assert pngs(tmp_path / "class") != pngs(tmp_path / "random")
    code, out, _ = sample(capsys, *common, "--class", 3, "--cfg-scale", 3, "--out-dir", tmp_path / "guided")
    assert code == 0 and "guidance scale 3" in out
    assert pngs(tmp_path / "guided") != pngs(tmp_path / "class")
    # An interval that no step reaches is no guidance at all.
    code, out, _ = sample(capsys, *common, "--class", 3, "--cfg-scale", 3, "--cfg-interval", "1000,2000",
                          "--out-dir", tmp_path / "never")
    assert code == 0 and "for sigma in [1000, 2000]" in out
    assert pngs(tmp_path / "never") == pngs(tmp_path / "class")


def test_sampler_options_schedules_and_precision(run_dir, tmp_path, capsys):
    common = ["--checkpoint", run_dir, "--seeds", "0-1", "--steps", 3]
    runs = {
        "eta0": ["--sampler", "euler_ancestral", "--eta", 0],
        "euler": ["--sampler", "euler"],
        "churn": ["--sampler", "euler", "--churn", 10],
        "exponential": ["--schedule", "exponential", "--sigma-min", 0.05, "--sigma-max", 20],
        "polyexponential": ["--schedule", "polyexponential", "--rho", 1, "--sigma-min", 0.05, "--sigma-max", 20],
        "vp": ["--schedule", "vp"],
        "bf16": ["--precision", "bf16"],
        "raw": ["--no-ema"],
    }
    for name, args in runs.items():
        code, out, err = sample(capsys, *common, *args, "--out-dir", tmp_path / name)
        assert code == 0, (name, err)
        assert len(pngs(tmp_path / name)) == 2
    assert pngs(tmp_path / "eta0") == pngs(tmp_path / "euler") != pngs(tmp_path / "churn")
    assert pngs(tmp_path / "exponential") == pngs(tmp_path / "polyexponential")


def test_two_processes_write_the_same_files_as_one(run_dir, tmp_path, capsys):
    args = ["--checkpoint", run_dir, "--seeds", "0-4", "--batch-size", 2, "--steps", 3, "--sampler", "dpmpp_2m_sde",
            "--grid", "--no-progress"]
    assert sample(capsys, *args, "--out-dir", tmp_path / "one")[0] == 0
    result = subprocess.run(launch_command(2, ROOT / "sample.py", *args, "--out-dir", tmp_path / "two"), cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and result.stdout.count("wrote 5 images") == 1
    one, two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert len(one) == 5 and one == two
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()
