"""Datasets, the shared image transform, and the deterministic order in which training visits them.

Every dataset yields `(image, label)`: image a float tensor [C, H, W] in [-1, 1] at `model.input_size` with
`model.input_channels` channels, label an int (0 when the dataset has no classes).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import UsageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# The transform -------------------------------------------------------------------------------------------

def to_model_image(image: Image.Image, size, channels: int) -> torch.Tensor:
    """Resize (bicubic, antialiased) so the image covers `size`, center crop, set channels, scale to [-1, 1]."""
    height, width = size
    image = image.convert("L" if channels == 1 else "RGB")
    scale = max(height / image.height, width / image.width)
    if scale != 1:
        new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(new_size, Image.BICUBIC, reducing_gap=None)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8).reshape(height, width, -1)
    if channels not in (1, 3):  # e.g. 4 channels: repeat gray, pad RGB with its mean
        array = np.repeat(array[..., :1], channels, axis=-1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1)


class TransformedDataset(torch.utils.data.Dataset):
    """Wraps a source of (PIL image, label) pairs with the model's transform."""

    def __init__(self, source, size, channels):
        self.source, self.size, self.channels = source, tuple(size), channels

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, label = self.source[index]
        return to_model_image(image, self.size, self.channels), int(label)


# Sources -------------------------------------------------------------------------------------------------

class ImageFolderSource:
    """All images under a folder, recursively; labels from first-level subfolders when `by_folder`."""

    def __init__(self, root, by_folder=False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"dataset.location: {root}: no such folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise UsageError(f"dataset.location: {root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.class_names = []
        self.labels = [0] * len(self.paths)
        if by_folder:
            self.class_names = sorted({p.relative_to(self.root).parts[0] for p in self.paths if len(p.relative_to(self.root).parts) > 1})
            loose = [p for p in self.paths if len(p.relative_to(self.root).parts) == 1]
            if loose:
                raise UsageError(f"dataset.location: {root}: classes come from subfolders, but {loose[0].name} is not in one")
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [index[p.relative_to(self.root).parts[0]] for p in self.paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as image:
                image.load()
                return image, self.labels[i]
        except (UnidentifiedImageError, OSError) as error:
            raise UsageError(f"{self.paths[i]}: cannot read image ({error})") from None


class ArraySource:
    """Images held in memory as a uint8 array [N, H, W] or [N, H, W, C]."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), int(self.labels[i])


def digits_source():
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 16 gray levels): real data, no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("dataset.type 'digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return ArraySource(images, digits.target)


def torchvision_source(name, root, download):
    from ._torchvision import import_torchvision

    datasets = import_torchvision().datasets
    dataset_class = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    expected = {"mnist": f"{root}/MNIST/raw/train-images-idx3-ubyte (and the label file)",
                "cifar10": f"{root}/cifar-10-batches-py/"}[name]
    try:
        dataset = dataset_class(root, train=True, download=download)
    except RuntimeError as error:  # torchvision says "Dataset not found" when offline or download=False
        raise UsageError(f"dataset.location: {name} not found at {expected}; set dataset.download to true "
                         f"with internet access, or put the files there ({error})") from None
    except OSError as error:  # network failure during download
        raise UsageError(f"dataset.location: could not download {name} into {root} ({error}); "
                         f"put the files at {expected}") from None
    images = dataset.data.numpy() if torch.is_tensor(dataset.data) else dataset.data
    return ArraySource(images, np.asarray(dataset.targets))


def build_dataset(config) -> TransformedDataset:
    dataset_config, model_config = config["dataset"], config["model"]
    kind = dataset_config["type"]
    if kind in ("imagefolder", "imagefolder-class"):
        by_folder = kind == "imagefolder-class" or dataset_config.get("classes") == "folders"
        source = ImageFolderSource(dataset_config["location"], by_folder=by_folder)
        if by_folder and len(source.class_names) != dataset_config["num_classes"]:
            raise UsageError(f"dataset.num_classes: {dataset_config['location']} has {len(source.class_names)} class "
                             f"folders, config says {dataset_config['num_classes']}")
    elif kind in ("mnist", "cifar10"):
        source = torchvision_source(kind, dataset_config["location"], dataset_config["download"])
    elif kind == "digits":
        source = digits_source()
    else:
        raise UsageError(f"dataset.type: '{kind}' is accepted in configs but not implemented yet; "
                         f"use imagefolder, imagefolder-class, mnist, cifar10 or digits")
    labels = getattr(source, "labels", None)
    num_classes = dataset_config["num_classes"]
    if num_classes and labels is not None and len(labels) and int(np.max(labels)) >= num_classes:
        raise UsageError(f"dataset.num_classes: the data has label {int(np.max(labels))}, "
                         f"so num_classes must be at least {int(np.max(labels)) + 1}, got {num_classes}")
    return TransformedDataset(source, model_config["input_size"], model_config["input_channels"])


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
            raise UsageError(f"dataset: {dataset_size} images is fewer than --batch-size {global_batch}")
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


def infinite_loader(dataset, sampler, num_workers):
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    return iter(loader)

