"""Transforms, CacheDataset, FileDataset, rows_for_split and make_loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from cxrdx.data.cache import open_cache, prepare_cache
from cxrdx.data.dataset import (
    CacheDataset,
    FileDataset,
    eval_transform,
    make_loader,
    rows_for_split,
    train_transform,
)
from cxrdx.errors import CxrdxError, ImageReadError
from cxrdx.findings import FINDINGS, parse_labels

LABELS = ["No Finding", "Effusion|Mass", "Hernia", "Pneumothorax|Nodule"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    names = [f"{i // 2 + 1:08d}_{i % 2:03d}.png" for i in range(16)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)).save(root / "images" / name)
    labels = [LABELS[i % 4] for i in range(16)]
    pd.DataFrame({"Image Index": names, "Finding Labels": labels}).to_csv(root / "Data_Entry_2017.csv", index=False)
    return root


@pytest.fixture(scope="module")
def cache(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    prepare_cache(data_dir, out, size=40, progress=False)
    return open_cache(out)


def uint8_image(size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, size, size), dtype=np.uint8))


def test_train_transform_shapes_and_every_autoaugment_op_on_one_channel():
    transform = train_transform(32, mean=0.5, std=0.25)
    image = uint8_image()
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(150)]  # 150 draws from 25 sub-policies
    for out in outputs:
        assert out.shape == (1, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert len({out.numpy().tobytes() for out in outputs}) > 30  # really random
    assert any((out == 0).all(dim=0).sum() > 16 for out in outputs)  # random erasing happened
    gradient = torch.arange(40, dtype=torch.uint8).repeat(40, 1)[None] * 6
    ops = [  # the operations of the ImageNet policy, on one uint8 channel
        lambda x: F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[20.0, 0.0], fill=0),
        lambda x: F.affine(x, angle=0.0, translate=[8, 0], scale=1.0, shear=[0.0, 0.0], fill=0),
        lambda x: F.rotate(x, 30.0, fill=0),
        lambda x: F.adjust_brightness(x, 1.5),
        lambda x: F.adjust_saturation(x, 1.5),
        lambda x: F.adjust_contrast(x, 1.5),
        lambda x: F.adjust_sharpness(x, 1.9),
        lambda x: F.posterize(x, 4),
        lambda x: F.solarize(x, 128),
        F.autocontrast,
        F.equalize,
        F.invert,
    ]
    for op in ops:
        out = op(gradient)
        assert out.shape == gradient.shape and out.dtype == torch.uint8
        pil = op(F.to_pil_image(gradient))
        assert pil.mode == "L" and pil.size == (40, 40)


def test_train_transform_is_reproducible_under_a_seed():
    transform = train_transform(24)
    torch.manual_seed(3)
    first = [transform(uint8_image(seed=s)) for s in range(5)]
    torch.manual_seed(3)
    second = [transform(uint8_image(seed=s)) for s in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_eval_transform_is_deterministic_and_matches_the_formula():
    image = uint8_image()
    transform = eval_transform(24, mean=0.4, std=0.2)
    out = transform(image)
    assert out.shape == (1, 24, 24) and out.dtype == torch.float32
    assert torch.equal(out, transform(image))
    expected = (F.resize(image, [24, 24], antialias=True).float() / 255 - 0.4) / 0.2
    torch.testing.assert_close(out, expected)
    plain = train_transform(24, mean=0.4, std=0.2, autoaugment=False, hflip=False, random_erasing=0)
    assert torch.equal(plain(image), out)


def test_cache_dataset_items(cache):
    dataset = CacheDataset(cache, rows=np.array([3, 0, 5]), transform=eval_transform(32, 0.5, 0.25))
    assert len(dataset) == 3
    image, labels, name = dataset[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert labels.dtype == torch.float32 and labels.shape == (len(FINDINGS),)
    assert name == cache.index["Image Index"].iloc[3]
    np.testing.assert_array_equal(labels.numpy(), parse_labels(LABELS[3]))
    with pytest.raises(CxrdxError, match="outside"):
        CacheDataset(cache, rows=np.array([0, len(cache)]))
    raw, _, _ = CacheDataset(cache.path)[5]  # a path works; no transform: pixels / 255
    torch.testing.assert_close(raw, torch.from_numpy(cache.images[5].astype(np.float32) / 255)[None])


def test_file_dataset_equals_the_cache_path(cache, data_dir):
    transform = eval_transform(32, 0.5, 0.25)
    paths = [data_dir / "images" / name for name in cache.index["Image Index"]]
    files = FileDataset(paths, labels=cache.labels, cache_size=cache.size, transform=transform)
    cached = CacheDataset(cache, transform=transform)
    for i in (0, 7, 15):
        a, b = files[i], cached[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    _, labels, _ = FileDataset(paths[:1], cache_size=40)[0]
    assert labels.sum() == 0
    with pytest.raises(ImageReadError, match="missing.png"):
        FileDataset([data_dir / "missing.png"])[0]
    with pytest.raises(CxrdxError, match="labels of shape"):
        FileDataset(paths, labels=np.zeros((2, 14)))


def test_rows_for_split(cache):
    names = cache.index["Image Index"]
    split = pd.Series(["train", "val", "test", "train"] * 4, index=names.to_numpy()[::-1])
    rows = rows_for_split(cache, split, "val")
    assert list(rows) == sorted(rows)  # cache order
    assert set(names.iloc[rows]) == set(split.index[split == "val"])
    with pytest.raises(CxrdxError, match="'holdout'"):
        rows_for_split(cache, split, "holdout")


@pytest.mark.parametrize("workers", [0, 1])
def test_make_loader_batches(cache, workers):
    dataset = CacheDataset(cache, transform=train_transform(24))
    loader = make_loader(dataset, batch_size=6, shuffle=True, workers=workers, drop_last=True)
    assert loader.persistent_workers == (workers > 0)
    batches = list(loader)
    assert len(batches) == 2
    images, labels, names = batches[0]
    assert images.shape == (6, 1, 24, 24) and labels.shape == (6, 14) and len(names) == 6
