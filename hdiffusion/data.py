"""Datasets, the shared image transform, and the deterministic order in which training visits them.

Every dataset yields `(image, label)`: image a uint8 tensor [C, H, W] at `model.input_size` with
`model.input_channels` channels, label an int (0 when the dataset has no classes). Training moves batches to its
device as uint8 and there scales them to [-1, 1] (`to_unit_range`) and augments them (augmentation.py).

A source (image folder, zip, MNIST, ...) gives raw images and labels; `ImageDataset` puts each through the one
transform when it is read (in DataLoader workers); `CachedDataset` holds a whole small dataset already
transformed, as one uint8 tensor [N, C, H, W], so that a batch is one indexing operation and no image is decoded
twice. `build_dataset` picks the cache for in-memory datasets (MNIST, CIFAR-10, digits) and for any dataset
whose transformed images take at most CACHE_AUTO_BYTES, unless `dataset.cache` says otherwise.
"""

import functools
import gzip
import importlib.util
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UsageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CACHE_AUTO_BYTES = 2 * 2**30  # dataset.cache null: cache when the transformed images take at most this (per process)


# The transform -------------------------------------------------------------------------------------------

def open_image(file, size=None):
    """Open and decode an image file (path or file object). With `size` (height, width), a JPEG is decoded at
    the smallest power-of-two reduction that still covers it (PIL's draft), which the resize needs anyway."""
    image = Image.open(file)
    if size is not None and image.format == "JPEG":
        image.draft(None, (size[1], size[0]))
    image.load()
    return image


def to_model_image(image, size, channels: int) -> torch.Tensor:
    """The one transform: resize (bicubic, antialiased) so the image covers `size` (height, width), center crop,
    convert to `channels` channels (gray <-> RGB); returns uint8 [channels, height, width].

    Takes a PIL image, a uint8 array [H, W] or [H, W, C], or a uint8 tensor [C, H, W] already at the model's
    size and channels (returned as it is).
    """
    height, width = size
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8 and image.shape == (channels, height, width):
            return image
        raise ValueError(f"expected a PIL image, a uint8 array or a uint8 tensor [{channels}, {height}, {width}], "
                         f"got a {image.dtype} tensor {list(image.shape)}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 array [H, W] or [H, W, C], got {image.dtype} {list(image.shape)}")
        array = image if image.ndim == 3 else image[..., None]
        if array.shape == (height, width, channels):  # nothing to do but the layout
            return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
        image = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[..., 0])
    if image.mode in ("I", "F") or image.mode.startswith("I;"):  # PIL's convert would clip them at 255
        raise ValueError(f"mode {image.mode}, more than 8 bits per channel; convert the images to 8 bits first")
    image = image.convert("L" if channels == 1 else "RGB")
    scale = max(height / image.height, width / image.width)
    if scale != 1:
        new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(new_size, Image.BICUBIC, reducing_gap=None)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8).reshape(height, width, -1)
    if channels not in (1, 3):  # e.g. 4 channels: repeat the gray (or first) channel
        array = np.repeat(array[..., :1], channels, axis=-1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1)  # in place: one pass fewer over the batch


# Sources: raw images and labels --------------------------------------------------------------------------
#
# A source has __len__, __getitem__(i) -> (image, label) with image anything to_model_image takes, `labels`
# (an int array, or None when they are only known item by item), `class_names` (a list, possibly empty) and
# name(i), which names item i in error messages (a file, a row).

