"""FID and KID: feature extractors, statistics cached on disk, and the evaluation that training runs.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the features of two image sets,

    FID = |mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)).

KID (Binkowski et al. 2018, eq. 4) is the unbiased estimate of the squared MMD with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of both sets; its standard deviation over the subsets
comes with it.

Features come from one of:
- `inception`: clean-fid's default (Parmar et al. 2022), NVIDIA's TorchScript port of the TF Inception network
  `inception-2015-12-05.pt`, 2048-d pool features, on uint8 images resized to 299x299 in clean-fid's "clean"
  mode (each channel resized as a float image by PIL's bicubic filter, no rounding after) and mapped to
  (x - 128) / 128.
- `dinov2`: DINOv2 ViT-L/14 (Oquab et al. 2023) as Stein et al. 2023 use it for FD_DINOv2: 1024-d CLS features
  of images resized the same way to 224x224, ImageNet-normalised.
- `torchscript:PATH`: any TorchScript module mapping a float batch [N, C, H, W] with values in [0, 1] to [N, D]
  features. It may declare `input_channels` (1 or 3; default 3) and `input_size` ([H, W]; default: the images'
  own size) as attributes; images are converted and resized to them. This is how domain-specific FIDs are made
  (benchmarks/mnist_classifier/).

FID is biased upwards at small n, by an amount that depends on the model (Chong & Forsyth 2020): a FID of 2,000
fakes is comparable only with FIDs of 2,000 fakes against the same reference set, never with papers' 50k
numbers. Names therefore carry n and the reference set: fid_2k_train.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import checkpoint as ckpt
from .errors import UsageError

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
DINOV2_MODEL, DINOV2_WEIGHTS = "dinov2_vitl14", "dinov2_vitl14_pretrain.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

REFERENCE_MAX_N = 50_000  # reference statistics of a dataset use at most this many images (a fixed random subset)
KID_FEATURES = 10_000  # features kept in a statistics file for KID (a fixed random subset)
STATS_FORMAT = "hdiffusion-stats/1"


# Where files live ----------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """HDIFFUSION_CACHE, else $XDG_CACHE_HOME/hdiffusion, else ~/.cache/hdiffusion."""
    if os.environ.get("HDIFFUSION_CACHE"):
        return Path(os.environ["HDIFFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hdiffusion"


def offline() -> bool:
    """HDIFFUSION_OFFLINE=1: never try to download (clusters whose firewall makes downloads hang)."""
    return os.environ.get("HDIFFUSION_OFFLINE", "") not in ("", "0")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(url, path, sha256):
    """Download `url` to `path` through a temporary file, kept only if its SHA-256 is `sha256`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()

    def write(tmp):
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != sha256:
            raise UsageError(f"{url}: the download has SHA-256 {digest.hexdigest()}, expected {sha256}; not kept")

    ckpt.atomic_write(path, write)


def inception_weights(path=None):
    """(file, its SHA-256) of the Inception weights: `path` (--inception-weights), else HDIFFUSION_INCEPTION, else
    the cache folder's copy, downloaded on first use and checked by SHA-256."""
    given = path or os.environ.get("HDIFFUSION_INCEPTION")
    if given:
        if not Path(given).is_file():
            raise UsageError(f"{given}: no such file (the Inception weights given by "
                             f"{'--inception-weights' if path else 'HDIFFUSION_INCEPTION'})")
        return Path(given), sha256_of(given)
    cached = cache_dir() / INCEPTION_FILE
    where = (f"put the file {INCEPTION_FILE} (SHA-256 {INCEPTION_SHA256}, from {INCEPTION_URL}) at {cached}, "
             f"or pass --inception-weights PATH or set HDIFFUSION_INCEPTION=PATH")
    if cached.is_file():
        if sha256_of(cached) != INCEPTION_SHA256:
            raise UsageError(f"{cached}: not the expected Inception file (its SHA-256 differs); delete it, then "
                             + where)
        return cached, INCEPTION_SHA256
    if offline():
        raise UsageError(f"the Inception weights are not downloaded and HDIFFUSION_OFFLINE is set: {where}")
    try:
        download_verified(INCEPTION_URL, cached, INCEPTION_SHA256)
    except OSError as error:  # URLError and socket timeouts are OSErrors
        raise UsageError(f"the Inception weights could not be downloaded ({error}): {where}") from None
    return cached, INCEPTION_SHA256


