import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from hdiffusion.data import StepBatchSampler, build_dataset, to_model_image
from hdiffusion.errors import UsageError


def config(dataset, size=(8, 8), channels=1):
    dataset = dict({"num_classes": 0, "download": False, "classes": None}, **dataset)
    return {"dataset": dataset, "model": {"input_size": list(size), "input_channels": channels}}


def test_transform_center_crops_and_scales_to_unit_range():
    # 8 wide x 4 high: left half black, right half white; a 4x4 center crop keeps columns 2..5.
    array = np.zeros((4, 8), np.uint8)
    array[:, 4:] = 255
    out = to_model_image(Image.fromarray(array), (4, 4), channels=1)
    assert out.shape == (1, 4, 4)
    assert out[0, :, :2].eq(-1).all() and out[0, :, 2:].eq(1).all()
    rgb = to_model_image(Image.fromarray(array), (2, 4), channels=3)
    assert rgb.shape == (3, 2, 4) and rgb.min() >= -1 and rgb.max() <= 1
    torch.testing.assert_close(rgb[0], rgb[2])  # gray -> RGB repeats the channel


def write_image(path, size, mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_imagefolder_recursive_with_folder_classes(tmp_path):
    write_image(tmp_path / "cat" / "a.png", (10, 12))
    write_image(tmp_path / "cat" / "deep" / "b.jpg", (30, 20), mode="L")
    write_image(tmp_path / "dog" / "c.png", (8, 8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    dataset = build_dataset(config({"type": "imagefolder", "location": str(tmp_path), "classes": "folders",
                                    "num_classes": 2}, size=(6, 10), channels=3))
    assert len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    assert all(image.shape == (3, 6, 10) for image, _ in items)
    assert [label for _, label in items] == [0, 0, 1]
    unlabeled = build_dataset(config({"type": "imagefolder", "location": str(tmp_path)}))
    assert [label for _, label in (unlabeled[i] for i in range(3))] == [0, 0, 0]


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="no images found"):
        build_dataset(config({"type": "imagefolder", "location": str(tmp_path)}))
    with pytest.raises(UsageError, match="no such folder"):
        build_dataset(config({"type": "imagefolder", "location": str(tmp_path / "missing")}))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    dataset = build_dataset(config({"type": "imagefolder", "location": str(tmp_path)}))
    with pytest.raises(UsageError, match="broken.png: cannot read image"):
        dataset[0]
    with pytest.raises(UsageError, match="classes come from subfolders, but broken.png is not in one"):
        build_dataset(config({"type": "imagefolder-class", "location": str(tmp_path), "num_classes": 1}))
    write_image(tmp_path / "labeled" / "a" / "x.png", (4, 4))
    with pytest.raises(UsageError, match="has 1 class folders, config says 3"):
        build_dataset(config({"type": "imagefolder-class", "location": str(tmp_path / "labeled"), "num_classes": 3}))


def test_mnist_from_real_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        with gzip.open(SHARED_DATA / "MNIST" / "raw" / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    dataset = build_dataset(config({"type": "mnist", "location": str(tmp_path), "num_classes": 10}, size=(28, 28)))
    assert len(dataset) == 60000
    image, label = dataset[0]
    assert label == 5 and image.shape == (1, 28, 28)  # the famous first MNIST digit is a 5
    assert image.min() == -1 and image.max() == 1


def test_mnist_missing_offline_names_the_folder(tmp_path):
    with pytest.raises(UsageError, match=f"mnist not found at {tmp_path}/MNIST/raw"):
        build_dataset(config({"type": "mnist", "location": str(tmp_path)}))


def test_digits_and_label_range():
    dataset = build_dataset(config({"type": "digits", "num_classes": 10}, size=(16, 16)))
    assert len(dataset) == 1797
    labels = {dataset[i][1] for i in range(100)}
    assert labels == set(range(10))
    with pytest.raises(UsageError, match="num_classes must be at least 10, got 5"):
        build_dataset(config({"type": "digits", "num_classes": 5}))


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
    with pytest.raises(UsageError, match="fewer than --batch-size"):
        StepBatchSampler(5, 8, 1, 1, 0, seed=0)
