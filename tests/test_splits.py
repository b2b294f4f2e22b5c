"""Splits, leakage report and Table 1 — on the real ChestX-ray14 metadata shipped with the package."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdx.cli import main
from cxrdx.data import packaged
from cxrdx.data.metadata import read_metadata
from cxrdx.data.phantoms import sample_specs
from cxrdx.data.splits import (
    format_table1,
    import_split,
    leakage_report,
    make_split,
    read_split,
    resolve_split_file,
    split_summary,
    table1,
    write_split,
)
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

# The paper's Table 1 (reference/paper.txt; its "81,06" is 8106): train, val, test, all, and the printed %.
PAPER_TABLE1 = {
    "Infiltration": (13915, 1929, 4050, 19894, (17.7, 17.2, 18.1, 17.7)),
    "Atelectasis": (8106, 1133, 2320, 11559, (10.3, 10.1, 10.3, 10.3)),
    "Effusion": (9401, 1315, 2601, 13317, (12.0, 11.7, 11.6, 11.9)),
    "Nodule": (4392, 635, 1304, 6331, (5.6, 5.7, 5.8, 5.6)),
    "Pneumothorax": (3730, 520, 1052, 5302, (4.8, 4.6, 4.7, 4.7)),
    "Mass": (4016, 563, 1203, 5782, (5.1, 5.0, 5.4, 5.2)),
    "Consolidation": (3244, 480, 943, 4667, (4.1, 4.3, 4.2, 4.2)),
    "Pleural_Thickening": (2380, 339, 666, 3385, (3.0, 3.0, 3.0, 3.0)),
    "Cardiomegaly": (1897, 277, 602, 2776, (2.4, 2.5, 2.7, 2.5)),
    "Emphysema": (1781, 266, 469, 2516, (2.3, 2.4, 2.1, 2.2)),
    "Fibrosis": (1204, 186, 296, 1686, (1.5, 1.7, 1.3, 1.5)),
    "Edema": (1623, 244, 436, 2303, (2.1, 2.2, 1.9, 2.1)),
    "Pneumonia": (997, 128, 306, 1431, (1.3, 1.1, 1.4, 1.3)),
    "Hernia": (163, 28, 36, 227, (0.2, 0.2, 0.2, 0.2)),
}
PAPER_LABEL_COUNTS = {
    "0": (42197, 6055, 12109, 60361, (53.8, 54.0, 54.0, 53.8)),
    "1": (21768, 3103, 6092, 30963, (27.7, 27.7, 27.2, 27.6)),
    "2": (9993, 1427, 2886, 14306, (12.7, 12.7, 12.9, 12.8)),
    "3": (3361, 469, 1026, 4856, (4.3, 4.2, 4.6, 4.3)),
    ">=4": (1165, 157, 312, 1634, (1.5, 1.4, 1.4, 1.5)),
}
PAPER_IMAGES = (78484, 11211, 22425, 112120)
COLUMNS = ("train", "val", "test", "all")


@pytest.fixture(scope="module")
def chestxray14(shared_data: Path) -> Path:
    return shared_data / "chestxray14"


@pytest.fixture(scope="module")
def nih_index() -> pd.DataFrame:
    """The official 112,120-row table shipped with the package, read once for this module."""
    return read_metadata(packaged.nih_metadata())


@pytest.fixture(scope="module")
def paper_split(nih_index: pd.DataFrame) -> pd.Series:
    return read_split("paper", nih_index)


def small_index(patients: list[int]) -> pd.DataFrame:
    """A tiny metadata table: one image per entry of `patients`, all 'No Finding'."""
    names = [f"{p:08d}_{i:03d}.png" for i, p in enumerate(patients)]
    frame = pd.DataFrame({"Image Index": names, "Patient ID": patients, "Finding Labels": "No Finding"})
    for finding in FINDINGS:
        frame[finding] = np.uint8(0)
    return frame


def phantom_index(n: int, tail_floor: float) -> pd.DataFrame:
    """The metadata of `n` phantoms (patients with follow-ups, Table 1 prevalences), no images rendered."""
    specs = sample_specs(n, seed=0, tail_floor=tail_floor)
    frame = pd.DataFrame({"Image Index": [s.image_index for s in specs], "Patient ID": [s.patient for s in specs]})
    labels = np.array([s.labels for s in specs], dtype=np.uint8)
    return frame.assign(**{finding: labels[:, j] for j, finding in enumerate(FINDINGS)})


def positives(index: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    """Positive images per finding (rows) and split (columns)."""
    names = split.reindex(index["Image Index"]).to_numpy()
    return pd.DataFrame({name: index.loc[names == name, list(FINDINGS)].sum() for name in ("train", "val", "test")})


def check_patient_split(index: pd.DataFrame, split: pd.Series, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> None:
    """No patient in two splits, image fractions within 1 point of `ratios`."""
    patients = index["Patient ID"].to_numpy()
    names = split.reindex(index["Image Index"]).to_numpy()
    groups = {name: set(patients[names == name]) for name in ("train", "val", "test")}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert leakage_report(index, split) == {"val_images_with_train_patient": 0, "test_images_with_train_patient": 0}
    summary = split_summary(index, split)
    for name, ratio in zip(("train", "val", "test"), ratios):
        assert abs(summary[name]["fraction"] - ratio) <= 0.01, (name, summary[name])


def test_full_table(nih_index: pd.DataFrame) -> None:
    assert len(nih_index) == 112120
    assert nih_index["Patient ID"].nunique() == 30805
    assert int((nih_index[list(FINDINGS)].sum(axis=1) == 0).sum()) == 60361


def test_table1_reproduces_the_paper(nih_index: pd.DataFrame, paper_split: pd.Series) -> None:
    table = table1(nih_index, paper_split)
    splits = table["splits"]
    assert [splits[c]["images"] for c in COLUMNS] == list(PAPER_IMAGES)
    for finding, (*counts, _) in PAPER_TABLE1.items():
        assert [splits[c]["findings"][finding] for c in COLUMNS] == counts, finding
    for row, (*counts, _) in PAPER_LABEL_COUNTS.items():
        assert [splits[c]["label_counts"][row] for c in COLUMNS] == counts, row
    assert set(table) == {"splits", "leakage"}
    assert set(splits) == set(COLUMNS)
    assert list(splits["train"]["findings"]) == list(FINDINGS)
    assert list(splits["train"]["label_counts"]) == ["0", "1", "2", "3", ">=4"]


def test_table1_formats_match_the_paper(nih_index: pd.DataFrame, paper_split: pd.Series) -> None:
    table = table1(nih_index, paper_split)
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(format_table1(table, "csv")))}
    for name, (*counts, percents) in {**PAPER_TABLE1, **PAPER_LABEL_COUNTS}.items():
        assert [int(rows[name][f"{c}_count"]) for c in COLUMNS] == counts
        assert [int(rows[name][f"{c}_total"]) for c in COLUMNS] == list(PAPER_IMAGES)
        assert tuple(float(rows[name][f"{c}_percent"]) for c in COLUMNS) == percents, name
    markdown = format_table1(table, "md")
    assert "| Infiltration | 13,915/78,484 (17.7%) | 1,929/11,211 (17.2%) | 4,050/22,425 (18.1%) | 19,894/112,120 (17.7%) |" in markdown
    assert "| ≥4 | 1,165/78,484 (1.5%) |" in markdown
    assert "Train (70%)" in markdown and "Test (20%)" in markdown
    assert json.loads(format_table1(table, "json")) == table


def test_leakage_of_the_paper_split(nih_index: pd.DataFrame, paper_split: pd.Series) -> None:
    # the paper's image-level split puts most test images next to a training image of the same patient
    assert leakage_report(nih_index, paper_split) == {
        "val_images_with_train_patient": 9110,
        "test_images_with_train_patient": 18337,
    }


def test_patient_split_of_the_real_metadata(nih_index: pd.DataFrame) -> None:
    split = make_split(nih_index, strategy="patient", ratios=(0.7, 0.1, 0.2), seed=0)
    assert split.index.equals(pd.Index(nih_index["Image Index"]))
    check_patient_split(nih_index, split)
    # stratified by finding: each split holds its share of every finding's positives, Hernia included
    counts = positives(nih_index, split)
    shares = counts.div(counts.sum(axis=1), axis=0)
    assert (shares - [0.7, 0.1, 0.2]).abs().to_numpy().max() < 0.01
    assert counts.loc["Hernia"].tolist() == [159, 23, 45]  # 227 positives: 70/10/20 rounded
    assert make_split(nih_index, seed=0).equals(split)
    assert not make_split(nih_index, seed=1).equals(split)


@pytest.mark.parametrize(("n", "tail_floor"), [(240, 0.05), (3000, 0.0)])
def test_patient_split_of_phantoms_has_every_finding_everywhere(n: int, tail_floor: float) -> None:
    index = phantom_index(n, tail_floor)
    for seed in (0, 1):
        split = make_split(index, strategy="patient", seed=seed)
        check_patient_split(index, split)
        assert (positives(index, split) > 0).all(axis=None), positives(index, split)


def test_patient_split_spreads_a_rare_finding_over_the_splits() -> None:
    # Hernia on 3 single-image patients: one in each split; Mass on 2 patients: train and test;
    # Edema on one patient: train, so that training always sees a finding that exists
    index = small_index([p for p in range(60) for _ in range(2)])
    rows = {"Hernia": [0, 2, 4], "Mass": [6, 8], "Edema": [10]}
    for finding, patients in rows.items():
        index.loc[[2 * p for p in patients], finding] = 1
    for seed in range(4):
        counts = positives(index, make_split(index, strategy="patient", seed=seed))
        assert counts.loc["Hernia"].tolist() == [1, 1, 1]
        assert counts.loc["Mass"].tolist() == [1, 0, 1]
        assert counts.loc["Edema"].tolist() == [1, 0, 0]


def test_patient_split_needs_the_findings() -> None:
    with pytest.raises(CxrdxError, match="missing Atelectasis"):
        make_split(small_index([1, 2, 3]).drop(columns="Atelectasis"), strategy="patient")


def test_random_split_is_image_level(nih_index: pd.DataFrame) -> None:
    split = make_split(nih_index, strategy="random", seed=0)
    assert split.value_counts().to_dict() == {"train": 78484, "test": 22424, "val": 11212}
    leak = leakage_report(nih_index, split)
    assert leak["test_images_with_train_patient"] > 15000


def test_official_split(nih_index: pd.DataFrame) -> None:
    split = make_split(nih_index, strategy="official", seed=0)  # the lists shipped with the package
    counts = split.value_counts()
    assert counts["train"] + counts["val"] == 86524
    assert counts["test"] == 25596
    test_list = gzip.decompress(packaged.official_lists()[1].read_bytes()).decode().split()
    assert set(split.index[split == "test"]) == set(test_list)
    assert counts["val"] / 86524 == pytest.approx(0.1 / 0.8, abs=0.01)
    assert leakage_report(nih_index, split) == {"val_images_with_train_patient": 0, "test_images_with_train_patient": 0}
    assert (positives(nih_index, split) > 0).all(axis=None)


def test_official_lists_from_a_folder(tmp_path: Path) -> None:
    index = small_index([90001, 90001, 90002, 90003, 90004, 90005])  # patients that NIH's lists do not have
    names = index["Image Index"].tolist()
    with pytest.raises(CxrdxError, match="train_val_list.txt: no such file"):
        make_split(index, strategy="official", lists_dir=tmp_path)
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:4]) + "\n")
    (tmp_path / "test_list.txt.gz").write_bytes(gzip.compress("\n".join(names[4:]).encode()))
    split = make_split(index, strategy="official", ratios=(0.5, 0.5, 0.0), lists_dir=tmp_path)
    assert split[names[4:]].tolist() == ["test", "test"]
    assert set(split[names[:4]]) == {"train", "val"}
    with pytest.raises(CxrdxError, match="the packaged official lists: 6 images of the metadata are in neither list"):
        make_split(index, strategy="official")
    (tmp_path / "test_list.txt").write_bytes(b"\x1f\x8b broken")
    (tmp_path / "test_list.txt.gz").unlink()
    with pytest.raises(CxrdxError, match="test_list.txt: not a readable list"):
        make_split(index, strategy="official", lists_dir=tmp_path)


def test_resolve_split_file(tmp_path: Path) -> None:
    assert resolve_split_file("paper") == packaged.paper_split()
    assert resolve_split_file(Path("paper")) == packaged.paper_split()
    assert resolve_split_file("./paper") == Path("paper")
    assert resolve_split_file(tmp_path / "s.csv") == tmp_path / "s.csv"


def test_yaml_import_round_trip(chestxray14: Path, nih_index: pd.DataFrame, paper_split: pd.Series, tmp_path: Path) -> None:
    folder = chestxray14 / "reference_yaml_sample"
    split = import_split(folder)
    assert split.value_counts().to_dict() == {"train": 25, "val": 25, "test": 25}
    assert split.index[0] == "00012562_001.png" and split.iloc[0] == "train"
    for name in ("train", "val", "test"):
        assert read_split(folder / f"NIH_multi_{name}.yaml", nih_index).equals(split)
    # the sample lists are entries of the paper's own split
    assert (paper_split[split.index] == split).all()
    write_split(split, tmp_path / "split.csv")
    assert read_split(tmp_path / "split.csv", nih_index).equals(split)
    assert (tmp_path / "split.csv").read_text().splitlines()[:2] == ["Image Index,split", "00012562_001.png,train"]


def test_yaml_import_errors(chestxray14: Path, tmp_path: Path) -> None:
    source = chestxray14 / "reference_yaml_sample"
    for name in ("train", "val"):
        (tmp_path / f"NIH_multi_{name}.yaml").write_text((source / f"NIH_multi_{name}.yaml").read_text())
    with pytest.raises(CxrdxError, match="NIH_multi_test.yaml"):
        read_split(tmp_path / "NIH_multi_train.yaml")
    (tmp_path / "NIH_multi_test.yaml").write_text("data:\n- label: [Mass]\n")
    with pytest.raises(CxrdxError, match="NIH_multi_test.yaml: entry 1 of 'data' has no file_name"):
        read_split(tmp_path)
    (tmp_path / "NIH_multi_test.yaml").write_text((source / "NIH_multi_train.yaml").read_text())
    with pytest.raises(CxrdxError, match="appears more than once"):
        read_split(tmp_path)


def test_read_split_errors(tmp_path: Path) -> None:
    index = small_index([1, 1, 2, 3])
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,split\n00000001_000.png,train\n00000001_001.png,validation\n")
    with pytest.raises(CxrdxError, match=r"bad.csv: line 3: split 'validation'"):
        read_split(bad)
    bad.write_text("Image Index,split\n00000001_000.png,train\n00000001_000.png,test\n")
    with pytest.raises(CxrdxError, match=r"bad.csv: line 3: Image Index '00000001_000.png' appears more than once"):
        read_split(bad)
    bad.write_text("name,fold\na.png,train\n")
    with pytest.raises(CxrdxError, match=r"bad.csv: expected the columns 'Image Index,split'"):
        read_split(bad)
    bad.write_text("Image Index,split\n00000001_000.png,train\n99999999_000.png,test\n")
    with pytest.raises(CxrdxError, match=r"bad.csv: 1 images of the split are not in the metadata; first: 99999999_000.png"):
        read_split(bad, index)
    with pytest.raises(CxrdxError, match="no such file"):
        read_split(tmp_path / "absent.csv")


def test_write_split_gzip_round_trip(tmp_path: Path) -> None:
    index = small_index(list(range(50)))
    split = make_split(index, strategy="random", seed=3)
    write_split(split, tmp_path / "split.csv.gz")
    assert read_split(tmp_path / "split.csv.gz").equals(split)
    assert [p.name for p in tmp_path.iterdir()] == ["split.csv.gz"]  # no temporary file left


def test_patient_split_small_and_ratio_checks() -> None:
    index = small_index([p for p in range(40) for _ in range(p % 4 + 1)])
    split = make_split(index, strategy="patient", ratios=(0.8, 0.2, 0.0), seed=0)
    assert set(split) == {"train", "val"}
    assert leakage_report(index, split)["val_images_with_train_patient"] == 0
    assert abs((split == "val").mean() - 0.2) <= 0.01
    for ratios in [(0.7, 0.1), (0.5, 0.1, 0.1), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)]:
        with pytest.raises(CxrdxError, match="split ratios"):
            make_split(index, ratios=ratios)
    with pytest.raises(CxrdxError, match="unknown split strategy 'kfold'"):
        make_split(index, strategy="kfold")


def test_table1_of_a_partial_split_counts_only_its_images() -> None:
    index = small_index([1, 1, 2, 3, 4])
    index.loc[0, ["Mass", "Nodule"]] = 1
    index.loc[2, list(FINDINGS[:5])] = 1
    split = pd.Series({"00000001_000.png": "train", "00000002_002.png": "test", "00000001_001.png": "val"})
    table = table1(index, split)
    assert table["splits"]["all"]["images"] == 3
    assert table["splits"]["all"]["label_counts"] == {"0": 1, "1": 0, "2": 1, "3": 0, ">=4": 1}
    assert table["splits"]["train"]["findings"]["Mass"] == 1
    assert table["leakage"] == {"val_images_with_train_patient": 1, "test_images_with_train_patient": 0}


def test_cli_reproduces_table1_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # a user who installed cxrdx and has no dataset files: everything comes from the package
    monkeypatch.chdir(tmp_path)
    assert main(["split", "--from", "paper", "--out", "p.csv"]) == 0
    assert "leakage: 9,110 val and 18,337 test images" in capsys.readouterr().out
    assert main(["stats", "--split-file", "p.csv", "--format", "json"]) == 0
    splits = json.loads(capsys.readouterr().out)["splits"]
    assert [splits[c]["images"] for c in COLUMNS] == list(PAPER_IMAGES)
    for finding, (*counts, _) in PAPER_TABLE1.items():
        assert [splits[c]["findings"][finding] for c in COLUMNS] == counts, finding
    assert [splits[c]["findings"]["Infiltration"] for c in COLUMNS] == [13915, 1929, 4050, 19894]
    assert [splits[c]["findings"]["Hernia"] for c in COLUMNS] == [163, 28, 36, 227]


def test_cli_split_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metadata = str(packaged.nih_metadata())
    out = tmp_path / "split.csv"
    assert main(["split", "--metadata", metadata, "--strategy", "patient", "--seed", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "leakage: 0 val and 0 test images" in printed
    assert "train   78,484 images" in printed
    assert main(["split", "--data-dir", str(tmp_path), "--from", "paper", "--out", str(out)]) == 0  # no table there
    assert "leakage: 9,110 val and 18,337 test images" in capsys.readouterr().out
    assert main(["stats", "--metadata", metadata, "--split-file", str(out), "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["splits"]["all"]["findings"]["Hernia"] == 227
    assert table["leakage"]["test_images_with_train_patient"] == 18337
    assert main(["split", "--strategy", "official", "--out", str(out)]) == 0
    assert re.search(r"test +25,596 images", capsys.readouterr().out)


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "absent: no such folder" in capsys.readouterr().err
    assert main(["split", "--from", "paper", "--strategy", "patient", "--out", str(tmp_path / "s.csv")]) == 2
    assert "--from imports an existing split; leave out --strategy" in capsys.readouterr().err
    assert main(["stats", "--metadata", str(tmp_path / "absent.csv"), "--split-file", "x.csv"]) == 2
    assert "absent.csv: no such file" in capsys.readouterr().err
    assert main(["stats", "--pixels"]) == 2
    assert "--pixels needs --cache" in capsys.readouterr().err


def test_cli_pixel_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from cxrdx.data.cache import open_cache, prepare_cache

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    index = small_index([1, 1, 2, 3, 4, 5])
    for name in index["Image Index"]:
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "data" / "images" / name)
    index[["Image Index", "Finding Labels"]].to_csv(tmp_path / "data" / "Data_Entry_2017.csv", index=False)
    prepare_cache(tmp_path / "data", tmp_path / "cache", size=16, progress=False)
    split = make_split(index, strategy="patient", ratios=(0.5, 0.5, 0.0), seed=0)
    write_split(split, tmp_path / "split.csv")

    cache = open_cache(tmp_path / "cache")
    train = cache.images[cache.index["Image Index"].map(split).to_numpy() == "train"] / 255.0
    args = ["stats", "--pixels", "--cache", str(tmp_path / "cache"), "--split-file", str(tmp_path / "split.csv"), "--format", "json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == int((split == "train").sum())
    assert printed["mean"] == pytest.approx(train.mean(), abs=1e-9)
    assert printed["std"] == pytest.approx(train.std(), abs=1e-9)
