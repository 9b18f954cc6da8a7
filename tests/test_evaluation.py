"""FID and KID: the math against scipy and closed forms, preprocessing, extractors and their weights, cached
reference statistics, evaluation during training, and `python -m hdiffusion.metrics`."""

import hashlib
import json
import os
import subprocess
import sys
from typing import List

import numpy as np
import pytest
import scipy.linalg
import torch
from accelerate import PartialState
from PIL import Image

from conftest import ROOT, launch_command, run_script, tiny_config
from hdiffusion import evaluation as ev
from hdiffusion.checkpoint import load_checkpoint, save_checkpoint
from hdiffusion.config import validate_config
from hdiffusion.data import build_dataset
from hdiffusion.errors import UsageError
from hdiffusion.metrics import main as metrics_main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# Stand-in networks --------------------------------------------------------------------------------------

class TinyFeatures(torch.nn.Module):
    """A fixed random projection of 8x8 gray images to 16 features, declaring its input like a real extractor."""

    input_channels: int
    input_size: List[int]

    def __init__(self, seed=0):
        super().__init__()
        self.input_channels, self.input_size = 1, [8, 8]
        self.projection = torch.nn.Parameter(torch.randn(64, 16, generator=torch.Generator().manual_seed(seed)) / 8)

    def forward(self, x):
        return torch.tanh((x.flatten(1) - 0.5) @ self.projection)


