"""Every dataset type on real data (MNIST's raw files, CIFAR-10's parquet, folders and zips made from a few of
those images), checked against the source: shapes, values, labels, errors, and the determinism of the loader."""

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import ROOT, SHARED_DATA, tiny_config
from hdiffusion.augmentation import augment_batch
from hdiffusion.config import validate_config
from hdiffusion.data import (CachedDataset, ImageDataset, StepBatchSampler, build_dataset, infinite_loader,
                             to_model_image, to_unit_range)
from hdiffusion.errors import UsageError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def config(dataset, size=(8, 8), channels=1):
    """A validated config (every dataset default filled in) for images of `size` and `channels`."""
    full = validate_config(tiny_config(**dict({"download": False}, **dataset)), "test")
    full["model"].update(input_size=list(size), input_channels=channels)
    return full


def items(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), list(map(int, labels))


@pytest.fixture(scope="module")
def cifar_rows():
    """60 CIFAR-10 training images as decoded straight from the parquet file (uint8 [32, 32, 3]) and labels,
    6 of each class; read with pyarrow and PIL, independently of the datasets package."""
    table = pq.read_table(SHARED_DATA / "cifar10" / "train.parquet")
    rows = [label * 5000 + k * 97 for label in range(10) for k in range(6)]  # the file is sorted by label
    images = [np.asarray(Image.open(io.BytesIO(table.column("image")[r]["bytes"].as_py())).convert("RGB"))
              for r in rows]
    labels = [table.column("label")[r].as_py() for r in rows]
    return images, labels