class ImageFolderSource:
    """All images under a folder, recursively; labels from first-level subfolders when `by_folder`."""

    def __init__(self, root, by_folder=False, size=None):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise UsageError(f"dataset.location: {root}: no such folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise UsageError(f"dataset.location: {root}: no images found (extensions: "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.class_names, self.labels = [], None
        if by_folder:
            parts = [p.relative_to(self.root).parts for p in self.paths]
            loose = [p for p, part in zip(self.paths, parts) if len(part) == 1]
            if loose:
                raise UsageError(f"dataset.location: {root}: classes come from subfolders, but {loose[0].name} "
                                 f"is not in one")
            self.class_names = sorted({part[0] for part in parts})
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = np.array([index[part[0]] for part in parts], dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return open_image(self.paths[i], self.size), 0 if self.labels is None else int(self.labels[i])

    def name(self, i):
        return str(self.paths[i])


class ZipSource:
    """A zip file or folder of images with an optional dataset.json (`{"labels": [["img.png", 0], ...]}`),
    the StyleGAN / EDM / DiffiT dataset layout. Images are all image files inside, in sorted path order."""

    def __init__(self, location, size=None):
        self.location, self.size = Path(location), size
        self.is_zip = self.location.is_file()
        self._zip, self._zip_pid = None, None
        if self.is_zip:
            try:
                names = self._zipfile().namelist()
            except zipfile.BadZipFile as error:
                raise UsageError(f"dataset.location: {location}: not a zip file ({error})") from None
        elif self.location.is_dir():
            names = [p.relative_to(self.location).as_posix() for p in self.location.rglob("*") if p.is_file()]
        else:
            raise UsageError(f"dataset.location: {location}: no such zip file or folder")
        self.names = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS and not n.endswith("/"))
        if not self.names:
            raise UsageError(f"dataset.location: {location}: no images found (extensions: "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.class_names, self.labels = [], None
        if "dataset.json" in names:
            self.labels = self._read_labels()

    def _zipfile(self):
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per process: workers must not share
            self._zip, self._zip_pid = zipfile.ZipFile(self.location), os.getpid()
        return self._zip

    def _open(self, name):
        return self._zipfile().open(name) if self.is_zip else open(self.location / name, "rb")

    def _read_labels(self):
        where = f"{self.location}{'!' if self.is_zip else '/'}dataset.json"
        try:
            with self._open("dataset.json") as f:
                meta = json.load(f)
        except (ValueError, OSError) as error:
            raise UsageError(f"{where}: cannot read it as JSON ({error})") from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if entries is None:
            return None  # StyleGAN writes "labels": null for unlabelled datasets
        if not isinstance(entries, list):
            raise UsageError(f"{where}: 'labels' must be a list of [file name, class] pairs")
        labels = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise UsageError(f"{where}: expected a [file name, class] pair in 'labels', "
                                 f"got {json.dumps(entry)[:80]}")
            if not isinstance(entry[1], int) or isinstance(entry[1], bool):
                raise UsageError(f"{where}: {entry[0]}: expected an integer class label, "
                                 f"got {json.dumps(entry[1])[:80]}")
            labels[entry[0]] = entry[1]
        unlabelled = [name for name in self.names if name not in labels]
        if unlabelled:
            raise UsageError(f"{where}: no label for {unlabelled[0]}" + (f" (and {len(unlabelled) - 1} more images)"
                                                                          if len(unlabelled) > 1 else ""))
        missing = sorted(set(labels) - set(self.names))
        if missing:
            raise UsageError(f"{where}: labels {missing[0]}, which is not an image in {self.location}")
        return np.array([labels[name] for name in self.names], dtype=np.int64)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        with self._open(self.names[i]) as f:
            return open_image(f, self.size), 0 if self.labels is None else int(self.labels[i])

    def name(self, i):
        return f"{self.location}{'!' if self.is_zip else '/'}{self.names[i]}"

    def __getstate__(self):  # zip handles do not cross process boundaries
        return dict(self.__dict__, _zip=None, _zip_pid=None)


class ArraySource:
    """Images held in memory as a uint8 array [N, H, W] or [N, H, W, C]."""

    def __init__(self, images, labels, class_names=(), description="image"):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.class_names, self.description = list(class_names), description

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def name(self, i):
        return f"{self.description} {i}"


class HuggingFaceSource:
    """A `datasets.Dataset`: images from column `image_key`, labels from `class_key` (or none)."""

    def __init__(self, dataset, location, image_key, class_key, size=None):
        self.location, self.image_key, self.class_key, self.size = location, image_key, class_key, size
        for key, column in (("image_key", image_key), ("class_key", class_key)):
            if column is not None and column not in dataset.column_names:
                raise UsageError(f"dataset.{key}: {location} has no column {column!r} "
                                 f"(columns: {', '.join(dataset.column_names)})")
        self.dataset = dataset.select_columns([image_key])
        if getattr(dataset.features[image_key], "decode", False):  # an Image feature: decode it here, with draft
            self.dataset = self.dataset.cast_column(image_key, type(dataset.features[image_key])(decode=False))
        self.class_names, self.labels = [], None
        if class_key is not None:
            feature = dataset.features[class_key]
            values = np.asarray(dataset[class_key])
            if values.dtype.kind in "iu":
                self.labels = values.astype(np.int64)
                self.class_names = list(getattr(feature, "names", None) or [])
            elif values.dtype.kind in "UO" and all(isinstance(v, str) for v in values[:1000]):
                self.class_names = sorted(set(values.tolist()))  # class names: sorted, as folders
                index = {name: i for i, name in enumerate(self.class_names)}
                self.labels = np.array([index[v] for v in values.tolist()], dtype=np.int64)
            else:
                raise UsageError(f"dataset.class_key: column {class_key!r} of {location} holds {values.dtype} "
                                 f"values; expected integer class labels or class names")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image = self.dataset[i][self.image_key]
        if isinstance(image, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            image = open_image(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"], self.size)
        elif isinstance(image, (bytes, bytearray)):
            image = open_image(io.BytesIO(image), self.size)
        elif not isinstance(image, Image.Image):
            image = np.asarray(image)
        return image, 0 if self.labels is None else int(self.labels[i])

    def name(self, i):
        return f"{self.location} row {i}"


class CustomSource:
    """The dataset returned by a user's get_dataset(config, transform=transform) (k-diffusion's custom type).

    Items may be (image, label) tuples, dicts keyed by image_key / class_key, or bare images; an image may be
    anything to_model_image takes (the `transform` passed in returns the finished uint8 tensor).
    """

    def __init__(self, dataset, location, image_key, class_key, labelled):
        self.dataset, self.location = dataset, location
        self.image_key, self.class_key, self.labelled = image_key, class_key, labelled
        self.class_names = list(getattr(dataset, "classes", None) or []) if labelled else []
        self.labels = None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if isinstance(item, dict):
            if self.image_key not in item:
                raise UsageError(f"dataset.image_key: item {i} of {self.location} has no key {self.image_key!r} "
                                 f"(keys: {', '.join(map(str, item))})")
            if self.labelled and (self.class_key is None or self.class_key not in item):
                raise UsageError(f"dataset.class_key: item {i} of {self.location} is a dict without the label key "
                                 f"{self.class_key!r} (keys: {', '.join(map(str, item))})")
            return item[self.image_key], int(item[self.class_key]) if self.labelled else 0
        if isinstance(item, (tuple, list)):
            if self.labelled and len(item) < 2:
                raise UsageError(f"dataset.num_classes: item {i} of {self.location} has no label (a 1-tuple)")
            return item[0], int(item[1]) if self.labelled else 0
        if self.labelled:
            raise UsageError(f"dataset.num_classes: item {i} of {self.location} is a bare image without a label")
        return item, 0

    def name(self, i):
        return f"{self.location} item {i}"


# Loading the sources ---------------------------------------------------------------------------------------

def digits_source():
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 16 gray levels): real data, no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("dataset.type 'digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return ArraySource(images, digits.target, [str(i) for i in range(10)], "digits image")


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def read_idx(path):
    """An IDX file (MNIST's format; plain or .gz) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise UsageError(f"{path}: cannot read ({error})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UsageError(f"{path}: not an IDX file of unsigned bytes (MNIST's format)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise UsageError(f"{path}: truncated: header says {shape}, found {len(data) - offset} bytes of data")
    return np.frombuffer(bytearray(data), np.uint8, offset=offset).reshape(shape)


def mnist_source(root, download):
    """MNIST's 60,000 training digits from root/MNIST/raw (the IDX files, plain or gzipped: torchvision's layout).
    Missing files are downloaded with torchvision when `download`."""
    raw = Path(root) / "MNIST" / "raw"

    def find(name):
        return next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)

    if download and not all(map(find, MNIST_FILES)):
        from ._torchvision import import_torchvision
        try:
            import_torchvision().datasets.MNIST(root, train=True, download=True)
        except (RuntimeError, OSError) as error:
            raise UsageError(f"dataset.location: could not download mnist into {raw} ({error}); put "
                             f"{' and '.join(MNIST_FILES)} (or their .gz) there, or fix the network") from None
    paths = [find(name) for name in MNIST_FILES]
    if not all(paths):
        raise UsageError(f"dataset.location: mnist not found at {raw}: expected {' and '.join(MNIST_FILES)} "
                         f"(or the same names with .gz); put them there or set dataset.download to true")
    images, labels = map(read_idx, paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise UsageError(f"{paths[1]}: {labels.shape[0]} labels for {images.shape[0]} images in {paths[0]}")
    return ArraySource(images, labels, [str(i) for i in range(10)], f"{paths[0]} image")


def cifar10_source(root, download):
    from ._torchvision import import_torchvision

    folder = Path(root) / "cifar-10-batches-py"
    try:
        dataset = import_torchvision().datasets.CIFAR10(root, train=True, download=download)
    except RuntimeError as error:  # torchvision says "Dataset not found or corrupted" when the files are missing
        raise UsageError(f"dataset.location: cifar10 not found at {folder}: expected data_batch_1 ... data_batch_5 "
                         f"and batches.meta (the python version, or cifar-10-python.tar.gz in {root}); set "
                         f"dataset.download to true with internet access, or put the files there ({error})") from None
    except OSError as error:  # network failure during download
        raise UsageError(f"dataset.location: could not download cifar10 into {root} ({error}); put "
                         f"cifar-10-batches-py/ (data_batch_1 ... data_batch_5, batches.meta) there") from None
    return ArraySource(dataset.data, dataset.targets, dataset.classes, f"{folder} image")


def huggingface_source(dataset_config, size=None):
    """datasets.load_dataset(location, name=..., split=...): a Hub name, a local folder (parquet files, an image
    folder, ...), a data file (.parquet, .arrow, .csv, .json, .jsonl) or a save_to_disk folder."""
    location, name, split = dataset_config["location"], dataset_config["name"], dataset_config["split"]
    try:
        import datasets
    except ImportError:
        raise UsageError("dataset.type 'huggingface' needs the datasets package: pip install datasets "
                         "(or pip install hdiffusion[huggingface])") from None
    path = Path(location).expanduser()
    builders = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UsageError(f"dataset.split: {location} has no split {split!r} "
                                     f"(splits: {', '.join(dataset)})")
                dataset = dataset[split]
        elif path.suffix.lower() in builders and (path.is_file() or any(c in location for c in "*?[")):
            base_split = re.split(r"[\[+]", split)[0]  # 'train[:10%]' reads data_files['train']
            dataset = datasets.load_dataset(builders[path.suffix.lower()], data_files={base_split: str(path)},
                                            split=split)
        else:
            dataset = datasets.load_dataset(str(path) if path.exists() else location, name=name, split=split)
    except UsageError:
        raise
    except Exception as error:  # datasets raises many kinds: ConnectionError, FileNotFoundError, ValueError, ...
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not path.exists() and _hub_offline():
            raise UsageError(f"dataset.location: {location!r} is not a local path and the Hugging Face Hub is "
                             f"offline (HF_HUB_OFFLINE=1), with no cached copy; load it once online, or give a local "
                             f"folder or data file ({message})") from None
        key = "split" if "split" in message.lower() else "name" if "config" in message.lower() else "location"
        raise UsageError(f"dataset.{key}: cannot load the Hugging Face dataset {location!r} "
                         f"(name={name!r}, split={split!r}): {message}") from None
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise UsageError(f"dataset.split: {location} gave a {type(dataset).__name__}, expected one split "
                         f"as a map-style Dataset")
    return HuggingFaceSource(dataset, location, dataset_config["image_key"], dataset_config["class_key"], size)


def _hub_offline():
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def custom_source(dataset_config, size, channels, config_dir):
    """k-diffusion's custom type: `get_dataset(config, transform=transform)` from the Python file at location,
    relative to the config file's folder."""
    path = (Path(config_dir or ".") / dataset_config["location"]).resolve()
    if not path.is_file():
        raise UsageError(f"dataset.location: {path}: no such Python file")
    module_name = "hdiffusion_custom_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that DataLoader workers can unpickle the dataset's classes
    spec.loader.exec_module(module)
    function = getattr(module, dataset_config["get_dataset"], None)
    if not callable(function):
        raise UsageError(f"dataset.get_dataset: {path} defines no function {dataset_config['get_dataset']!r}")

    transform = functools.partial(to_model_image, size=size, channels=channels)  # picklable, for workers
    dataset = function(dataset_config["config"], transform=transform)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise UsageError(f"dataset.get_dataset: {path}: {dataset_config['get_dataset']} returned a "
                         f"{type(dataset).__name__}, expected a map-style dataset (with __len__ and __getitem__)")
    return CustomSource(dataset, path, dataset_config["image_key"], dataset_config["class_key"],
                        labelled=dataset_config["num_classes"] > 0)


# Datasets: transformed on read, or cached -----------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """A source's items through the transform, one at a time (in DataLoader workers).

    An unreadable image is a UsageError naming its file; with `skip_bad_images` it is replaced by the next
    readable item instead (so a batch keeps its size and the order stays a function of the step), with a
    warning line on stderr.
    """

    def __init__(self, source, size, channels, num_classes=0, skip_bad_images=False):
        self.source, self.size, self.channels = source, tuple(size), channels
        self.num_classes, self.skip_bad_images = num_classes, skip_bad_images
        self.class_names = source.class_names if num_classes else []
        self._skipped = set()

    def __len__(self):
        return len(self.source)

    def load(self, index):
        """(uint8 image, label) of item `index`; a UsageError naming the item if it cannot be read."""
        try:
            image, label = self.source[index]
            image = to_model_image(image, self.size, self.channels)
        except UsageError:
            raise
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise UsageError(f"{self.source.name(index)}: cannot read image ({error})") from None
        if self.num_classes and not 0 <= label < self.num_classes:
            raise UsageError(label_problem(self.source.name(index), label, self.num_classes))
        return image, label if self.num_classes else 0

    def __getitem__(self, index):
        if not self.skip_bad_images:
            return self.load(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return self.load(candidate)
            except UsageError as error:
                if "cannot read image" not in str(error):
                    raise
                if candidate not in self._skipped:
                    self._skipped.add(candidate)
                    print(f"warning: skipping unreadable image {error}", file=sys.stderr)
        raise UsageError(f"dataset: no readable image in {len(self)} items")


class CachedDataset(torch.utils.data.Dataset):
    """A whole dataset, transformed, as uint8 images [N, C, H, W] and int64 labels [N]."""

    def __init__(self, images, labels, class_names=(), skipped=()):
        self.images, self.labels = images, labels
        self.class_names, self.skipped = list(class_names), list(skipped)  # skipped: messages of unreadable images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def batch(self, indices, pin_memory=False):
        """The images and labels at `indices`, gathered into page-locked memory if `pin_memory`: CUDA may make a
        copy to the GPU from pageable memory (staged through a buffer of its own) wait for the work queued before
        it, so that the host cannot run ahead; from pinned memory the copy is asynchronous."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = torch.empty((len(index), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=pin_memory)
        labels = torch.empty(len(index), dtype=self.labels.dtype, pin_memory=pin_memory)
        return torch.index_select(self.images, 0, index, out=images), torch.index_select(self.labels, 0, index,
                                                                                          out=labels)


def label_problem(name, label, num_classes):
    return (f"dataset.num_classes: {name} has label {label}, so num_classes must be at least {label + 1}, "
            f"got {num_classes}" if label >= num_classes else
            f"{name}: label {label} is negative; class labels must be in 0..{num_classes - 1}")


def check_labels(source, num_classes):
    """Fail early, naming the item, when the source's labels are known and one is outside [0, num_classes)."""
    if not num_classes:
        return
    if source.labels is None:
        if not isinstance(source, CustomSource):  # a custom source's labels are checked as they are read
            raise UsageError(f"dataset.num_classes: {num_classes} classes, but the dataset has no labels; "
                             "set num_classes to 0 or give labelled data")
        return
    bad = np.flatnonzero((source.labels < 0) | (source.labels >= num_classes))
    if len(bad):
        worst = bad[np.argmax(source.labels[bad])] if source.labels[bad].max() >= num_classes else bad[0]
        raise UsageError(label_problem(source.name(int(worst)), int(source.labels[worst]), num_classes))


class _CacheItems(torch.utils.data.Dataset):
    """ImageDataset items for building a cache: (image, label, error message or None), never raising for an
    unreadable image (its image is zeros), so that the main process decides (skip or fail) and reports one line."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            image, label = self.dataset.load(index)
            return image, label, None
        except UsageError as error:
            return torch.zeros([self.dataset.channels, *self.dataset.size], dtype=torch.uint8), 0, str(error)


def _collate_cache_items(items):
    images, labels, errors = zip(*items)  # one stacked tensor per batch: cheap to send from a worker
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), errors


def cache_dataset(dataset: ImageDataset, num_workers=0, progress=False) -> CachedDataset:
    """Decode and transform every image once (in `num_workers` processes) into a CachedDataset."""
    source, n = dataset.source, len(dataset)
    if isinstance(source, ArraySource) and source.images.ndim in (3, 4):
        images = source.images if source.images.ndim == 4 else source.images[..., None]
        if images.shape[1:] == (*dataset.size, dataset.channels) and images.dtype == np.uint8:  # no work but layout
            labels = torch.from_numpy(source.labels if dataset.num_classes else np.zeros(n, np.int64))
            return CachedDataset(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous(),
                                 labels, dataset.class_names)
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_CacheItems(dataset), batch_size=256, num_workers=num_workers,
                                         collate_fn=_collate_cache_items)
    images = torch.empty([n, dataset.channels, *dataset.size], dtype=torch.uint8)
    labels = torch.empty([n], dtype=torch.long)
    kept, skipped = 0, []
    for batch_images, batch_labels, errors in tqdm(loader, total=len(loader), desc=f"caching {n:,} images",
                                                   unit="batch", disable=not progress, leave=False):
        good = [i for i, error in enumerate(errors) if error is None]
        for error in errors:
            if error is not None and (not dataset.skip_bad_images or "cannot read image" not in error):
                raise UsageError(error)
        skipped += [error for error in errors if error is not None]
        images[kept:kept + len(good)] = batch_images[good]
        labels[kept:kept + len(good)] = batch_labels[good]
        kept += len(good)
    if not kept:
        raise UsageError(f"dataset: none of the {n:,} images could be read (first: {skipped[0]})")
    return CachedDataset(images[:kept].clone() if kept < n else images, labels[:kept], dataset.class_names, skipped)


def build_dataset(config, config_dir=None, num_workers=0, progress=False):
    """The training set of a validated config: a CachedDataset or an ImageDataset of (uint8 image, label).

    config_dir: the config file's folder (custom datasets are found relative to it); num_workers: processes for
    decoding when building a cache.
    """
    dataset_config, model_config = config["dataset"], config["model"]
    size, channels = tuple(model_config["input_size"]), model_config["input_channels"]
    kind, location, num_classes = dataset_config["type"], dataset_config["location"], dataset_config["num_classes"]
    if kind in ("imagefolder", "imagefolder-class"):
        by_folder = kind == "imagefolder-class" or dataset_config.get("classes") == "folders"
        source = ImageFolderSource(location, by_folder=by_folder, size=size)
        if by_folder and len(source.class_names) != num_classes:
            raise UsageError(f"dataset.num_classes: {location} has {len(source.class_names)} class folders, "
                             f"config says {num_classes}")
    elif kind == "zip":
        source = ZipSource(location, size=size)
    elif kind == "mnist":
        source = mnist_source(location, dataset_config["download"])
    elif kind == "cifar10":
        source = cifar10_source(location, dataset_config["download"])
    elif kind == "digits":
        source = digits_source()
    elif kind == "huggingface":
        source = huggingface_source(dataset_config, size)
    elif kind == "custom":
        source = custom_source(dataset_config, size, channels, config_dir)
    else:
        raise UsageError(f"dataset.type: unknown type {kind!r}")
    check_labels(source, num_classes)
    dataset = ImageDataset(source, size, channels, num_classes, dataset_config.get("skip_bad_images", False))
    cache = dataset_config.get("cache")
    if cache is None:
        cache = isinstance(source, ArraySource) or len(dataset) * channels * size[0] * size[1] <= CACHE_AUTO_BYTES
    return cache_dataset(dataset, num_workers, progress) if cache else dataset


def describe_dataset(dataset) -> str:
    """One line for the training log: size, caching, skipped images."""
    if isinstance(dataset, CachedDataset):
        text = f"{len(dataset):,} images, cached as uint8 ({dataset.images.numel() / 2**20:,.1f} MiB)"
        if dataset.skipped:
            text += f"; skipped {len(dataset.skipped):,} unreadable (first: {dataset.skipped[0]})"
        return text
    return f"{len(dataset):,} images, decoded as they are read"


# Order ---------------------------------------------------------------------------------------------------

class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of dataset indices, from optimizer step `start_step` on, forever.

    The data order is one stream of positions: epoch e is a permutation of the dataset drawn from (seed, e),
    and optimizer step t consumes positions [t * B, (t + 1) * B) of it, B the global batch. Each step's B
    indices are cut into `accum_steps` micro-batches and each of those across processes. So the order depends
    only on the step, never on what ran before: resuming at step t continues exactly, and a change in the number
    of processes keeps the same global batches (only who computes which part changes).
    """

    def __init__(self, dataset_size, global_batch, accum_steps, num_processes, process_index, seed, start_step=0):
        if global_batch % (accum_steps * num_processes):
            raise UsageError(f"--batch-size {global_batch} must be divisible by --grad-accum-steps x processes "
                             f"= {accum_steps * num_processes}")
        if dataset_size < global_batch:
            raise UsageError(f"dataset: {dataset_size} images is fewer than --batch-size {global_batch}; "
                             f"use a smaller batch or more images")
        self.n, self.global_batch, self.accum_steps = dataset_size, global_batch, accum_steps
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.start_step = seed, start_step
        self.micro_batch = global_batch // (accum_steps * num_processes)
        self._epoch, self._permutation = None, None

    def positions_to_indices(self, positions):
        out = []
        for position in positions:
            epoch = position // self.n
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._permutation = epoch, torch.randperm(self.n, generator=generator).tolist()
            out.append(self._permutation[position % self.n])
        return out

    def step_batches(self, step):
        """This process's `accum_steps` micro-batches for optimizer step `step`."""
        start = step * self.global_batch
        batches = []
        for accum in range(self.accum_steps):
            first = start + (accum * self.num_processes + self.process_index) * self.micro_batch
            batches.append(self.positions_to_indices(range(first, first + self.micro_batch)))
        return batches

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.step_batches(step)
            step += 1


def infinite_loader(dataset, sampler, num_workers, pin_memory=False):
    """Batches (uint8 images [B, C, H, W], int64 labels [B]) in the sampler's order, forever, in page-locked
    memory if `pin_memory` (for copies to a GPU). A cached dataset is indexed in this process; others are decoded
    by `num_workers` DataLoader workers."""
    if isinstance(dataset, CachedDataset):
        return (dataset.batch(indices, pin_memory) for indices in sampler)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, pin_memory=pin_memory)
    return _one_line_errors(iter(loader))


def _one_line_errors(batches):
    """Re-raise a UsageError from a DataLoader worker as its own one line, without the worker's traceback."""
    try:
        yield from batches
    except UsageError as error:
        lines = str(error).strip().splitlines()
        raise UsageError(re.sub(r"^[\w.]*UsageError: ", "", lines[-1]) if lines else "data loading failed") from None