class PixelSummary(torch.nn.Module):
    """Per-channel mean, min and max of its input, zero-padded to `dim` features, for a given input side."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.side, self.dim = side, dim

    def forward(self, x):
        if x.shape[1] != 3 or x.shape[2] != self.side or x.shape[3] != self.side:
            raise RuntimeError(f"expected [N, 3, {self.side}, {self.side}]")
        stats = torch.cat([x.mean((2, 3)), x.amin((2, 3)), x.amax((2, 3))], 1)
        return torch.cat([stats, torch.zeros(x.shape[0], self.dim - 9)], 1)


class InceptionStandIn(torch.nn.Module):
    """The interface of clean-fid's inception-2015-12-05.pt: `layers` maps [N, 3, 299, 299] to [N, 2048, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.layers = PixelSummary(299, 2048)

    def forward(self, x, return_features: bool = False):
        return self.layers(x).reshape(x.shape[0], 2048, 1, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extractors")
    torch.jit.script(TinyFeatures()).save(str(tmp / "tiny.pt"))
    torch.jit.script(TinyFeatures(seed=1)).save(str(tmp / "other.pt"))
    torch.jit.script(InceptionStandIn()).save(str(tmp / "inception.pt"))
    torch.jit.script(PixelSummary(224, 1024)).save(str(tmp / "dinov2.pt"))
    return tmp


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's cache or touches the network."""
    monkeypatch.setenv("HDIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HDIFFUSION_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ["HDIFFUSION_INCEPTION", "HDIFFUSION_DINOV2"]:
        monkeypatch.delenv(name, raising=False)


def gaussian_features(n, d, seed, shift=0.0):
    """n samples of one correlated d-dimensional Gaussian (the same for every seed), shifted by `shift`."""
    mixing = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing + shift


# FID and KID ----------------------------------------------------------------------------------------------

def scipy_fid(mu1, cov1, mu2, cov2):
    """The usual formula with scipy's general matrix square root (pytorch-fid, clean-fid)."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [3, 32])
def test_fid_matches_scipy_sqrtm(d):
    a, b = gaussian_features(500, d, 0), gaussian_features(400, d, 1, shift=0.3)
    mu1, cov1, mu2, cov2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert ev.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(scipy_fid(mu1, cov1, mu2, cov2), rel=1e-9)
    assert ev.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(ev.frechet_distance(mu2, cov2, mu1, cov1),
                                                                      rel=1e-9)


def test_fid_closed_forms_between_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # C2 = k^2 C1 for any C1: (C1 C2)^(1/2) = k C1, so FID = |mu1 - mu2|^2 + (1 - k)^2 tr C1.
    factor = rng.normal(size=(6, 6))
    cov, k = factor @ factor.T, 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1 - k) ** 2 * np.trace(cov)
    assert ev.frechet_distance(mu1, cov, mu2, k**2 * cov) == pytest.approx(expected, rel=1e-10)
    # Rotated copies: C2 = Q C1 Q^T has the same spectrum; (C1 C2)^(1/2) has trace sum sqrt of its eigenvalues.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    cov2 = q @ cov @ q.T
    expected = np.trace(cov) * 2 - 2 * np.sqrt(np.linalg.eigvals(cov @ cov2).real.clip(0)).sum()
    assert ev.frechet_distance(mu1, cov, mu1, cov2) == pytest.approx(expected, rel=1e-8)


def test_fid_estimated_from_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2, scale = np.zeros(4), np.full(4, 0.5), np.array([1.0, 2.0, 0.5, 1.5])
    a = rng.normal(size=(200_000, 4)) + mu1
    b = rng.normal(size=(200_000, 4)) * scale + mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((1 - scale) ** 2)
    fid = ev.compare(ev.Statistics.from_features(a), ev.Statistics.from_features(b), kid_subsets=1)["fid"]
    assert fid == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("n", [100, 10])  # full-rank and rank-deficient covariances (n < d)
def test_fid_of_a_set_with_itself_is_zero(n):
    stats = ev.Statistics.from_features(gaussian_features(n, 24, 2))
    assert ev.frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov) == pytest.approx(0, abs=1e-9)


def unbiased_mmd2(x, y):
    """Binkowski et al. 2018, eq. 4, term by term, with k(x, y) = (x.y / d + 1)^3."""
    d, m = x.shape[1], len(x)

    def k(u, v):
        return (u @ v / d + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2


def test_kid_is_the_unbiased_mmd():
    x, y = gaussian_features(9, 5, 3), gaussian_features(9, 5, 4, shift=0.5)
    kid, kid_std = ev.kernel_distance(x, y, subsets=4, subset_size=100)  # every subset is the whole set
    assert kid == pytest.approx(unbiased_mmd2(x, y), rel=1e-10)
    assert kid_std == pytest.approx(0, abs=1e-12)
    kid, kid_std = ev.kernel_distance(gaussian_features(300, 5, 5), gaussian_features(300, 5, 6, shift=0.5),
                                      subsets=20, subset_size=50)
    assert kid > 0 and kid_std > 0
    same, _ = ev.kernel_distance(gaussian_features(300, 5, 5), gaussian_features(300, 5, 7), subsets=20,
                                 subset_size=50)
    assert abs(same) < kid / 5  # unbiased: near 0 for one distribution


def test_statistics_files_round_trip(tmp_path):
    stats = ev.Statistics.from_features(gaussian_features(50, 8, 0).astype(np.float32), "key", "somewhere", keep=20)
    stats.save(tmp_path / "s.npz")
    loaded = ev.Statistics.load(tmp_path / "s.npz")
    assert (loaded.n, loaded.extractor, loaded.source, loaded.features.shape) == (50, "key", "somewhere", (20, 8))
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    np.savez(tmp_path / "cleanfid.npz", mu=stats.mean, sigma=stats.cov)  # clean-fid's format: no features
    scores = ev.compare(ev.Statistics.load(tmp_path / "cleanfid.npz"), loaded)
    assert scores["fid"] == pytest.approx(0, abs=1e-9) and scores["kid"] is None
    (tmp_path / "bad.npz").write_text("not a file of arrays")
    with pytest.raises(UsageError, match="not a statistics file"):
        ev.Statistics.load(tmp_path / "bad.npz")


def test_metric_names_carry_n_reference_and_extractor():
    assert ev.metric_names(2000, "train", "inception") == {
        "fid": "fid_2k_train", "kid": "kid_2k_train", "kid_std": "kid_2k_train_std"}
    assert ev.metric_names(50000, "train", "dinov2")["fid"] == "fid_50k_train_dinov2"
    assert [ev.count_label(n) for n in (1500, 500, 20, 2345)] == ["1.5k", "500", "20", "2345"]


# Preprocessing --------------------------------------------------------------------------------------------

def test_clean_resize_is_per_channel_float_bicubic_without_rounding(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    pixels = ev.Preprocess(3, (29, 31))(rgb)
    assert pixels.shape == (3, 29, 31) and pixels.dtype == torch.float32
    for c in range(3):  # clean-fid: each channel a float ('F') image, PIL bicubic, no quantization after
        expected = np.asarray(Image.fromarray(rgb[..., c].astype(np.float32)).resize((31, 29), Image.BICUBIC))
        np.testing.assert_array_equal(pixels[c].numpy(), expected)
    assert not torch.equal(pixels, pixels.round())
    # A gray image: the same values in all three channels, from a file or from memory alike.
    gray = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    from_file = ev.Preprocess(3, (29, 31))(Image.open(tmp_path / "gray.png"))
    from_memory = ev.Preprocess(3, (29, 31))(gray[..., None])
    torch.testing.assert_close(from_file, from_memory, rtol=0, atol=0)
    assert torch.equal(from_file[0], from_file[2])
    rgb_file = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(rgb_file)
    torch.testing.assert_close(ev.Preprocess(1)(Image.open(rgb_file)), ev.Preprocess(1)(rgb), rtol=0, atol=0)
    # No size: the image itself, exactly.
    assert torch.equal(ev.Preprocess(3)(rgb), torch.from_numpy(rgb).permute(2, 0, 1).float())


# Extractors and their weights ------------------------------------------------------------------------------

def constant_images(values, side=8, channels=3):
    return torch.stack([torch.full((channels, side, side), float(v)) for v in values])


def test_inception_path_with_a_stand_in_file(files, monkeypatch):
    extractor = ev.load_extractor("inception", inception_path=files / "inception.pt")
    assert extractor.preprocess == ev.Preprocess(3, (299, 299))
    assert "not clean-fid's" in extractor.note  # its SHA-256 is not the real file's
    gray = np.full((28, 28, 1), 255, np.uint8)
    features = extractor(torch.stack([extractor.preprocess(gray)] * 2))
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(features[0, :9].numpy(), [127 / 128] * 9, rtol=1e-6)  # (x - 128) / 128, as clean-fid
    monkeypatch.setenv("HDIFFUSION_INCEPTION", str(files / "inception.pt"))
    assert ev.load_extractor("inception").key == extractor.key
    with pytest.raises(UsageError, match="nowhere.pt: no such file .*--inception-weights"):
        ev.load_extractor("inception", inception_path="nowhere.pt")


def test_inception_offline_without_a_file_says_which_file_to_put_where(tmp_path, monkeypatch):
    expected = str(tmp_path / "cache" / ev.INCEPTION_FILE)
    with pytest.raises(UsageError) as offline:
        ev.load_extractor("inception")
    monkeypatch.delenv("HDIFFUSION_OFFLINE")
    monkeypatch.setattr(ev, "INCEPTION_URL", (tmp_path / "unreachable.pt").as_uri())
    with pytest.raises(UsageError) as failed_download:
        ev.load_extractor("inception")
    for error in (offline, failed_download):
        message = str(error.value)
        assert expected in message and ev.INCEPTION_SHA256 in message and ev.INCEPTION_FILE in message
        assert "--inception-weights" in message and "HDIFFUSION_INCEPTION" in message
    assert "could not be downloaded" in str(failed_download.value)
    assert not (tmp_path / "cache" / ev.INCEPTION_FILE).exists()


def test_inception_download_is_kept_only_with_the_right_sha256(files, tmp_path, monkeypatch):
    monkeypatch.delenv("HDIFFUSION_OFFLINE")
    monkeypatch.setattr(ev, "INCEPTION_URL", (files / "inception.pt").as_uri())
    cached = tmp_path / "cache" / ev.INCEPTION_FILE
    with pytest.raises(UsageError, match="expected " + ev.INCEPTION_SHA256):
        ev.load_extractor("inception")
    assert not cached.exists() and not list(cached.parent.iterdir())  # no partial file left
    sha = hashlib.sha256((files / "inception.pt").read_bytes()).hexdigest()
    monkeypatch.setattr(ev, "INCEPTION_SHA256", sha)
    extractor = ev.load_extractor("inception")  # downloaded, checked, kept
    assert cached.read_bytes() == (files / "inception.pt").read_bytes() and extractor.note is None
    monkeypatch.setattr(ev, "INCEPTION_URL", (tmp_path / "gone.pt").as_uri())
    assert ev.load_extractor("inception").key == extractor.key  # from the cache, no download
    cached.write_bytes(b"corrupt")
    with pytest.raises(UsageError, match="not the expected Inception file .*delete it"):
        ev.load_extractor("inception")


def test_dinov2_offline_error_and_local_file(files, tmp_path, monkeypatch):
    with pytest.raises(UsageError) as error:
        ev.load_extractor("dinov2")
    message = str(error.value)
    assert "HDIFFUSION_DINOV2" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / ev.DINOV2_WEIGHTS) in message
    monkeypatch.setenv("HDIFFUSION_DINOV2", str(files / "dinov2.pt"))
    extractor = ev.load_extractor("dinov2")
    white = extractor.preprocess(np.full((32, 32, 3), 255, np.uint8))
    assert white.shape == (3, 224, 224)
    means = extractor(white[None])[0, :3].numpy()
    np.testing.assert_allclose(means, (1 - np.array(ev.IMAGENET_MEAN)) / np.array(ev.IMAGENET_STD), rtol=1e-5)


def test_torchscript_extractor_and_its_errors(files, tmp_path):
    extractor = ev.load_extractor(f"torchscript:{files / 'tiny.pt'}")
    assert extractor.preprocess == ev.Preprocess(1, (8, 8)) and extractor.name == "tiny"
    assert extractor(constant_images([0, 255], channels=1)).shape == (2, 16)
    (tmp_path / "notes.pt").write_text("not TorchScript")
    for spec, message in [("torchscript:missing.pt", "no such file"), (f"torchscript:{tmp_path / 'notes.pt'}",
                          "not a TorchScript file"), ("resnet", "expected inception, dinov2 or torchscript:PATH")]:
        with pytest.raises(UsageError, match=message):
            ev.load_extractor(spec)
    with pytest.raises(UsageError, match=r"fails on a batch of shape \[1, 1, 9, 8\]"):
        extractor(torch.zeros(1, 1, 9, 8))


# Reference statistics --------------------------------------------------------------------------------------

def test_reference_statistics_are_computed_once_and_keyed(files, tmp_path, monkeypatch):
    config = validate_config(tiny_config(), "tiny")
    dataset = build_dataset(config)
    extractor = ev.load_extractor(f"torchscript:{files / 'tiny.pt'}")
    state = PartialState(cpu=True)
    stats = ev.reference_statistics(config, dataset, extractor, state, max_n=500, log=lambda m: None)
    assert stats.n == 500 and stats.extractor == extractor.key
    [path] = (tmp_path / "cache" / "stats").iterdir()
    assert path.name.startswith("digits-8x8-tiny-")

    def no_recomputing(*args, **kwargs):
        raise AssertionError("recomputed cached statistics")

    monkeypatch.setattr(ev, "image_features", no_recomputing)
    again = ev.reference_statistics(config, dataset, extractor, state, max_n=500, log=lambda m: None)
    np.testing.assert_array_equal(again.cov, stats.cov)
    other = ev.load_extractor(f"torchscript:{files / 'other.pt'}")
    bigger = tiny_config()
    bigger["model"]["input_size"] = [16, 16]
    bigger = validate_config(bigger, "bigger")
    paths = {ev.reference_path(config, dataset, extractor, 500), ev.reference_path(config, dataset, other, 500),
             ev.reference_path(config, dataset, extractor, 1000),
             ev.reference_path(bigger, build_dataset(bigger), extractor, 500)}
    assert len(paths) == 4  # extractor, image count and resolution are all in the key


def test_the_best_fid_so_far_comes_from_the_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert ev.best_so_far(metrics, "fid_2k_train") is None
    records = [{"step": 10, "loss": 0.1}, {"step": 10, "fid_2k_train": 5.0}, {"step": 20, "fid_2k_train": 3.0},
               {"step": 20, "fid_5k_train": 1.0}, {"step": 30, "fid_2k_train": 4.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ev.best_so_far(metrics, "fid_2k_train") == 3.0  # another n is another metric


def test_pruning_spares_the_best_checkpoint(tmp_path):
    def save(step):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {"w": torch.ones(2)},
                        {"state": {}, "param_groups": []}, {}, keep_last=1)

    save(1)
    ev.mark_best(tmp_path, 1)
    save(2)
    save(3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000001.safetensors", "step_00000003.safetensors"]


# End to end ------------------------------------------------------------------------------------------------

def train_args(config, run_dir, end_step, *extra):
    return ["--config", config, "--out-dir", run_dir, "--end-step", end_step, "--batch-size", 16, "--log-every", 2,
            "--demo-every", 0, "--demo-steps", 3, "--num-workers", 0, "--no-progress", "--seed", 7,
            "--save-every", 100, "--keep-last", 1, *extra]


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """The tiny config trained 6 steps without evaluation, and with it every 2 steps."""
    tmp = tmp_path_factory.mktemp("runs")
    config = tmp / "config.json"
    config.write_text(json.dumps(tiny_config()))
    env = {**os.environ, "HDIFFUSION_CACHE": str(tmp / "cache"), "HDIFFUSION_OFFLINE": "1"}
    evaluate = ["--evaluate-every", 2, "--evaluate-n", 20, "--evaluate-with", f"torchscript:{files / 'tiny.pt'}"]
    run_script("train.py", *train_args(config, tmp / "plain", 6), env=env)
    result = run_script("train.py", *train_args(config, tmp / "evaluated", 6, *evaluate), env=env)
    assert "reference statistics: 1,797 of 1,797 dataset images through tiny" in result.stdout
    return config, tmp / "plain", tmp / "evaluated", env


def test_training_logs_fid_and_kid_and_keeps_the_best(runs):
    _, plain, evaluated, _ = runs
    records = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in records if "fid_20_train_tiny" in r]
    assert [r["step"] for r in scores] == [2, 4, 6]
    assert all(set(r) == {"step", "kimg", "fid_20_train_tiny", "kid_20_train_tiny", "kid_20_train_tiny_std"}
               for r in scores)
    best = min(scores, key=lambda r: r["fid_20_train_tiny"])["step"]
    pointer = (evaluated / "checkpoints" / "best").read_text().strip()
    assert pointer == f"step_{best:08d}.safetensors" and (evaluated / "checkpoints" / pointer).exists()
    # Evaluation draws none of the training's random numbers: the same losses and weights as without it.
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for run in (plain, evaluated)]
    assert losses[0] == losses[1]
    a, b = load_checkpoint(plain), load_checkpoint(evaluated)
    assert a.info["step"] == b.info["step"] == 6
    for part in ["model", "ema"]:
        for name, tensor in getattr(a, part).items():
            assert torch.equal(tensor, getattr(b, part)[name]), f"{part}.{name}"


def test_sharded_training_evaluates_and_demos_like_ddp(runs, files):
    """Under --fsdp every process runs the EMA model's forwards together (demo grids on all of them, each its
    share of an evaluation, 21 images over 2 processes, the last padded): the run finishes, and its scores are
    those of the same run under DDP (the weights agree to rounding)."""
    config, _, _, env = runs
    tmp = config.parent
    evaluate = ["--evaluate-every", 2, "--evaluate-n", 21, "--evaluate-with", f"torchscript:{files / 'tiny.pt'}",
                "--demo-every", 2, "--sample-n", 4]
    scores = {}
    for sharding in ([], ["--fsdp"]):
        run_dir = tmp / f"two{len(sharding)}"
        result = subprocess.run(launch_command(2, ROOT / "train.py", *train_args(config, run_dir, 4, *evaluate,
                                                                                 *sharding)),
                                cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (run_dir / "demo_00000004.png").exists()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        scores[bool(sharding)] = [r["fid_21_train_tiny"] for r in records if "fid_21_train_tiny" in r]
    assert len(scores[True]) == 2 and scores[True] == pytest.approx(scores[False], rel=1e-3)


def write_pngs(directory, images):
    directory.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{i:03d}.png")


def test_metrics_cli_between_folders_equals_the_direct_computation(files, tmp_path, capsys):
    from sklearn.datasets import load_digits

    digits = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    write_pngs(tmp_path / "a", digits[:60])
    write_pngs(tmp_path / "b", digits[60:150])
    tiny = f"torchscript:{files / 'tiny.pt'}"
    result = subprocess.run([sys.executable, "-m", "hdiffusion.metrics", tmp_path / "a", tmp_path / "b", "--with",
                             tiny, "--num-workers", "0", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    printed = json.loads(result.stdout)
    extractor = ev.load_extractor(tiny)
    direct = [extractor(torch.stack([extractor.preprocess(d[..., None]) for d in part]))
              for part in (digits[:60], digits[60:150])]
    stats = [ev.Statistics.from_features(f.numpy()) for f in direct]
    assert printed["fid"] == pytest.approx(ev.frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean,
                                                               stats[1].cov), rel=1e-9)
    assert printed["kid"] == pytest.approx(ev.kernel_distance(direct[0], direct[1])[0], rel=1e-9)
    assert (printed["a"]["n"], printed["b"]["n"], printed["extractor"], printed["kid_subset_size"]) == (
        60, 90, "tiny", 60)
    # The same folder twice: 0. A statistics file stands in for its folder.
    common = ["--with", tiny, "--num-workers", "0", "--no-progress"]
    assert metrics_main([str(tmp_path / "a")] * 2 + common) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(0, abs=1e-9)
    assert metrics_main([str(tmp_path / "a"), "--save-stats", str(tmp_path / "a.npz"), *common]) == 0
    capsys.readouterr()
    assert metrics_main([str(tmp_path / "a.npz"), str(tmp_path / "b"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(printed["fid"], rel=1e-12)


def test_metrics_cli_checkpoint_against_dataset_config_on_one_and_two_processes(runs, files, capsys):
    config, _, evaluated, env = runs
    args = ["-m", "hdiffusion.metrics", evaluated, config, "--with", f"torchscript:{files / 'tiny.pt'}", "--n", 20,
            "--steps", 3, "--seed", 7, "--num-workers", 0, "--no-progress"]
    assert metrics_main(list(map(str, args[2:]))) == 0
    one = capsys.readouterr().out
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = json.loads(one), json.loads(two.stdout)
    assert one["a"]["kind"] == "checkpoint" and one["b"]["kind"] == "config" and one["a"]["step"] == 6
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    # The training's last evaluation used the same seeds, sampler and steps: the same number.
    last = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 6 and one["fid"] == pytest.approx(last["fid_20_train_tiny"], rel=1e-6)


def test_training_with_a_missing_extractor_fails_before_writing_anything(tmp_path, write_config):
    result = run_script("train.py", *train_args(write_config(tiny_config()), tmp_path / "run", 2, "--evaluate-every",
                                                1, "--evaluate-with", "torchscript:missing.pt"), check=False)
    assert result.returncode == 2 and "error: torchscript:missing.pt: no such file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "expected two sources"),
    (["nowhere", "elsewhere"], "nowhere: no such file or folder"),
    (["tests", "tests", "--with", "resnet"], "expected inception, dinov2 or torchscript:PATH"),
    (["tests", "tests", "--n", "0"], "--n must be at least 1"),
    (["tests", "tests", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["tests", "tests", "--cfg-interval", "3"], "--cfg-interval '3': expected two noise levels"),
    (["README.md", "tests"], "README.md: not an image folder, config"),
])
def test_metrics_cli_bad_input_is_one_line(args, message, capsys):
    assert metrics_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
