"""Predictor and `cxrdx predict`: raw files give the same pixels and probabilities as the prepared cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SIZE, chest_like, dicom_bytes, make_checkpoint
from PIL import Image

from cxrdx.cli import main
from cxrdx.data.cache import open_cache, prepare_cache
from cxrdx.data.dataset import CacheDataset, eval_transform
from cxrdx.data.imageio import read_image
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.predict import Predictor, collect_images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


def cache_probabilities(predictor: Predictor, cache_dir: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The training/evaluation path: cache rows → CacheDataset(eval_transform) → model → sigmoid."""
    info = predictor.info
    cache = open_cache(cache_dir)
    dataset = CacheDataset(cache, None, eval_transform(info.input_size, info.mean, info.std))
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        probs = torch.sigmoid(predictor.model(batch)).double().numpy()
    return probs, dataset.names, np.asarray(cache.images)


def test_real_images_match_the_prepared_cache(predictor: Predictor, nih_sample: Path, tmp_path: Path) -> None:
    files = sorted((nih_sample / "images").glob("*.png"))
    assert len(files) == 120
    assert any(Image.open(f).mode == "RGBA" for f in files), "the sample should include RGBA files"
    prepare_cache(nih_sample, tmp_path / "cache", size=SIZE, progress=False)
    expected, names, cached_pixels = cache_probabilities(predictor, tmp_path / "cache")
    paths = [nih_sample / "images" / n for n in names]

    pixels = np.stack([predictor.load(p) for p in paths])  # what predict_proba(paths) decodes
    np.testing.assert_array_equal(pixels, cached_pixels)  # the same pixels, bit for bit
    got = predictor.predict_proba(pixels)
    assert np.abs(got - expected).max() <= 1e-6
    rgba = [i for i, p in enumerate(paths) if Image.open(p).mode == "RGBA"]
    some = rgba + [i for i in range(8) if i not in rgba]  # straight from the files, RGBA ones included
    assert np.abs(predictor.predict_proba([paths[i] for i in some]) - expected[some]).max() <= 1e-6


def test_generated_dicoms_match_the_prepared_cache(predictor: Predictor, tmp_path: Path) -> None:
    img = chest_like()
    lut = np.arange(4096) * 16  # a VOI LUT Sequence: 12-bit stored values to 16-bit output
    variants = {
        "00000001_000.dcm": dicom_bytes(img, "MONOCHROME2"),
        "00000002_000.dcm": dicom_bytes(img.astype(np.uint16) * 257, "MONOCHROME2"),
        "00000003_000.dcm": dicom_bytes((255 - img).astype(np.uint16) * 257, "MONOCHROME1"),
        "00000004_000.dcm": dicom_bytes(img.astype(np.uint16) * 16 + 8, "MONOCHROME2", 12, window=(2048, 4096)),
        "00000005_000.dcm": dicom_bytes((255 - img).astype(np.uint16) * 16, "MONOCHROME1", 12, window=(2040, 4081)),
        "00000006_000.dcm": dicom_bytes(img.astype(np.uint16) * 16, "MONOCHROME2", 12, voi_lut=lut),
    }
    data = tmp_path / "dicoms"
    (data / "images").mkdir(parents=True)
    for name, payload in variants.items():
        (data / "images" / name).write_bytes(payload)
    pd.DataFrame({"Image Index": list(variants), "Finding Labels": "No Finding"}).to_csv(data / "Data_Entry_2017.csv", index=False)
    result = prepare_cache(data, tmp_path / "cache", size=SIZE, progress=False)
    assert result.prepared == len(variants) and not result.failed

    expected, names, cached_pixels = cache_probabilities(predictor, tmp_path / "cache")
    assert names == list(variants)
    for name, payload in variants.items():  # every photometric / bit depth / VOI variant shows the same picture
        assert np.abs(read_image(payload, name).astype(int) - img).max() <= 1, name
    from_files = predictor.predict_proba([data / "images" / n for n in names])
    from_bytes = predictor.predict_proba(list(variants.values()))
    assert np.abs(from_files - expected).max() <= 1e-6
    np.testing.assert_array_equal(from_files, from_bytes)


