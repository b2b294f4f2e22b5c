"""The ChestX-ray14 metadata that ships inside the package (CC0): labels, splits, boxes, relabels.

A user who downloaded only the images can reproduce the paper's split and Table 1 with these.
Each accessor returns the path of a file inside the installed package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cxrdx.errors import CxrdxError

FOLDER = "chestxray14"
METADATA = "Data_Entry_2017_v2020.csv.gz"
PAPER_SPLIT = "paper_split.csv.gz"
TRAIN_VAL_LIST = "train_val_list.txt.gz"
TEST_LIST = "test_list.txt.gz"
BOXES = "BBox_List_2017.csv.gz"
GOOGLE2019 = "google2019_nih-chest-xray-labels.csv.gz"


def nih_metadata() -> Path:
    """NIH's label table, 2020 revision: 112,120 images of 30,805 patients."""
    return _packaged(METADATA)


def paper_split() -> Path:
    """The paper's exact random image-level 70/10/20 split (`Image Index,split`), from its code release."""
    return _packaged(PAPER_SPLIT)


def official_lists() -> tuple[Path, Path]:
    """NIH's official patient-wise lists: (train_val_list.txt.gz, test_list.txt.gz), 86,524 / 25,596 images."""
    return _packaged(TRAIN_VAL_LIST), _packaged(TEST_LIST)


def nih_boxes() -> Path:
    """NIH's 984 radiologist bounding boxes on 880 images (BBox_List_2017)."""
    return _packaged(BOXES)


def google2019_labels() -> Path:
    """Google's 2019 radiologist-adjudicated labels of 4,376 images for four findings."""
    return _packaged(GOOGLE2019)


def _packaged(name: str) -> Path:
    path = Path(str(resources.files("cxrdx.data").joinpath(FOLDER, name)))
    if not path.is_file():
        raise CxrdxError(f"{path}: the packaged data file is missing; reinstall cxrdx")
    return path