# Images -> extractor input -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """A uint8 image (array [H, W, C] or PIL image) -> float32 tensor [channels, H', W'] with values in [0, 255].

    The resize is clean-fid's "clean" mode: each channel is resized as a float image by PIL's bicubic filter,
    without rounding to uint8 after. Gray images become RGB by repeating the channel (PIL's convert("RGB"));
    RGB images become gray by PIL's convert("L"). Picklable: it runs in data-loader workers.
    """

    channels: int = 3
    size: tuple = None  # (H, W); None keeps the image's size

    def __call__(self, image):
        if isinstance(image, Image.Image):
            if image.mode != "L":
                image = image.convert("L" if self.channels == 1 else "RGB")
            array = np.asarray(image).reshape(image.height, image.width, -1)
        else:
            array = np.asarray(image)
            if array.shape[-1] not in (1, 3):
                raise UsageError(f"FID needs gray or RGB images; got {array.shape[-1]} channels")
            if array.shape[-1] == 3 and self.channels == 1:
                array = np.asarray(Image.fromarray(array).convert("L"))[..., None]
        planes = [array[..., c].astype(np.float32) for c in range(array.shape[-1])]
        if self.size is not None and tuple(self.size) != planes[0].shape:
            height, width = self.size
            planes = [np.asarray(Image.fromarray(p).resize((width, height), Image.BICUBIC)) for p in planes]
        pixels = torch.from_numpy(np.stack(planes))
        return pixels.expand(self.channels, -1, -1) if pixels.shape[0] == 1 else pixels


class FeatureExtractor:
    """A network from preprocessed pixels to [N, D] features, and what identifies it in statistics files.

    `name` is short, for file and metric names; `key` identifies the weights and preprocessing exactly;
    `note`, when set, is a warning for the user (printed once by the callers).
    """

    def __init__(self, network, name, key, preprocess, mean=0.0, std=255.0, device="cpu", note=None):
        self.network, self.name, self.key, self.preprocess, self.device, self.note = (
            network, name, key, preprocess, torch.device(device), note)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)

    @torch.no_grad()
    def __call__(self, pixels):
        """[N, C, H, W] pixels in [0, 255] (from `preprocess`) -> float32 features [N, D] on the CPU."""
        x = (pixels.to(self.device, torch.float32) - self.mean) / self.std
        try:
            features = self.network(x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # TorchScript's message ends with the Python-level error
            raise UsageError(f"feature extractor {self.name}: fails on a batch of shape {list(x.shape)} "
                             f"({str(error).strip().splitlines()[-1]})") from None
        return features.reshape(x.shape[0], -1).float().cpu()


def _load_torchscript(path, device, what):
    try:
        with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript; clean-fid's Inception is TorchScript
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"{path}: not a TorchScript file ({what}): {str(error).strip().splitlines()[0]}") from None


def _short_name(path):
    return re.sub(r"[^a-z0-9]+", "_", Path(path).stem.lower()).strip("_") or "torchscript"


def load_extractor(spec, device="cpu", inception_path=None) -> FeatureExtractor:
    """`inception`, `dinov2` or `torchscript:PATH` -> a FeatureExtractor on `device`."""
    if spec == "inception":
        path, sha = inception_weights(inception_path)
        module = _load_torchscript(path, device, "the Inception weights")
        network = getattr(module, "layers", module)  # clean-fid feeds the resized image to `layers` directly
        note = None
        if sha != INCEPTION_SHA256:
            note = (f"{path} is not clean-fid's {INCEPTION_FILE} (its SHA-256 differs): its FIDs are not "
                    "comparable with published ones")
        return FeatureExtractor(network, "inception", f"inception:{sha}:clean299", Preprocess(3, (299, 299)),
                                128.0, 128.0, device, note)
    if spec == "dinov2":
        network, key = load_dinov2(device)
        mean, std = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]
        return FeatureExtractor(network, "dinov2", f"{key}:clean224", Preprocess(3, (224, 224)), mean, std, device)
    if spec.startswith("torchscript:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_file():
            raise UsageError(f"{spec}: no such file")
        module = _load_torchscript(path, device, spec)
        channels = int(getattr(module, "input_channels", 3))
        size = getattr(module, "input_size", None)
        size = None if size is None else tuple(int(s) for s in size)
        if channels not in (1, 3) or (size is not None and len(size) != 2):
            raise UsageError(f"{spec}: input_channels must be 1 or 3 and input_size [H, W]; "
                             f"got {channels} and {size}")
        key = f"torchscript:{sha256_of(path)}:{channels}:{size}:clean"
        return FeatureExtractor(module, _short_name(path), key, Preprocess(channels, size), 0.0, 255.0, device)
    raise UsageError(f"feature extractor {spec!r}: expected inception, dinov2 or torchscript:PATH")


def check_extractor_spec(spec):
    """Refuse a bad --evaluate-with / --with before anything runs (the file is read later)."""
    if spec not in ("inception", "dinov2") and not (spec.startswith("torchscript:") and len(spec) > 12):
        raise UsageError(f"feature extractor {spec!r}: expected inception, dinov2 or torchscript:PATH")


def load_dinov2(device):
    """(network, key): DINOv2 ViT-L/14 from HDIFFUSION_DINOV2 (a TorchScript export of torch.hub's
    dinov2_vitl14: [N, 3, 224, 224] ImageNet-normalised -> [N, 1024]), else from the torch.hub cache, else
    downloaded through torch.hub."""
    given = os.environ.get("HDIFFUSION_DINOV2")
    if given:
        if not Path(given).is_file():
            raise UsageError(f"{given}: no such file (HDIFFUSION_DINOV2)")
        return _load_torchscript(given, device, "HDIFFUSION_DINOV2"), f"{DINOV2_MODEL}:{sha256_of(given)}"
    hub = Path(torch.hub.get_dir())
    repo, weights = hub / "facebookresearch_dinov2_main", hub / "checkpoints" / DINOV2_WEIGHTS
    where = (f"set HDIFFUSION_DINOV2 to a TorchScript export of torch.hub's {DINOV2_MODEL}, or copy the torch.hub "
             f"cache of a machine with internet (python -c \"import torch; torch.hub.load('facebookresearch/dinov2', "
             f"'{DINOV2_MODEL}')\"): the repository to {repo} and the weights {DINOV2_WEIGHTS} to {weights}")
    try:
        if repo.is_dir() and weights.is_file():  # loads the cached weights: no network
            model = torch.hub.load(str(repo), DINOV2_MODEL, source="local")
        elif offline():
            raise UsageError(f"DINOv2 is not in the torch.hub cache and HDIFFUSION_OFFLINE is set: {where}")
        else:
            model = torch.hub.load("facebookresearch/dinov2", DINOV2_MODEL, trust_repo=True)
    except (OSError, RuntimeError, ImportError) as error:
        raise UsageError(f"DINOv2 could not be loaded ({str(error).strip().splitlines()[0]}): {where}") from None
    return model.to(device).eval(), f"{DINOV2_MODEL}:hub"


# Statistics ----------------------------------------------------------------------------------------------

def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FID between N(mu1, cov1) and N(mu2, cov2), in float64.

    tr (C1 C2)^(1/2) = tr (S C2 S)^(1/2) with S = C1^(1/2), since C1 C2 = S (S C2 S) S^-1 is similar to the
    symmetric positive semi-definite S C2 S. So both square roots come from symmetric eigendecompositions, which
    are stable where scipy's sqrtm of the non-symmetric product meets complex parts and singular factors.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise UsageError(f"features of different sizes: {mu1.shape[0]} and {mu2.shape[0]} (different extractors?)")
    eigenvalues, vectors = np.linalg.eigh(cov1)
    sqrt_cov1 = (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T
    product = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt), 0.0)  # rounding: not < 0


def kernel_distance(features1, features2, subsets=100, subset_size=1000, seed=0, device="cpu"):
    """(KID, its standard deviation over subsets): the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 of `subsets`
    pairs of random subsets of min(subset_size, n1, n2) features each, drawn from `seed`, in float64."""
    x_all = torch.as_tensor(np.asarray(features1), dtype=torch.float64, device=device)
    y_all = torch.as_tensor(np.asarray(features2), dtype=torch.float64, device=device)
    d, m = x_all.shape[1], min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise UsageError(f"KID needs at least 2 images in each set; got {len(x_all)} and {len(y_all)}")
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(len(x_all), m, replace=False)).to(device)]
        y = y_all[torch.from_numpy(rng.choice(len(y_all), m, replace=False)).to(device)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        estimates.append((within - 2 * k_xy.mean()).item())
    return float(np.mean(estimates)), float(np.std(estimates))


@dataclass
class Statistics:
    """What FID and KID need of one image set: mean and covariance of all n features (float64), and a fixed
    random subset of at most KID_FEATURES features for KID (None in clean-fid's files, which hold mu and sigma)."""

    mean: np.ndarray
    cov: np.ndarray
    n: int
    features: np.ndarray = None
    extractor: str = ""  # the FeatureExtractor key; "" when unknown
    source: str = ""

    @classmethod
    def from_features(cls, features, extractor="", source="", keep=KID_FEATURES):
        features = np.asarray(features)
        if len(features) < 2:
            raise UsageError(f"{source}: FID needs at least 2 images, got {len(features)}")
        as64 = features.astype(np.float64)
        kept = features if len(features) <= keep else features[np.sort(
            np.random.default_rng(0).choice(len(features), keep, replace=False))]
        return cls(as64.mean(0), np.cov(as64, rowvar=False), len(features), kept.astype(np.float32), extractor,
                   source)

    def save(self, path):
        arrays = dict(mean=self.mean, cov=self.cov, n=np.int64(self.n), format=np.str_(STATS_FORMAT),
                      extractor=np.str_(self.extractor), source=np.str_(self.source))
        if self.features is not None:
            arrays["features"] = self.features

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write(path, write)

    @classmethod
    def load(cls, path):
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = dict(data)
        except (OSError, ValueError) as error:
            raise UsageError(f"{path}: not a statistics file ({error})") from None
        if "mu" in fields and "sigma" in fields:  # clean-fid's and pytorch-fid's files
            return cls(fields["mu"], fields["sigma"], 0, None, "", str(path))
        if str(fields.get("format")) != STATS_FORMAT:
            raise UsageError(f"{path}: not a statistics file (expected {STATS_FORMAT}, or mu and sigma)")
        return cls(fields["mean"], fields["cov"], int(fields["n"]), fields.get("features"), str(fields["extractor"]),
                   str(fields["source"]))


def compare(a: Statistics, b: Statistics, kid_subsets=100, kid_subset_size=1000, device="cpu") -> dict:
    """{fid, kid, kid_std} between two sets (kid None when a file holds no features)."""
    scores = {"fid": frechet_distance(a.mean, a.cov, b.mean, b.cov), "kid": None, "kid_std": None}
    if a.features is not None and b.features is not None:
        scores["kid"], scores["kid_std"] = kernel_distance(a.features, b.features, kid_subsets, kid_subset_size,
                                                           device=device)
    return scores


def count_label(n):
    """2000 -> '2k', 50000 -> '50k', 1500 -> '1.5k', 500 -> '500'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def metric_names(n, reference, extractor_name):
    """{'fid': 'fid_2k_train', 'kid': 'kid_2k_train', 'kid_std': 'kid_2k_train_std'}; other extractors than
    Inception add their name (fid_2k_train_dinov2) so that no one reads them as Inception FIDs."""
    suffix = "" if extractor_name == "inception" else f"_{extractor_name}"
    base = f"{count_label(n)}_{reference}{suffix}"
    return {"fid": f"fid_{base}", "kid": f"kid_{base}", "kid_std": f"kid_{base}_std"}


# Features of image sets, over all processes --------------------------------------------------------------

def _share(n, state):
    """This process's positions of n items, contiguous, all processes the same count (the last ones padded by
    repeating item n - 1), so that gathering and keeping the first n rows gives the items in order."""
    per = -(-n // state.num_processes)
    return [min(i, n - 1) for i in range(state.process_index * per, (state.process_index + 1) * per)]


def _gather(features, n, state):
    """Every process's [per, D] features -> all n rows, in order, on every process."""
    if state.num_processes == 1:
        return features[:n].numpy()
    from accelerate.utils import gather

    return gather(features.to(state.device)).cpu()[:n].numpy()


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under a folder, recursively, in sorted order, as PIL images."""

    def __init__(self, root):
        from .data import IMAGE_EXTENSIONS

        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"{root}: no such folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise UsageError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as image:
                image.load()
                return image
        except OSError as error:
            raise UsageError(f"{self.paths[i]}: cannot read image ({error})") from None


class DatasetImages(torch.utils.data.Dataset):
    """The images of an hdiffusion dataset (uint8 tensors [C, H, W] at the model's size) as arrays [H, W, C]."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0].permute(1, 2, 0).numpy()


class _Prepared(torch.utils.data.Dataset):
    def __init__(self, images, positions, preprocess):
        self.images, self.positions, self.preprocess = images, positions, preprocess

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        return self.preprocess(self.images[self.positions[i]])


def image_features(extractor, images, state, batch_size=100, num_workers=0, progress=False, desc="features"):
    """[len(images), D] features of a dataset of images (uint8 arrays or PIL images), the work split between
    the processes of `state` (an Accelerator or PartialState) and gathered on every process."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_Prepared(images, _share(len(images), state), extractor.preprocess),
                                         batch_size=batch_size, num_workers=num_workers)
    rows = [extractor(batch) for batch in tqdm(loader, desc=desc, unit="batch", leave=False,
                                               disable=not (progress and state.is_main_process))]
    return _gather(torch.cat(rows), len(images), state)


def sample_features(extractor, denoiser, config, seeds, state, batch_size, labels=None, progress=False,
                    device=None, **generate_options):
    """[len(seeds), D] features of one generated image per seed (inference.generate, so each image depends on its
    seed alone; on `device`, default the process's), the seeds split between the processes and the features
    gathered. The images are rounded to uint8 first, exactly as PNG files of them would be."""
    from tqdm.auto import tqdm

    from .images import to_uint8
    from .inference import generate

    positions, rows = _share(len(seeds), state), []
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(positions), desc="sampling", unit="img", leave=False,
                 disable=not (progress and state.is_main_process)) as bar:
        for start in range(0, len(positions), batch_size):
            batch = positions[start:start + batch_size]
            images = generate(denoiser, config, [seeds[i] for i in batch], device=device or state.device,
                              class_labels=None if labels is None else labels[batch], **generate_options)
            pixels = torch.stack(list(pool.map(extractor.preprocess, to_uint8(images).numpy())))
            rows.append(extractor(pixels))
            bar.update(len(batch))
    return _gather(torch.cat(rows), len(seeds), state)


# Reference statistics of a dataset, cached -----------------------------------------------------------------

def dataset_fingerprint(config, dataset):
    """What decides the reference images: the model's resolution and channels, the number of images, and either
    the images themselves (a dataset cached in memory: a hash of its pixels) or the dataset section (its location
    resolved) with, for image folders, the files and their sizes. Keys that change only labels or training
    (num_classes, random_flip, ...) are left out."""
    described = dict(size=list(config["model"]["input_size"]), channels=config["model"]["input_channels"],
                     images=len(dataset))
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        described["pixels"] = hashlib.sha256(memoryview(images.contiguous().numpy()).cast("B")).hexdigest()
        return described
    ignored = {"num_classes", "cond_dropout_rate", "class_key", "random_flip", "cache"}
    described.update({k: v for k, v in config["dataset"].items() if k not in ignored})
    if described.get("location") and Path(described["location"]).exists():  # else a name (Hugging Face Hub)
        described["location"] = str(Path(described["location"]).resolve())
    paths = getattr(getattr(dataset, "source", None), "paths", None)
    if paths is not None:
        listing = hashlib.sha256()
        for path in paths:
            listing.update(f"{path}\t{path.stat().st_size}\n".encode())
        described["files"] = listing.hexdigest()
    return described


def reference_path(config, dataset, extractor, max_n=REFERENCE_MAX_N) -> Path:
    """The cache file of a dataset's statistics: named for humans, keyed by a hash of everything that decides it."""
    fingerprint = {"format": STATS_FORMAT, "dataset": dataset_fingerprint(config, dataset), "max_n": max_n,
                   "extractor": extractor.key}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    height, width = config["model"]["input_size"]
    return cache_dir() / "stats" / f"{config['dataset']['type']}-{height}x{width}-{extractor.name}-{key}.npz"


def reference_statistics(config, dataset, extractor, state, max_n=REFERENCE_MAX_N, batch_size=100, num_workers=0,
                         progress=False, cache=True, log=print):
    """The statistics of a config's dataset (data.build_dataset) at the model's resolution: loaded from the cache,
    or computed over all processes (at most max_n images, a fixed random subset) and cached. On the main
    process; None elsewhere."""
    from accelerate.utils import broadcast_object_list

    path = reference_path(config, dataset, extractor, max_n)
    found = [cache and path.is_file()]
    broadcast_object_list(found)  # the main process's cache decides, so that all compute or none
    if found[0]:
        if state.is_main_process:
            log(f"reference statistics: {path}")
            return Statistics.load(path)
        return None
    n = min(len(dataset), max_n)
    if state.is_main_process:
        log(f"reference statistics: {n:,} of {len(dataset):,} dataset images through {extractor.name}...")
    chosen = np.arange(len(dataset)) if n == len(dataset) else np.sort(
        np.random.default_rng(0).choice(len(dataset), n, replace=False))
    images = torch.utils.data.Subset(DatasetImages(dataset), chosen.tolist())
    features = image_features(extractor, images, state, batch_size, num_workers, progress, "reference features")
    if not state.is_main_process:
        return None
    stats = Statistics.from_features(features, extractor.key, f"{config['dataset']['type']} dataset, {n} images")
    if cache:
        stats.save(path)
        log(f"reference statistics: cached in {path}")
    return stats


# During training -----------------------------------------------------------------------------------------

def best_so_far(metrics_file, name):
    """The lowest value of `name` in a metrics file, or None."""
    values = []
    if Path(metrics_file).exists():
        for line in Path(metrics_file).read_text().splitlines():
            value = json.loads(line).get(name)
            if value is not None:
                values.append(value)
    return min(values, default=None)


def mark_best(run_dir, step):
    """Point checkpoints/best at the checkpoint of `step` (pruning by --keep-last spares the file it names)."""
    directory = Path(run_dir) / "checkpoints"
    ckpt.atomic_write(directory / ckpt.BEST, lambda tmp: Path(tmp).write_text(f"step_{step:08d}.safetensors\n"))


class TrainingEvaluator:
    """FID and KID of the EMA model against the training set, for `train.py --evaluate-every`.

    The fakes are the same at every evaluation: seeds seed .. seed + n - 1 (`sample.py --seeds` draws the same
    images), the demo sampler (DPM-Solver++(2M), Karras schedule, `steps` steps) and for class-conditional
    models a random class per seed, drawn from the seed as sample.py does. Each process samples its share of the
    seeds; the features are gathered, the main process computes the scores and every process receives them.
    Only the seeds' own generators are used: the training's random numbers are untouched.
    """

    def __init__(self, accelerator, config, dataset, spec, n, seed, steps, batch_size, inception_path=None,
                 num_workers=0, progress=True):
        from .guidance import random_classes

        self.accelerator, self.config, self.steps, self.batch_size = accelerator, config, steps, batch_size
        self.extractor = load_extractor(spec, accelerator.device, inception_path)
        if self.extractor.note:
            accelerator.print(f"note: {self.extractor.note}")
        self.reference = reference_statistics(config, dataset, self.extractor, accelerator, batch_size=batch_size,
                                              num_workers=num_workers, progress=progress, log=accelerator.print)
        self.seeds = list(range(seed, seed + n))
        num_classes = config["dataset"]["num_classes"]
        self.labels = random_classes(self.seeds, num_classes) if num_classes else None
        self.names = metric_names(n, "train", self.extractor.name)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        self.best, self._read_history = None, False

    def evaluate(self, denoiser, metrics_file):
        """(scores, is_best) on every process: scores named like {'fid_2k_train': ..., 'kid_2k_train': ...,
        'kid_2k_train_std': ...}; is_best when the FID is the lowest of the run (metrics_file holds the earlier)."""
        from accelerate.utils import broadcast_object_list

        features = sample_features(self.extractor, denoiser, self.config, self.seeds, self.accelerator,
                                   self.batch_size, self.labels, steps=self.steps, sampler="dpmpp_2m",
                                   autocast_dtype=self.autocast_dtype)
        result = [None, False]
        if self.accelerator.is_main_process:
            if not self._read_history:
                self.best, self._read_history = best_so_far(metrics_file, self.names["fid"]), True
            fakes = Statistics.from_features(features, self.extractor.key, "fakes")
            scores = compare(fakes, self.reference, device=self.accelerator.device)
            is_best = self.best is None or scores["fid"] < self.best
            self.best = scores["fid"] if is_best else self.best
            result = [{self.names[k]: v for k, v in scores.items()}, is_best]
        broadcast_object_list(result)
        return result

    def describe(self, scores):
        fid, kid, kid_std = (scores[self.names[k]] for k in ("fid", "kid", "kid_std"))
        return f"{self.names['fid']} {fid:.3f}, {self.names['kid']} {kid:.5f} ± {kid_std:.5f}"