def write_cifar_folder(root, images, labels, nested=False):
    """PNG files (lossless) in one folder per class name; returns the paths in sorted order."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / CIFAR_CLASSES[label] / ("deep" if nested and i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


# The transform -------------------------------------------------------------------------------------------

def test_transform_center_crops_and_scales_to_unit_range():
    # 8 wide x 4 high: left half black, right half white; a 4x4 center crop keeps columns 2..5.
    array = np.zeros((4, 8), np.uint8)
    array[:, 4:] = 255
    out = to_model_image(Image.fromarray(array), (4, 4), channels=1)
    assert out.dtype == torch.uint8 and out.shape == (1, 4, 4)
    unit = to_unit_range(out)
    assert unit[0, :, :2].eq(-1).all() and unit[0, :, 2:].eq(1).all()
    rgb = to_model_image(Image.fromarray(array), (2, 4), channels=3)
    assert rgb.shape == (3, 2, 4)
    assert torch.equal(rgb[0], rgb[2])  # gray -> RGB repeats the channel
    assert torch.equal(to_model_image(array, (4, 4), 1), out)  # arrays take the same path


def test_transform_resizes_to_cover_non_square():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    out = to_model_image(image, (6, 10), channels=1)  # 30 wide -> 10: scale 1/3, then crop 40/3 high to 6
    assert out.shape == (1, 6, 10)
    expected = np.asarray(image.convert("L").resize((10, 13), Image.BICUBIC, reducing_gap=None))[3:9]
    assert np.array_equal(out[0].numpy(), expected)


# Types ----------------------------------------------------------------------------------------------------

def test_mnist_from_the_raw_gz_files_equals_torchvision(tmp_path):
    # The shared folder holds torchvision's layout, gzipped only, read-only: read in place, nothing written.
    dataset = build_dataset(config({"type": "mnist", "location": str(SHARED_DATA), "num_classes": 10}, (28, 28)))
    assert isinstance(dataset, CachedDataset) and len(dataset) == 60000
    assert dataset.images.shape == (60000, 1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.class_names == [str(i) for i in range(10)]
    image, label = dataset[0]
    assert label == 5  # the famous first MNIST digit is a 5
    assert to_unit_range(image).min() == -1 and to_unit_range(image).max() == 1
    # torchvision's own reader on the unzipped files gives the same images and labels.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        with gzip.open(SHARED_DATA / "MNIST" / "raw" / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    from hdiffusion._torchvision import import_torchvision
    reference = import_torchvision().datasets.MNIST(tmp_path, train=True, download=False)
    assert torch.equal(dataset.images[:, 0], reference.data)
    assert torch.equal(dataset.labels, reference.targets)
    # At another size and as RGB, through the same transform.
    rgb = build_dataset(config({"type": "mnist", "location": str(tmp_path), "num_classes": 10}, (32, 32), 3))
    assert rgb.images.shape == (60000, 3, 32, 32)
    assert torch.equal(rgb.images[7], to_model_image(reference.data[7].numpy(), (32, 32), 3))


def test_mnist_and_cifar10_missing_offline_name_the_files(tmp_path):
    with pytest.raises(UsageError, match=f"mnist not found at {tmp_path}/MNIST/raw: expected "
                                         "train-images-idx3-ubyte and train-labels-idx1-ubyte"):
        build_dataset(config({"type": "mnist", "location": str(tmp_path)}))
    with pytest.raises(UsageError, match=f"cifar10 not found at {tmp_path}/cifar-10-batches-py: expected "
                                         "data_batch_1 ... data_batch_5 and batches.meta"):
        build_dataset(config({"type": "cifar10", "location": str(tmp_path)}, (32, 32), 3))


def test_huggingface_parquet_cifar10(cifar_rows):
    parquet = SHARED_DATA / "cifar10" / "train.parquet"
    dataset = build_dataset(config({"type": "huggingface", "location": str(parquet), "class_key": "label",
                                    "num_classes": 10}, (32, 32), 3), num_workers=2)
    assert isinstance(dataset, CachedDataset) and dataset.images.shape == (50000, 3, 32, 32)
    assert dataset.class_names == CIFAR_CLASSES
    assert torch.bincount(dataset.labels).tolist() == [5000] * 10
    images, labels = cifar_rows
    rows = [label * 5000 + k * 97 for label in range(10) for k in range(6)]
    assert dataset.labels[rows].tolist() == labels
    assert all(np.array_equal(dataset.images[r].permute(1, 2, 0).numpy(), image) for r, image in zip(rows, images))


def test_huggingface_split_slices_columns_and_label_range():
    parquet = str(SHARED_DATA / "cifar10" / "test.parquet")
    base = {"type": "huggingface", "location": parquet, "class_key": "label", "num_classes": 10, "cache": False,
            "split": "train[:20]+train[9980:]"}
    dataset = build_dataset(config(base, (16, 16), 1))
    assert isinstance(dataset, ImageDataset) and len(dataset) == 40
    images, labels = items(dataset)
    assert images.shape == (40, 1, 16, 16) and labels == [0] * 20 + [9] * 20
    with pytest.raises(UsageError, match=f"dataset.image_key: {parquet} has no column 'img' "
                                         r"\(columns: image, label\)"):
        build_dataset(config(dict(base, image_key="img")))
    with pytest.raises(UsageError, match="dataset.class_key: .* has no column 'labels'"):
        build_dataset(config(dict(base, class_key="labels")))
    with pytest.raises(UsageError, match=f"dataset.num_classes: {parquet} row 20 has label 9, so num_classes "
                                         "must be at least 10, got 5"):
        build_dataset(config(dict(base, num_classes=5)))
    folder = SHARED_DATA / "cifar10"  # a folder of train.parquet and test.parquet: two splits
    assert len(build_dataset(config(dict(base, location=str(folder), split="test[:8]")))) == 8
    with pytest.raises(UsageError, match='dataset.split: cannot load the Hugging Face dataset .*'
                                         'Unknown split "validation"'):
        build_dataset(config(dict(base, location=str(folder), split="validation")))


def test_huggingface_local_image_folder(tmp_path, cifar_rows):
    images, labels = cifar_rows
    write_cifar_folder(tmp_path / "train", images[::6], labels[::6])
    dataset = build_dataset(config({"type": "huggingface", "location": str(tmp_path), "class_key": "label",
                                    "num_classes": 10}, (32, 32), 3))
    got_images, got_labels = items(dataset)
    assert dataset.class_names == CIFAR_CLASSES and sorted(got_labels) == list(range(10))
    for image, label in zip(got_images, got_labels):  # each class folder holds one image: that class's
        assert np.array_equal(image.permute(1, 2, 0).numpy(), images[6 * label])


def test_huggingface_hub_name_offline_fails_clearly_local_loads():
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_data import config
from hdiffusion.data import build_dataset
from hdiffusion.errors import UsageError
local = build_dataset(config({{"type": "huggingface", "location": {str(SHARED_DATA / 'cifar10' / 'test.parquet')!r},
                               "split": "train[:8]"}}))
print("local", len(local))
try:
    build_dataset(config({{"type": "huggingface", "location": "nelorth/oxford-flowers"}}))
except UsageError as error:
    print("error", error)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "local 8"
    assert lines[1].startswith("error dataset.location: 'nelorth/oxford-flowers' is not a local path and the "
                               "Hugging Face Hub is offline (HF_HUB_OFFLINE=1)")
    assert len(lines) == 2  # one line


def test_imagefolder_from_cifar_images(tmp_path, cifar_rows):
    images, labels = cifar_rows
    paths = write_cifar_folder(tmp_path, images, labels, nested=True)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    dataset = build_dataset(config({"type": "imagefolder", "location": str(tmp_path), "classes": "folders",
                                    "num_classes": 10}, (32, 32), 3))
    assert len(dataset) == 60 and dataset.class_names == CIFAR_CLASSES
    order = sorted(range(60), key=lambda i: paths[i])
    got_images, got_labels = items(dataset)
    assert got_labels == [labels[i] for i in order]
    assert all(np.array_equal(got_images[k].permute(1, 2, 0).numpy(), images[i]) for k, i in enumerate(order))
    same = build_dataset(config({"type": "imagefolder-class", "location": str(tmp_path), "num_classes": 10},
                                (32, 32), 3))
    assert torch.equal(same.images, dataset.images) and torch.equal(same.labels, dataset.labels)
    unlabelled = build_dataset(config({"type": "imagefolder", "location": str(tmp_path)}, (16, 24), 1))
    assert unlabelled.images.shape == (60, 1, 16, 24) and unlabelled.labels.eq(0).all()
    assert unlabelled.class_names == []


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="no images found"):
        build_dataset(config({"type": "imagefolder", "location": str(tmp_path)}))
    with pytest.raises(UsageError, match="no such folder"):
        build_dataset(config({"type": "imagefolder", "location": str(tmp_path / "missing")}))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UsageError, match=f"^{tmp_path}/broken.png: cannot read image"):
        build_dataset(config({"type": "imagefolder", "location": str(tmp_path)}))
    with pytest.raises(UsageError, match="classes come from subfolders, but broken.png is not in one"):
        build_dataset(config({"type": "imagefolder-class", "location": str(tmp_path), "num_classes": 1}))
    labelled = tmp_path / "labelled"
    (labelled / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(labelled / "a" / "x.png")
    with pytest.raises(UsageError, match="has 1 class folders, config says 3"):
        build_dataset(config({"type": "imagefolder-class", "location": str(labelled), "num_classes": 3}))


def test_skip_bad_images_counts_them(tmp_path, cifar_rows, capfd):
    images, labels = cifar_rows
    write_cifar_folder(tmp_path, images[:4], labels[:4])
    (tmp_path / "airplane" / "img001.png").write_bytes(b"\x89PNG truncated")
    base = {"type": "imagefolder", "location": str(tmp_path), "skip_bad_images": True}
    cached = build_dataset(config(base, (32, 32), 3))
    assert len(cached) == 3 and len(cached.skipped) == 1 and "img001.png: cannot read image" in cached.skipped[0]
    lazy = build_dataset(config(dict(base, cache=False), (32, 32), 3))
    assert len(lazy) == 4
    assert torch.equal(lazy[1][0], lazy[2][0])  # the next readable image takes the bad one's place
    assert "warning: skipping unreadable image" in capfd.readouterr().err


def test_loader_error_from_a_worker_is_one_line(tmp_path, cifar_rows):
    images, labels = cifar_rows
    write_cifar_folder(tmp_path, images[:8], labels[:8])
    (tmp_path / "airplane" / "img005.png").write_bytes(b"GIF89a not really")
    dataset = build_dataset(config({"type": "imagefolder", "location": str(tmp_path), "cache": False}))
    sampler = StepBatchSampler(len(dataset), 8, 1, 1, 0, seed=0)
    with pytest.raises(UsageError) as error:
        next(infinite_loader(dataset, sampler, num_workers=1))
    assert str(error.value).startswith(f"{tmp_path}/airplane/img005.png: cannot read image")
    assert "\n" not in str(error.value)


def test_zip_and_folder_with_dataset_json(tmp_path, cifar_rows):
    images, labels = cifar_rows
    names = [f"{i // 20:05d}/img{i:08d}.png" for i in range(60)]  # StyleGAN's dataset_tool names
    meta = {"labels": [[name, label] for name, label in zip(names, labels)]}
    archive = tmp_path / "cifar.zip"
    folder = tmp_path / "folder"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, image in zip(names, images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            zf.writestr(name, buffer.getvalue())
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(buffer.getvalue())
        zf.writestr("dataset.json", json.dumps(meta))
    (folder / "dataset.json").write_text(json.dumps(meta))
    for location in [archive, folder]:
        dataset = build_dataset(config({"type": "zip", "location": str(location), "num_classes": 10}, (32, 32), 3),
                                num_workers=2)
        assert dataset.labels.tolist() == labels
        assert all(np.array_equal(dataset.images[i].permute(1, 2, 0).numpy(), images[i]) for i in range(60))
    lazy = build_dataset(config({"type": "zip", "location": str(archive), "cache": False}, (16, 16), 1))
    loader = infinite_loader(lazy, StepBatchSampler(60, 12, 1, 1, 0, seed=1), num_workers=2)
    batch, batch_labels = next(loader)
    assert batch.shape == (12, 1, 16, 16) and batch.dtype == torch.uint8 and batch_labels.eq(0).all()

    with pytest.raises(UsageError, match=f"dataset.num_classes: {folder}/00002/img00000054.png has label 9, so "
                                         "num_classes must be at least 10, got 8"):
        build_dataset(config({"type": "zip", "location": str(folder), "num_classes": 8}))
    meta["labels"].pop(3)
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=f"{folder}/dataset.json: no label for 00000/img00000003.png"):
        build_dataset(config({"type": "zip", "location": str(folder), "num_classes": 10}))
    (folder / "dataset.json").unlink()
    with pytest.raises(UsageError, match="dataset.num_classes: 10 classes, but the dataset has no labels"):
        build_dataset(config({"type": "zip", "location": str(folder), "num_classes": 10}))
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("a.png", b"\x89PNG broken")
    with pytest.raises(UsageError, match=f"{tmp_path}/bad.zip!a.png: cannot read image"):
        build_dataset(config({"type": "zip", "location": str(tmp_path / "bad.zip")}))


def test_custom_dataset_relative_to_the_config(tmp_path, cifar_rows):
    (tmp_path / "data.py").write_text('''
import numpy as np

class Pairs:
    def __init__(self, images, labels, transform, as_dict):
        self.images, self.labels, self.transform, self.as_dict = images, labels, transform, as_dict

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.transform(self.images[i]) if self.transform else self.images[i]
        return {"pixels": image, "y": self.labels[i]} if self.as_dict else (image, self.labels[i])

def get_dataset(config, transform):
    data = np.load(config["file"])
    return Pairs(data["images"], data["labels"], transform if config["transform"] else None, config["as_dict"])
''')
    images, labels = cifar_rows
    np.savez(tmp_path / "rows.npz", images=np.stack(images), labels=np.array(labels))
    for custom, keys in [({"transform": True, "as_dict": False}, {}),
                         ({"transform": False, "as_dict": True}, {"image_key": "pixels", "class_key": "y"})]:
        dataset = build_dataset(config(dict({"type": "custom", "location": "data.py", "num_classes": 10,
                                             "config": dict(custom, file=str(tmp_path / "rows.npz"))}, **keys),
                                       (32, 32), 3), config_dir=tmp_path)
        assert dataset.labels.tolist() == labels
        assert np.array_equal(dataset.images.permute(0, 2, 3, 1).numpy(), np.stack(images))
    with pytest.raises(UsageError, match="defines no function 'make'"):
        build_dataset(config({"type": "custom", "location": "data.py", "get_dataset": "make"}), config_dir=tmp_path)


def test_digits_and_label_range():
    dataset = build_dataset(config({"type": "digits", "num_classes": 10}, size=(16, 16)))
    assert len(dataset) == 1797 and dataset.images.shape == (1797, 1, 16, 16)
    assert set(dataset.labels.tolist()) == set(range(10))
    with pytest.raises(UsageError, match="digits image 9 has label 9, so num_classes must be at least 10, got 5"):
        build_dataset(config({"type": "digits", "num_classes": 5}))


# Order and determinism -----------------------------------------------------------------------------------

def test_step_batch_sampler_order():
    n, batch = 50, 12
    single = StepBatchSampler(n, batch, accum_steps=1, num_processes=1, process_index=0, seed=3)
    steps = [single.step_batches(t)[0] for t in range(8)]
    flat = [i for b in steps for i in b]
    assert sorted(flat[:50]) == list(range(50))  # the first epoch visits every image once
    assert flat[:50] != list(range(50))
    # 2 processes x 3 accumulation steps see exactly the single-process global batch, disjointly.
    for t in range(8):
        parts = [StepBatchSampler(n, batch, 3, 2, p, seed=3).step_batches(t) for p in range(2)]
        assert sorted(i for part in parts for b in part for i in b) == sorted(steps[t])
    # Starting at step 5 continues the same stream.
    resumed = iter(StepBatchSampler(n, batch, 1, 1, 0, seed=3, start_step=5))
    assert [next(resumed) for _ in range(3)] == steps[5:8]
    with pytest.raises(UsageError, match="divisible"):
        StepBatchSampler(n, 10, 3, 1, 0, seed=0)
    with pytest.raises(UsageError, match="dataset: 5 images is fewer than --batch-size 8"):
        StepBatchSampler(5, 8, 1, 1, 0, seed=0)


def augmented_batches(dataset, seed, steps=3, num_workers=0):
    """The first steps' training inputs: loader batches through the chunk-seeded augmentation."""
    loader = infinite_loader(dataset, StepBatchSampler(len(dataset), 16, 1, 1, 0, seed=seed), num_workers)
    out = []
    for step in range(steps):
        images, labels = next(loader)
        generator = torch.Generator().manual_seed(seed * 1000 + step)
        augmented, aug_cond = augment_batch(to_unit_range(images), 0.5, False, generator)
        out.append((augmented, aug_cond, labels))
    return out


def test_loader_and_augmentation_are_deterministic_cached_or_not(tmp_path, cifar_rows):
    images, labels = cifar_rows
    write_cifar_folder(tmp_path, images, labels)
    base = {"type": "imagefolder-class", "location": str(tmp_path), "num_classes": 10}
    cached = build_dataset(config(base, (32, 32), 3))
    lazy = build_dataset(config(dict(base, cache=False), (32, 32), 3))
    assert isinstance(cached, CachedDataset) and isinstance(lazy, ImageDataset)
    first = augmented_batches(cached, seed=5)
    for again in [augmented_batches(cached, seed=5), augmented_batches(lazy, seed=5, num_workers=2)]:
        for a, b in zip(first, again):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = augmented_batches(cached, seed=6)
    assert not torch.equal(first[0][0], other[0][0])
    images_0, _, labels_0 = first[0]
    assert images_0.shape == (16, 3, 32, 32) and labels_0.max() < 10
