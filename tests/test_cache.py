"""prepare_cache / open_cache / pixel_stats: real files, independent resize, resume, failures, CLI."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cxrdx.data.cache as cache_module
from cxrdx.cli import main
from cxrdx.data.cache import open_cache, pixel_stats, prepare_cache, resize_square
from cxrdx.data.imageio import read_image
from cxrdx.data.metadata import read_metadata
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

LABELS = ["No Finding", "Effusion|Mass", "Hernia", "Atelectasis|Cardiomegaly|Nodule"]


def make_dataset(root: Path, n: int = 24, seed: int = 0) -> Path:
    """n small PNGs in images/ (one RGBA, one 16-bit, one not square) and a minimal Data_Entry table."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    names = [f"{i // 3 + 1:08d}_{i % 3:03d}.png" for i in range(n)]
    for i, name in enumerate(names):
        pixels = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        if i == 1:
            image = Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA")
        elif i == 2:
            image = Image.fromarray(pixels.astype(np.uint16) * 200)
        elif i == 3:
            image = Image.fromarray(rng.integers(0, 256, (60, 40), dtype=np.uint8))
        else:
            image = Image.fromarray(pixels)
        image.save(root / "images" / name)
    table = pd.DataFrame({"Image Index": names, "Finding Labels": [LABELS[i % 4] for i in range(n)]})
    table.to_csv(root / "Data_Entry_2017.csv", index=False)
    return root


@pytest.fixture(scope="module")
def nih_cache(nih_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nih") / "cache64"
    result = prepare_cache(nih_sample, out, size=64, progress=False)
    assert result.prepared == 120 and result.failed == []
    return out


def test_every_nih_image_is_prepared_with_its_labels(nih_cache, nih_sample):
    cache = open_cache(nih_cache)
    metadata = read_metadata(nih_sample / "Data_Entry_2017_v2020.csv")
    assert len(cache) == 120 and cache.size == 64 and cache.path == nih_cache
    assert cache.images.shape == (120, 64, 64) and cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    assert list(cache.index["Image Index"]) == list(metadata["Image Index"])
    np.testing.assert_array_equal(cache.labels, metadata[list(FINDINGS)].to_numpy(np.uint8))
    assert pd.read_csv(nih_cache / "failed.csv").empty


def test_prepared_pixels_equal_an_independent_resize(nih_cache, nih_sample):
    cache = open_cache(nih_cache)
    box_errors = []
    for row, name in enumerate(cache.index["Image Index"]):
        gray = Image.open(nih_sample / "images" / name).convert("L")
        assert gray.size == (1024, 1024)
        expected = np.asarray(gray.resize((64, 64), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(cache.images[row], expected, err_msg=name)
        # a different method: the mean of each 16 x 16 block of the original
        blocks = np.asarray(gray, dtype=np.float64).reshape(64, 16, 64, 16).mean(axis=(1, 3))
        box_errors.append(np.abs(blocks - cache.images[row]).mean())
    assert np.mean(box_errors) < 1.5 and max(box_errors) < 3.0


def test_resize_square():
    image = np.random.default_rng(1).integers(0, 256, (30, 50), dtype=np.uint8)
    out = resize_square(image, 20)
    assert out.shape == (20, 20) and out.dtype == np.uint8 and out.flags.writeable
    flat = np.full((40, 40), 77, np.uint8)
    np.testing.assert_array_equal(resize_square(flat, 16), np.full((16, 16), 77, np.uint8))
    assert resize_square(flat, 40) is not flat
    with pytest.raises(ValueError):
        resize_square(flat.astype(np.float32), 16)


def independent(root: Path, name: str, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(read_image(root / "images" / name)).resize((size, size), Image.Resampling.LANCZOS))


def test_small_dataset_rows_match_files(tmp_path):
    root = make_dataset(tmp_path / "data")
    result = prepare_cache(root, tmp_path / "c", size=16, progress=False)
    assert result.prepared == 24 and result.failed == []
    cache = open_cache(tmp_path / "c")
    for row, name in enumerate(cache.index["Image Index"]):
        np.testing.assert_array_equal(cache.images[row], independent(root, name, 16))
    assert list(cache.index["Patient ID"][:4]) == [1, 1, 1, 2]
    again = prepare_cache(root, tmp_path / "c", size=16, progress=False)  # complete: left as is
    assert again.prepared == 24
    with pytest.raises(CxrdxError, match="complete cache of other images or size"):
        prepare_cache(root, tmp_path / "c", size=32, progress=False)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / "00000099_000.png")
    with open(root / "Data_Entry_2017.csv", "a") as table:
        table.write("00000099_000.png,Hernia\n")
    with pytest.raises(CxrdxError, match="25 found images at 16 px"):  # more images downloaded since
        prepare_cache(root, tmp_path / "c", size=16, progress=False)


def test_failed_images_are_listed_and_the_rest_prepared(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n=12)
    (root / "images" / "00000002_001.png").write_text("not a png")
    (root / "images" / "00000003_002.png").unlink()
    out = tmp_path / "cache"
    code = main(["prepare", "--data-dir", str(root), "--out", str(out), "--size", "16", "--quiet"])
    assert code != 0
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "10 images" in message and "2 failed" in message and "failed.csv" in message
    failed = pd.read_csv(out / "failed.csv")
    assert sorted(failed["Image Index"]) == ["00000002_001.png", "00000003_002.png"]
    assert failed["reason"].str.contains("not a supported image|not found").all()
    cache = open_cache(out)
    assert len(cache) == 10 and "00000002_001.png" not in set(cache.index["Image Index"])
    for row, name in enumerate(cache.index["Image Index"]):
        np.testing.assert_array_equal(cache.images[row], independent(root, name, 16))


def test_interrupted_prepare_resumes_and_equals_a_clean_run(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data")
    clean = prepare_cache(root, tmp_path / "clean", size=16, progress=False)
    assert clean.prepared == 24

    calls = []
    real_read = cache_module.read_image

    def interrupted_after_ten(path, *args, **kwargs):
        if len(calls) == 10:
            raise KeyboardInterrupt
        calls.append(path)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", interrupted_after_ten)
    monkeypatch.setattr(cache_module, "SAVE_EVERY_S", 0.0)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(root, out, size=16, progress=False)
    with pytest.raises(CxrdxError, match="unfinished"):
        open_cache(out)
    assert np.load(out / "done.npy").sum() == 10
    with pytest.raises(CxrdxError, match="unfinished cache of other images or size"):
        prepare_cache(root, out, size=20, progress=False)

    resumed_calls = []

    def counting(path, *args, **kwargs):
        resumed_calls.append(path)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", counting)
    result = prepare_cache(root, out, size=16, progress=False)
    assert result.prepared == 24 and len(resumed_calls) == 14  # continued, not restarted
    assert sorted(p.name for p in out.iterdir()) == ["failed.csv", "images.npy", "index.csv", "meta.json"]
    np.testing.assert_array_equal(open_cache(out).images, open_cache(tmp_path / "clean").images)
    pd.testing.assert_frame_equal(open_cache(out).index, open_cache(tmp_path / "clean").index)


def test_worker_processes_give_the_same_cache(tmp_path):
    root = make_dataset(tmp_path / "data", n=12)
    serial = prepare_cache(root, tmp_path / "serial", size=16, progress=False)
    pooled = prepare_cache(root, tmp_path / "pooled", size=16, workers=2, progress=False)
    assert serial.prepared == pooled.prepared == 12
    np.testing.assert_array_equal(open_cache(tmp_path / "serial").images, open_cache(tmp_path / "pooled").images)


def test_open_cache_errors(tmp_path):
    with pytest.raises(CxrdxError, match="no cache here"):
        open_cache(tmp_path / "absent")
    (tmp_path / "other").mkdir()
    with pytest.raises(CxrdxError, match="not a cxrdx cache"):
        open_cache(tmp_path / "other")
    (tmp_path / "other" / "index.csv").write_text("x\n")
    root = make_dataset(tmp_path / "data", n=6)
    with pytest.raises(CxrdxError, match="not empty"):
        prepare_cache(root, tmp_path / "other", size=16, progress=False)


def test_pixel_stats_and_pickling(tmp_path):
    root = make_dataset(tmp_path / "data", n=12)
    prepare_cache(root, tmp_path / "c", size=16, progress=False)
    cache = open_cache(tmp_path / "c")
    pixels = np.asarray(cache.images, dtype=np.float64) / 255.0
    mean, std = pixel_stats(cache)
    assert mean == pytest.approx(pixels.mean(), abs=1e-12) and std == pytest.approx(pixels.std(), abs=1e-12)
    rows = np.array([5, 1, 3])
    mean, std = pixel_stats(cache, rows, chunk=2)
    assert mean == pytest.approx(pixels[rows].mean(), abs=1e-12) and std == pytest.approx(pixels[rows].std(), abs=1e-12)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 1000
    np.testing.assert_array_equal(clone.images, cache.images)


def test_a_second_prepare_on_the_same_folder_is_refused(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    import os

    root = make_dataset(tmp_path / "data", n=6)
    out = tmp_path / "c"
    out.mkdir()
    handle = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(CxrdxError, match="another 'cxrdx prepare'"):
            prepare_cache(root, out, size=16, progress=False)
    finally:
        os.close(handle)
    assert prepare_cache(root, out, size=16, progress=False).prepared == 6


def test_a_killed_prepare_leaves_a_folder_that_resumes_correctly(tmp_path):
    import subprocess
    import sys

    root = make_dataset(tmp_path / "data", n=12)
    out = tmp_path / "killed"
    script = f"""
import os
import cxrdx.data.cache as c
real, calls = c.read_image, []
def dying(path, *a, **k):
    if len(calls) == 7:
        os._exit(9)  # like SIGKILL: no finally blocks, no flush
    calls.append(path)
    return real(path, *a, **k)
c.read_image, c.SAVE_EVERY_S = dying, 0.0
c.prepare_cache({str(root)!r}, {str(out)!r}, size=16, progress=False)
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    assert 6 <= np.load(out / "done.npy").sum() <= 7
    assert prepare_cache(root, out, size=16, progress=False).prepared == 12
    clean = prepare_cache(root, tmp_path / "clean", size=16, progress=False)
    np.testing.assert_array_equal(open_cache(out).images, open_cache(clean.path).images)
