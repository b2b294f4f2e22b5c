"""Phantoms: ChestX-ray14 layout, long-tail labels, determinism, and boxes over the planted patterns."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdx.cli import main
from cxrdx.data.phantoms import (
    BBOX_HEADER,
    DATA_ENTRY_HEADER,
    PREVALENCE,
    generate_phantoms,
    render_phantom,
    sample_specs,
)
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS, parse_labels


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_layout_columns_and_images(phantom_dir: Path) -> None:
    entries = _rows(phantom_dir / "Data_Entry_2017.csv")
    assert ",".join(entries[0]) == DATA_ENTRY_HEADER
    assert entries[0][:7] == [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
    ]
    rows = entries[1:]
    assert len(rows) == 240 and all(len(row) == 11 for row in rows)
    for name, labels, followup, patient, age, gender, view, width, height, sx, sy in rows:
        assert re.fullmatch(r"\d{8}_\d{3}\.png", name)
        assert name == f"{int(patient):08d}_{int(followup):03d}.png"
        parse_labels(labels)
        assert 18 <= int(age) <= 95 and gender in "MF" and view in ("PA", "AP")
        assert (width, height) == ("64", "64") and float(sx) == float(sy) > 0
    files = sorted(p.name for p in (phantom_dir / "images").iterdir())
    assert files == sorted(row[0] for row in rows)
    for name in files[:40]:
        with Image.open(phantom_dir / "images" / name) as image:
            assert image.mode == "L" and image.size == (64, 64)
            pixels = np.asarray(image)
        assert pixels.std() > 20  # a chest, not a flat field


def test_patients_have_several_images_and_findings_co_occur(phantom_dir: Path) -> None:
    rows = _rows(phantom_dir / "Data_Entry_2017.csv")[1:]
    per_patient = np.bincount([int(row[3]) for row in rows])[1:]
    assert per_patient.min() >= 1 and per_patient.mean() >= 2 and per_patient.max() >= 4
    counts = np.array([parse_labels(row[1]).sum() for row in rows])
    assert 0.3 < (counts == 0).mean() < 0.7
    assert (counts >= 2).sum() >= 10


def test_one_box_per_planted_finding_inside_the_image(phantom_dir: Path) -> None:
    assert (phantom_dir / "BBox_List_2017.csv").read_text(encoding="utf-8").splitlines()[0] == BBOX_HEADER
    boxes = _rows(phantom_dir / "BBox_List_2017.csv")[1:]
    planted = {
        (row[0], name)
        for row in _rows(phantom_dir / "Data_Entry_2017.csv")[1:]
        for name, flag in zip(FINDINGS, parse_labels(row[1]))
        if flag
    }
    assert sorted((row[0], row[1]) for row in boxes) == sorted(planted)
    for _, _, x, y, w, h in boxes:
        x, y, w, h = (float(v) for v in (x, y, w, h))
        assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= 64 and y + h <= 64


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first = files(generate_phantoms(tmp_path / "a", n=24, size=48, seed=3, progress=False))
    second = files(generate_phantoms(tmp_path / "b", n=24, size=48, seed=3, progress=False))
    other = files(generate_phantoms(tmp_path / "c", n=24, size=48, seed=4, progress=False))
    assert len(first) == 27 and first == second  # 24 images, two tables and the synthetic-source marker
    assert json.loads(first["cxrdx_source.json"])["synthetic"] is True
    assert first["Data_Entry_2017.csv"] != other["Data_Entry_2017.csv"]
    assert first["images/00000001_000.png"] != other["images/00000001_000.png"]


def test_prevalence_follows_the_long_tail() -> None:
    labels = np.array([spec.labels for spec in sample_specs(30000, seed=1)])
    prevalence = labels.mean(0)
    assert abs((labels.sum(1) == 0).mean() - 60361 / 112120) < 0.01
    np.testing.assert_allclose(prevalence, PREVALENCE, atol=0.006, rtol=0.15)
    assert FINDINGS[int(prevalence.argmax())] == "Infiltration"
    assert FINDINGS[int(prevalence.argmin())] == "Hernia"
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(ranks(prevalence), ranks(PREVALENCE))[0, 1] > 0.95


def test_tail_floor_raises_rare_findings_only() -> None:
    plain = np.array([s.labels for s in sample_specs(20000, seed=2)]).mean(0)
    floored = np.array([s.labels for s in sample_specs(20000, seed=2, tail_floor=0.08)]).mean(0)
    assert floored.min() > 0.07
    common = PREVALENCE > 0.1
    np.testing.assert_allclose(floored[common], plain[common], atol=0.015)
    with pytest.raises(CxrdxError, match="tail_floor"):
        sample_specs(10, tail_floor=0.9)


@pytest.mark.parametrize("finding", FINDINGS)
def test_box_lies_over_the_planted_pattern(finding: str) -> None:
    normals = [s for s in sample_specs(60, seed=5) if not any(s.labels)][:3]
    onehot = tuple(int(name == finding) for name in FINDINGS)
    for spec in normals:
        spec = replace(spec, labels=onehot)
        with_it, boxes = render_phantom(spec, 96)
        without, _ = render_phantom(spec, 96, omit=[finding])
        x, y, w, h = boxes[finding]
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
        diff = np.abs(with_it.astype(float) - without)
        inside = np.zeros(diff.shape, bool)
        inside[y : y + h, x : x + w] = True
        assert diff[inside].mean() > 2.0, "the finding is visible in its box"
        assert diff[inside].mean() > 8 * diff[~inside].mean(), "and hardly anywhere else"
        assert diff[inside].sum() > 0.85 * diff.sum()


def test_written_files_are_the_rendered_images_and_boxes(phantom_dir: Path) -> None:
    specs = {spec.image_index: spec for spec in sample_specs(240, seed=0, tail_floor=0.05)}
    boxes = _rows(phantom_dir / "BBox_List_2017.csv")[1:]
    for name in sorted({row[0] for row in boxes})[:5]:
        image, planted = render_phantom(specs[name], 64)
        with Image.open(phantom_dir / "images" / name) as written:
            np.testing.assert_array_equal(np.asarray(written), image)
        assert {row[1]: tuple(int(v) for v in row[2:]) for row in boxes if row[0] == name} == planted


def test_cardiomegaly_means_a_cardiothoracic_ratio_above_one_half() -> None:
    from cxrdx.data.phantoms import CARDIOMEGALY_CTR, _anatomy, _heart

    x = np.linspace(-1, 1, 401, dtype=np.float32)
    X, Y = np.meshgrid(x, x)

    def ratio(anatomy, ctr: float) -> float:
        heart = _heart(anatomy, X, Y, ctr) > 0.5
        return heart.any(0).sum() / 200 / (2 * anatomy.width)

    for spec in sample_specs(40, seed=7):
        anatomy = _anatomy(spec)
        assert 0.35 < ratio(anatomy, anatomy.ctr) < 0.5
        assert 0.53 < ratio(anatomy, CARDIOMEGALY_CTR[0])


def test_omit_rejects_unknown_findings() -> None:
    with pytest.raises(ValueError, match="Nodules"):
        render_phantom(sample_specs(1)[0], 32, omit=["Nodules"])


def test_follow_ups_share_the_patients_anatomy() -> None:
    specs = [replace(s, labels=(0,) * 14, view="PA") for s in sample_specs(80, seed=6)]
    by_patient: dict[int, list] = {}
    for spec in specs:
        by_patient.setdefault(spec.patient, []).append(spec)
    pairs = [group[:2] for group in by_patient.values() if len(group) >= 2][:6]
    image = lambda spec: render_phantom(spec, 64)[0].astype(float)  # noqa: E731
    same = np.mean([np.abs(image(a) - image(b)).mean() for a, b in pairs])
    other = np.mean([np.abs(image(a[0]) - image(b[1])).mean() for a, b in zip(pairs, pairs[1:])])
    assert same < other


def test_cli_writes_the_dataset_and_reports_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["phantoms", "--out", str(tmp_path / "p"), "--n", "6", "--size", "40", "--seed", "1"]) == 0
    assert len(list((tmp_path / "p" / "images").glob("*.png"))) == 6
    assert "6 phantom images" in capsys.readouterr().out
    assert main(["phantoms", "--out", str(tmp_path / "q"), "--n", "6", "--tail-floor", "0.9"]) == 2
    assert "tail_floor" in capsys.readouterr().err
