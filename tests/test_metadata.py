"""Reading Data_Entry tables and locating images in the layouts people have."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdx.data import packaged
from cxrdx.data.metadata import find_metadata, locate_images, read_metadata
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS, format_labels

BASE_COLUMNS = ["Image Index", "Patient ID", "Finding Labels", *FINDINGS]
OFFICIAL_COLUMNS = [*BASE_COLUMNS, "Follow-up #", "View Position", "Patient Age", "Patient Gender"]

# Data_Entry_2017.csv as NIH first published it: ages like "058Y", a trailing comma on every row
DATA_ENTRY_2017 = """\
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Emphysema,1,1,058Y,M,PA,2894,2729,0.143,0.143,
00000002_000.png,No Finding,0,2,081Y,M,AP,2500,2048,0.171,0.171,
"""


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_reads_the_official_table(nih_sample: Path) -> None:
    index = read_metadata(nih_sample / "Data_Entry_2017_v2020.csv")
    assert len(index) == 120
    assert list(index.columns) == OFFICIAL_COLUMNS
    assert index["Patient ID"].dtype == np.int64 and index["Patient Age"].dtype == np.int64
    assert all(index[f].dtype == np.uint8 for f in FINDINGS)
    labels = index[list(FINDINGS)].to_numpy()
    assert [format_labels(v) for v in labels] == index["Finding Labels"].tolist()
    names = pd.read_csv(nih_sample / "Data_Entry_2017_v2020.csv")["Image Index"].tolist()
    assert index["Image Index"].tolist() == names  # file order


@pytest.mark.parametrize("name", ["Data_Entry_2017.csv", "Data_Entry_2017.csv.gz"])
def test_reads_the_2017_table_plain_and_gzip(tmp_path: Path, name: str) -> None:
    index = read_metadata(write(tmp_path / name, DATA_ENTRY_2017))
    assert list(index.columns) == OFFICIAL_COLUMNS
    assert index["Patient Age"].tolist() == [58, 58, 81]
    assert index["Patient ID"].tolist() == [1, 1, 2]
    assert index.loc[1, "Emphysema"] == 1 and index.loc[1, "Cardiomegaly"] == 1
    assert index.loc[2, list(FINDINGS)].sum() == 0


def test_minimal_table_takes_the_patient_from_the_name(tmp_path: Path) -> None:
    path = write(tmp_path / "labels.csv", "Image Index,Finding Labels\n00012345_003.png,Mass|Nodule\n00000007_000.png,No Finding\n")
    index = read_metadata(path)
    assert list(index.columns) == BASE_COLUMNS
    assert index["Patient ID"].tolist() == [12345, 7]
    assert index.loc[0, ["Mass", "Nodule"]].tolist() == [1, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Image Index,Finding Labels\na_1.png,Mass\n", r"line 2: Image Index 'a_1.png': cannot take the Patient ID"),
        ("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n00000001_001.png,Mass,one\n", r"line 3: Patient ID 'one'"),
        ("Image Index,Finding Labels\n00000001_000.png,Mass\n00000001_001.png,Mass|Tumour\n", r"line 3: unknown finding 'Tumour'"),
        ("Image Index,Finding Labels\n00000001_000.png,\n", r"line 2: empty Finding Labels"),
        ("Image Index,Labels\n00000001_000.png,Mass\n", r"missing column\(s\) 'Finding Labels'; found 'Image Index', 'Labels'"),
        (
            "Image Index,Finding Labels\n00000001_000.png,Mass\n00000001_000.png,Nodule\n",
            r"line 3: Image Index '00000001_000.png' repeats line 2",
        ),
        ("Image Index,Finding Labels\n", r"the table has no rows"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "meta.csv", text)
    with pytest.raises(CxrdxError, match=message) as caught:
        read_metadata(path)
    assert str(path) in str(caught.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CxrdxError, match="no such file"):
        read_metadata(tmp_path / "absent.csv")
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CxrdxError, match="broken.csv.gz: not a readable CSV table"):
        read_metadata(tmp_path / "broken.csv.gz")


def test_find_metadata_prefers_the_2020_labels(tmp_path: Path) -> None:
    # a folder without a table (images downloaded alone) and no folder at all: NIH's shipped table
    assert find_metadata(tmp_path) == find_metadata() == packaged.nih_metadata()
    write(tmp_path / "Data_Entry_2017.csv", DATA_ENTRY_2017)
    assert find_metadata(tmp_path) == tmp_path / "Data_Entry_2017.csv"
    write(tmp_path / "Data_Entry_2017_v2020.csv.gz", DATA_ENTRY_2017)
    assert find_metadata(tmp_path) == tmp_path / "Data_Entry_2017_v2020.csv.gz"
    with pytest.raises(CxrdxError, match="no such folder"):
        find_metadata(tmp_path / "absent")


def names_index(count: int) -> pd.DataFrame:
    return pd.DataFrame({"Image Index": [f"{i:08d}_000.png" for i in range(1, count + 1)], "Patient ID": range(1, count + 1)})


@pytest.mark.parametrize("layout", ["flat", "images", "kaggle"])
def test_locate_images_in_each_layout(tmp_path: Path, layout: str) -> None:
    index = names_index(30)
    for i, name in enumerate(index["Image Index"][:27]):  # the last three are missing
        folder = {"flat": tmp_path, "images": tmp_path / "images", "kaggle": tmp_path / f"images_{i // 10 + 1:03d}" / "images"}[layout]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"png")
    located, missing = locate_images(index, tmp_path)
    assert located["Image Index"].tolist() == index["Image Index"][:27].tolist()
    assert all(Path(p).name == n and Path(p).is_file() for p, n in zip(located["path"], located["Image Index"]))
    assert missing == index["Image Index"][27:].tolist()
    assert list(located.columns) == ["Image Index", "Patient ID", "path"]
    if layout == "kaggle":
        assert Path(located["path"].iloc[25]).parent == tmp_path / "images_003" / "images"


def test_locate_images_lists_each_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = names_index(200)
    (tmp_path / "images").mkdir()
    for name in index["Image Index"]:
        (tmp_path / "images" / name).write_bytes(b"png")
    calls = []
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: calls.append(self) or real_stat(self, **kw))
    located, missing = locate_images(index, tmp_path)
    assert len(located) == 200 and missing == []
    assert len(calls) < 10  # a few folder checks, not one per image


def test_locate_real_sample(nih_sample: Path) -> None:
    index = read_metadata(nih_sample / "Data_Entry_2017_v2020.csv")
    located, missing = locate_images(index, nih_sample)
    assert len(located) == 120 and missing == []
    with pytest.raises(CxrdxError, match="no such folder"):
        locate_images(index, nih_sample / "absent")


def test_packaged_files_ship_with_the_package() -> None:
    from cxrdx.data.splits import _read_list
    from cxrdx.explain.localization import box_file, read_boxes
    from cxrdx.metrics import read_expert_labels

    index = read_metadata(packaged.nih_metadata())
    assert len(index) == 112120 and index["Patient ID"].nunique() == 30805
    assert list(index.columns[:3]) == ["Image Index", "Patient ID", "Finding Labels"]
    train_val, test = (_read_list(path) for path in packaged.official_lists())
    assert (len(train_val), len(test)) == (86524, 25596)
    assert set(train_val) | set(test) == set(index["Image Index"])
    boxes = read_boxes(box_file(None))
    assert box_file(None) == packaged.nih_boxes()
    assert (len(boxes), boxes["Image Index"].nunique()) == (984, 880)
    assert len(read_expert_labels(packaged.google2019_labels())) == 4376
    assert pd.read_csv(packaged.paper_split())["split"].value_counts().to_dict() == {"train": 78484, "test": 22425, "val": 11211}
