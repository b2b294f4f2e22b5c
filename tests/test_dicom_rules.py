"""DICOM header rules: only single-frame chest radiographs are predicted; every refusal names its reason."""

from __future__ import annotations

import collections
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import CORPUS, chest_like, dx_dataset, make_checkpoint
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from cxrdx.cli import main
from cxrdx.data.dicom_rules import Verdict, check_header, dicom_verdict
from cxrdx.findings import FINDINGS
from cxrdx.predict import Predictor, format_predictions

NOT_RADIOGRAPHS = {"CT", "MR", "US", "NM", "SEG", "SR", "RTDOSE", "RTPLAN", "RTSTRUCT", "ECG", "OT"}


def chest(**header: object) -> pydicom.Dataset:
    """A 12-bit DX chest PA dataset (64 px) with `header` changes."""
    return dx_dataset(chest_like(64).astype(np.uint16) * 16, 12, **header)


def dicom_file(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_chest_radiographs_are_accepted() -> None:
    accepted = [
        chest(),
        chest(Modality="CR", SOPClassUID=ComputedRadiographyImageStorage),
        chest(BodyPartExamined="THORAX"),
        chest(BodyPartExamined="CHEST_PA"),
        chest(BodyPartExamined=None, ViewPosition=None),
        chest(SOPClassUID=SecondaryCaptureImageStorage),  # a digitised chest film keeps its DX modality
        chest(SeriesDescription="Thorax bilateral"),  # BILATERAL is no lateral view
    ]
    for ds in accepted:
        assert check_header(ds) == Verdict(accepted=True), ds.get("SeriesDescription")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"Modality": "CT"}, "modality CT is not a radiograph (CR, DX)"),
        ({"Modality": None}, "modality is absent; expected a radiograph (CR, DX)"),
        ({"BodyPartExamined": "HAND"}, "body part HAND is not the chest"),
        ({"NumberOfFrames": 3}, "multi-frame object (3 frames); expected one radiograph"),
        (
            {"SOPClassUID": DigitalXRayImageStorageForProcessing},
            "SOP class Digital X-Ray Image Storage - For Processing holds raw detector data, not an image for presentation",
        ),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"}, "SOP class Comprehensive SR Storage is not a radiograph image"),
    ],
)
def test_refusals_name_the_reason(header: dict, reason: str) -> None:
    verdict = check_header(chest(**header))
    assert not verdict.accepted and verdict.reason == reason


def test_lateral_views_are_flagged_not_refused() -> None:
    verdict = check_header(chest(ViewPosition="LL", SeriesDescription="Chest LAT", ProtocolName="Thorax lateral"))
    assert verdict.accepted and verdict.reason is None
    assert verdict.flags == [
        "lateral view (ViewPosition LL); the model was trained on frontal views",
        "lateral view suggested by SeriesDescription 'Chest LAT'",
        "lateral view suggested by ProtocolName 'Thorax lateral'",
    ]


def test_dicom_verdict_reads_files_and_bytes_and_ignores_other_images(tmp_path: Path) -> None:
    data = dicom_file(chest(Modality="MR"))
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    assert dicom_verdict(path) == dicom_verdict(data) == Verdict(False, "modality MR is not a radiograph (CR, DX)")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert dicom_verdict(tmp_path / "b.png") is None and dicom_verdict(chest_like(8)) is None
    assert dicom_verdict(tmp_path / "missing.dcm") is None  # the decoder reports the missing file


def test_pydicom_corpus_non_radiographs_are_refused() -> None:
    """Every CT, MR, US, NM, SEG, SR, RT, ECG and OT object of pydicom's corpus is refused with a reason;
    its only CR images (cervical spine) are refused for the body part."""
    by_modality: collections.Counter[tuple[str, bool]] = collections.Counter()
    for path in sorted(p for p in CORPUS.rglob("*") if p.is_file()):
        verdict = dicom_verdict(path)
        if verdict is None:
            continue  # not DICOM (README, JSON, dumps) or a header too damaged to read
        modality = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality") or "none")
        by_modality[modality, verdict.accepted] += 1
        assert not verdict.accepted and verdict.reason, path.name
        named = modality in verdict.reason or "SOP class" in verdict.reason or modality in ("CR", "none")
        assert named, (path.name, verdict.reason)
    refused = {m for m, ok in by_modality if not ok}
    assert NOT_RADIOGRAPHS <= refused and by_modality["CR", False] == 3
    assert sum(by_modality.values()) >= 150 and not any(ok for _, ok in by_modality)


def test_cli_predict_marks_refused_dicoms(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_chest.dcm").write_bytes(dicom_file(chest()))
    (folder / "b_lateral.dcm").write_bytes(dicom_file(chest(ViewPosition="LL")))
    shutil.copy(CORPUS / "CT_small.dcm", folder / "c_ct.dcm")
    shutil.copy(CORPUS / "test-SR.dcm", folder / "d_sr.dcm")
    out = tmp_path / "pred.csv"
    args = ["predict", "--checkpoint", str(checkpoint), str(folder), "--format", "csv", "--out", str(out), "--device", "cpu"]

    assert main(args) == 0
    table = pd.read_csv(out, keep_default_na=False).set_index("Image Index")
    assert list(table["accepted"]) == [True, True, False, False]
    assert table.loc["c_ct.dcm", "reason"] == "modality CT is not a radiograph (CR, DX)"
    assert table.loc["d_sr.dcm", "reason"] == "SOP class Comprehensive SR Storage is not a radiograph image"
    assert table.loc["b_lateral.dcm", "flags"].startswith("lateral view (ViewPosition LL)")
    assert (table.loc[["c_ct.dcm", "d_sr.dcm"], list(FINDINGS)] == "").all().all()
    assert (table.loc[["a_chest.dcm", "b_lateral.dcm"], list(FINDINGS)] != "").all().all()
    assert "2 of 4 images refused by the input guard (predict them anyway with --allow-ood)" in capsys.readouterr().err

    assert main([*args, "--allow-ood"]) == 1  # the SR has no pixels to predict
    table = pd.read_csv(out, keep_default_na=False).set_index("Image Index")
    assert list(table["accepted"]) == [True, True, False, False]
    assert table.loc["c_ct.dcm", "reason"] == "modality CT is not a radiograph (CR, DX)"
    assert (table.loc["c_ct.dcm", list(FINDINGS)] != "").all()
    assert "no pixel data" in table.loc["d_sr.dcm", "error"]

    assert main(["predict", "--checkpoint", str(checkpoint), str(folder / "c_ct.dcm"), "--device", "cpu"]) == 0
    assert "REFUSED: modality CT is not a radiograph" in capsys.readouterr().out


def test_predictor_refuses_without_decoding(tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "best.pt"), device="cpu")
    broken = dicom_file(chest(Modality="CT"))[:-100]  # truncated pixels: refused before any decoding
    refused, chest_pa = predictor.predict([broken, dicom_file(chest())])
    assert (refused.accepted, refused.error, refused.probabilities) == (False, None, {})
    table = pd.read_csv(io.StringIO(format_predictions([refused, chest_pa], "csv")), keep_default_na=False)
    assert list(table.columns[1:15]) == list(FINDINGS) and list(table["accepted"]) == [False, True]
    [tried] = predictor.predict([broken], errors="report", allow_ood=True)
    assert not tried.accepted and "pixel data" in tried.error
