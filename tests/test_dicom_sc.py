"""`cxrdx predict --dicom-out --heatmaps`: the Group-CAM map of the most probable positive finding as a
Secondary Capture in the source's study, exactly the map `cxrdx.explain` computes, valid in dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import chest_like, dx_dataset, make_checkpoint
from matplotlib import colormaps

from cxrdx.cli import main
from cxrdx.data.imageio import read_image
from cxrdx.dicom_sc import HEATMAP_SERIES_NUMBER, overlay
from cxrdx.explain.registry import explain
from cxrdx.predict import Predictor


def test_overlay_blends_the_heatmap_over_the_image() -> None:
    image = chest_like(40)[:, :30]  # not square: the map is stretched back over the image's own shape
    rgb = overlay(image, np.zeros((8, 8)), alpha=0.5)
    cold = np.asarray(colormaps["jet"](0.0)[:3]) * 255
    assert rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(float) - (0.5 * image[..., None] + 0.5 * cold)).max() <= 0.5
    assert np.array_equal(overlay(image, np.ones((8, 8)), alpha=0.0), np.repeat(image[..., None], 3, axis=2))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    tmp = tmp_path_factory.mktemp("sc")
    checkpoint = make_checkpoint(tmp / "best.pt", thresholds=[1.0] * 13 + [0.0])  # only Pneumothorax positive
    folder = tmp / "in"
    folder.mkdir()
    pixels = chest_like(80)[:, :64].astype(np.uint16) * 16
    dx_dataset(pixels, 12).save_as(folder / "a.dcm", enforce_file_format=True)
    dx_dataset(pixels, 12, PatientOrientation=None).save_as(folder / "b.dcm", enforce_file_format=True)
    out = tmp / "out"
    code = main(["predict", "--checkpoint", str(checkpoint), str(folder), "--dicom-out", str(out), "--heatmaps", "--device", "cpu"])
    assert code == 0
    return folder, out, checkpoint, pydicom.dcmread(folder / "a.dcm").SOPInstanceUID


def test_heatmap_sc_in_the_source_study(run: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture) -> None:
    folder, out, checkpoint, uid = run
    assert sorted(p.name for p in out.glob("*.heatmap.dcm")) == [f"{uid}.heatmap.dcm"]  # b.dcm: no orientation
    sc, source = pydicom.dcmread(out / f"{uid}.heatmap.dcm"), pydicom.dcmread(folder / "a.dcm")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.SeriesNumber == HEATMAP_SERIES_NUMBER
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber", "PatientOrientation"):
        assert sc.get(keyword) == source.get(keyword), keyword
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.ImageComments.startswith("cxrdx Group-CAM heatmap of Pneumothorax, probability ")

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    image = read_image(folder / "a.dcm")
    saliency = explain(predictor.model, predictor.to_tensor(predictor.load(image)[None]), 13)
    assert sc.PhotometricInterpretation == "RGB" and np.array_equal(sc.pixel_array, overlay(image, saliency))


def test_heatmap_sc_validates_in_dciodvfy(run: tuple[Path, Path, Path, str]) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; `make dicomtools`)")
    _, out, _, uid = run
    result = subprocess.run(["dciodvfy", str(out / f"{uid}.heatmap.dcm")], check=False, capture_output=True, text=True)
    report = (result.stdout + result.stderr).splitlines()
    assert "SCImage" in report and not [line for line in report if line.startswith(("Error", "Warning"))], report


def test_heatmaps_need_a_checkpoint_and_dicom_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "a.dcm"
    dx_dataset(chest_like(16).astype(np.uint16), 12).save_as(image, enforce_file_format=True)
    assert main(["predict", "--onnx", str(tmp_path / "m.onnx"), str(image), "--heatmaps", "--dicom-out", str(tmp_path)]) == 2
    assert main(["predict", "--checkpoint", str(tmp_path / "m.pt"), str(image), "--heatmaps"]) == 2
    assert capsys.readouterr().err.count("--heatmaps needs --dicom-out DIR and --checkpoint") == 2