def test_every_input_kind_gives_the_same_probabilities(predictor: Predictor, tmp_path: Path) -> None:
    img = chest_like(80)
    png = tmp_path / "x.png"
    Image.fromarray(img).save(png)
    sources = [png, str(png), png.read_bytes(), img, Image.fromarray(img), np.stack([img] * 3, axis=-1)]
    probs = predictor.predict_proba(sources)
    assert probs.shape == (len(sources), len(FINDINGS))
    assert np.abs(probs - probs[0]).max() <= 1e-6  # the same pixels; only the batch differs
    assert np.abs(predictor.predict_proba(png) - probs[:1]).max() <= 1e-6  # one image, not a list


def test_batches_internally(checkpoint: Path) -> None:
    images = [chest_like(64, seed=s) for s in range(7)]
    one_batch = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=32).predict_proba(images)
    many = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=3).predict_proba(images)
    assert np.abs(one_batch - many).max() <= 1e-6


def test_prediction_thresholds_and_temperature(tmp_path: Path) -> None:
    thresholds = [0.5 + 0.01 * i for i in range(len(FINDINGS))]
    plain = Predictor.from_checkpoint(make_checkpoint(tmp_path / "a.pt", thresholds=thresholds), device="cpu")
    warm = Predictor.from_checkpoint(make_checkpoint(tmp_path / "b.pt", temperature=[2.0] * len(FINDINGS)), device="cpu")
    img = chest_like()
    p = plain.predict_proba(img)[0]
    q = warm.predict_proba(img)[0]
    np.testing.assert_allclose(np.log(q / (1 - q)), np.log(p / (1 - p)) / 2.0, atol=1e-9)  # logit / T

    pred = plain.predict([img], names=["chest"])[0]
    assert pred.name == "chest" and pred.error is None
    assert list(pred.probabilities) == list(FINDINGS)
    assert pred.thresholds == dict(zip(FINDINGS, thresholds, strict=True))
    assert pred.positives == [f for f in FINDINGS if pred.probabilities[f] >= pred.thresholds[f]]


def test_bad_images_are_reported_or_raised(predictor: Predictor, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(chest_like()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    results = predictor.predict([good, bad, tmp_path / "missing.png"], errors="report")
    assert [r.error is None for r in results] == [True, False, False]
    assert "not a supported image" in results[1].error and "not found" in results[2].error
    assert results[1].probabilities == {} and len(results[0].probabilities) == len(FINDINGS)
    with pytest.raises(CxrdxError, match="bad.png"):
        predictor.predict([good, bad])


def test_collect_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.JPG", "c.dcm", "notes.txt", "sub/d.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [n for _, n in collect_images([tmp_path])] == ["a.png", "b.JPG", "c.dcm"]
    assert [n for _, n in collect_images([tmp_path], recursive=True)] == ["a.png", "b.JPG", "c.dcm", "sub/d.png"]
    assert [n for _, n in collect_images([tmp_path / "notes.txt"])] == ["notes.txt"]  # named files are tried as given


def test_cli_predict_reports_bad_files_and_exits_1(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(chest_like()).save(folder / "a.png")
    Image.fromarray(chest_like(seed=1)).convert("RGB").save(folder / "b.jpg", quality=95)
    (folder / "c.dcm").write_bytes(dicom_bytes(chest_like(seed=2).astype(np.uint16) * 257))
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")

    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--format", "csv", "--out", str(out), "--device", "cpu"]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["Image Index", *FINDINGS, "positives", "error", "accepted", "reason", "flags", "ood_score"]
    assert list(table["Image Index"]) == ["a.png", "b.jpg", "c.dcm", "d.png"]
    assert (table["error"][:3] == "").all() and table["error"][3] != ""
    assert (table["ood_score"] == "").all()  # this checkpoint has no input guard
    err = capsys.readouterr().err
    assert "1 of 4 images could not be read" in err and "input guard content check off" in err

    assert main(["predict", "--checkpoint", str(checkpoint), str(folder / "a.png"), "--format", "json", "--device", "cpu"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert record["name"] == "a.png" and set(record["probabilities"]) == set(FINDINGS)

    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("image") and "d.png" in text and "ERROR" in text


def test_cli_predict_user_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(chest_like()).save(image)
    assert main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), str(image)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    image.unlink()
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path)]) == 2  # an empty folder
    assert "no image files in" in capsys.readouterr().err
