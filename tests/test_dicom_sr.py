"""`cxrdx predict --dicom-out`: one Comprehensive SR per accepted DICOM image, in the source's study,
holding the prediction exactly; each validates in dicom3tools' dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import CORPUS, chest_like, dx_dataset, make_checkpoint
from PIL import Image

from cxrdx import __version__
from cxrdx.cli import main
from cxrdx.dicom_sr import DISCLAIMER, build_sr, finding_code
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.predict import ModelInfo, Prediction


def items(node) -> dict[str, list]:
    """A content item's children by concept meaning."""
    out: dict[str, list] = {}
    for item in node.get("ContentSequence", []):
        out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict]]:
    """`cxrdx predict --dicom-out --allow-ood` over a chest DX, a chest CR, a CT and a PNG."""
    tmp = tmp_path_factory.mktemp("sr")
    checkpoint = make_checkpoint(tmp / "best.pt", thresholds=[0.5] * 7 + [0.0] * 7)  # some findings positive
    folder = tmp / "in"
    folder.mkdir()
    pixels = chest_like(64).astype(np.uint16) * 16
    dx_dataset(pixels, 12).save_as(folder / "a.dcm", enforce_file_format=True)
    dx_dataset(pixels[::-1], 12, Modality="CR", SOPClassUID="1.2.840.10008.5.1.4.1.1.1").save_as(folder / "b.dcm", enforce_file_format=True)
    shutil.copy(CORPUS / "CT_small.dcm", folder / "c.dcm")
    Image.fromarray(chest_like(64)).save(folder / "d.png")
    out, predictions = tmp / "sr", tmp / "pred.json"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(checkpoint),
            str(folder),
            "--format",
            "json",
            "--out",
            str(predictions),
            "--dicom-out",
            str(out),
            "--allow-ood",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return folder, out, {p["name"]: p for p in json.loads(predictions.read_text())}


def test_one_sr_per_accepted_dicom(run: tuple[Path, Path, dict[str, dict]]) -> None:
    folder, out, predictions = run
    assert not predictions["c.dcm"]["accepted"] and predictions["c.dcm"]["probabilities"]  # --allow-ood: predicted, no SR
    sources = {pydicom.dcmread(folder / n).SOPInstanceUID: n for n in ("a.dcm", "b.dcm")}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{uid}.sr.dcm" for uid in sources)


def test_sr_holds_the_prediction_in_the_source_study(run: tuple[Path, Path, dict[str, dict]]) -> None:
    folder, out, predictions = run
    for path in sorted(out.iterdir()):
        sr = pydicom.dcmread(path)
        name = next(n for n in ("a.dcm", "b.dcm") if pydicom.dcmread(folder / n).SOPInstanceUID in path.name)
        source, prediction = pydicom.dcmread(folder / name), predictions[name]
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"  # Comprehensive SR
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyID",
            "StudyDate",
            "AccessionNumber",
        ):
            assert sr.get(keyword) == source.get(keyword), keyword
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SOPInstanceUID != source.SOPInstanceUID
        [study] = sr.CurrentRequestedProcedureEvidenceSequence
        [series] = study.ReferencedSeriesSequence
        [instance] = series.ReferencedSOPSequence
        assert (study.StudyInstanceUID, series.SeriesInstanceUID, instance.ReferencedSOPInstanceUID) == (
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
            source.SOPInstanceUID,
        )
        assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")

        root = items(sr)
        assert root["Algorithm Name"][0].TextValue == "cxrdx test_resnet"
        assert root["Algorithm Version"][0].TextValue == __version__  # the checkpoint's cxrdx version
        assert root["Source image"][0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert root["Disclaimer"][0].TextValue == DISCLAIMER
        per_finding = items(root["Findings"][0])
        assert len(per_finding) == len(FINDINGS)
        for finding in FINDINGS:
            [node] = per_finding[finding.replace("_", " ")]
            values = items(node)
            probability = float(values["Probability"][0].MeasuredValueSequence[0].NumericValue)
            threshold = float(values["Decision threshold"][0].MeasuredValueSequence[0].NumericValue)
            assert abs(probability - prediction["probabilities"][finding]) <= 1e-9
            assert threshold == prediction["thresholds"][finding]
            called = values["Finding"][0].ConceptCodeSequence[0].CodeMeaning
            assert called == ("Present" if finding in prediction["positives"] else "Absent")
        concluded = [i.ConceptCodeSequence[0].CodeMeaning for i in items(root["Conclusions"][0]).get("Finding", [])]
        assert concluded == [f.replace("_", " ") for f in prediction["positives"]] and concluded


def test_srs_validate_in_dciodvfy(run: tuple[Path, Path, dict[str, dict]]) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; `make dicomtools`)")
    _, out, _ = run
    for path in sorted(out.iterdir()):
        result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True)
        report = (result.stdout + result.stderr).splitlines()
        assert "ComprehensiveSR" in report
        assert not [line for line in report if line.startswith("Error")], report
        warnings = [line for line in report if line.startswith("Warning")]
        assert all("99CXRDX" in line for line in warnings), warnings  # only: cxrdx's private coding scheme


def test_refused_or_failed_predictions_get_no_sr() -> None:
    info = ModelInfo("test_resnet", list(FINDINGS), [0.5] * 14, 64, [0.5], [0.25])
    header = dx_dataset(chest_like(8).astype(np.uint16), 12)
    for prediction in (Prediction("x", error="broken"), Prediction("x", accepted=False, reason="modality CT is not a radiograph")):
        with pytest.raises(CxrdxError, match="no accepted prediction"):
            build_sr(header, prediction, info)
    assert finding_code("Pleural_Thickening").value == "CXR14-12"
    with pytest.raises(CxrdxError, match="no code"):
        finding_code("Fracture")


def test_the_input_guard_score_is_reported_when_the_model_has_a_guard() -> None:
    info = ModelInfo("test_resnet", list(FINDINGS), [0.5] * 14, 64, [0.5], [0.25])
    header = dx_dataset(chest_like(8).astype(np.uint16), 12)
    probabilities = {f: 0.1 for f in FINDINGS}
    guarded = Prediction("x", probabilities=probabilities, thresholds=dict.fromkeys(FINDINGS, 0.5), ood_score=7.25)
    value = items(build_sr(header, guarded, info))["Out-of-distribution score"][0].MeasuredValueSequence[0].NumericValue
    assert float(value) == 7.25
    unguarded = Prediction("x", probabilities=probabilities, thresholds=dict.fromkeys(FINDINGS, 0.5))
    assert "Out-of-distribution score" not in items(build_sr(header, unguarded, info))
