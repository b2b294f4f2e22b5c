"""VinDr-CXR: image-level labels (`image_labels_train.csv` / `_test.csv`, one row per radiologist and
image) or box annotations (PhysioNet `annotations_*.csv`, Kaggle VinBigData `train.csv`).

Training images were read by three radiologists each; `readers="any"` (default) calls a label
positive when one of them marked it, `readers="majority"` when more than half did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx.data.datasets._common import OFFICIAL_SPLIT, by_name, files_under, index_frame, register, require_columns
from cxrdx.data.metadata import read_csv
from cxrdx.errors import CxrdxError

TO_FINDING = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Emphysema": "Emphysema",
    "Infiltration": "Infiltration",
    "Pleural effusion": "Effusion",
    "Pleural thickening": "Pleural_Thickening",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary fibrosis": "Fibrosis",
}
NODULE_MASS = "Nodule/Mass"  # 0 -> Nodule 0 and Mass 0; 1 -> both NaN (one of them, which is unknown)
NO_FINDING = "No finding"
EXTRA_LABELS = (
    "Aortic enlargement",
    "Calcification",
    "Clavicle fracture",
    "Enlarged PA",
    "ILD",
    "Lung cavity",
    "Lung cyst",
    "Lung Opacity",
    "Mediastinal shift",
    NODULE_MASS,
    "Other lesion",
    "Rib fracture",
    "COPD",
    "Lung tumor",
    "Tuberculosis",
    "Other disease",
)
# the 14 classes of the Kaggle VinBigData challenge; a box file with any other class is PhysioNet's 22 local labels
KAGGLE_CLASSES = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    NODULE_MASS,
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
LOCAL_CLASSES = (
    *KAGGLE_CLASSES,
    "Clavicle fracture",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Rib fracture",
)
READERS = ("any", "majority")
_CANONICAL = {name.lower(): name for name in (*TO_FINDING, *EXTRA_LABELS, NO_FINDING)}
_CANONICAL |= {"other diseases": "Other disease", "interstitial lung disease": "ILD"}
_IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")


def _canonical(name: str, path: Path) -> str:
    found = _CANONICAL.get(name.strip().lower())
    if found is None:
        raise CxrdxError(f"{path}: unknown VinDr-CXR label {name!r}")
    return found


def _aggregate(marks: pd.DataFrame, readers: str) -> pd.DataFrame:
    """(image, reader) rows of 0/1 -> one row per image: any reader, or more than half of them."""
    if readers not in READERS:
        raise CxrdxError(f"readers must be one of {', '.join(READERS)}, not {readers!r}")
    grouped = marks.groupby("image_id", sort=False)
    return grouped.max() if readers == "any" else (grouped.mean() > 0.5).astype(np.float64)


def _to_index(per_image: pd.DataFrame) -> pd.DataFrame:
    labels = {TO_FINDING.get(c, c): per_image[c].to_numpy(np.float64) for c in per_image.columns if c != NO_FINDING}
    if NODULE_MASS in labels:
        either = np.where(labels[NODULE_MASS] == 1, np.nan, labels[NODULE_MASS])
        labels["Nodule"], labels["Mass"] = either, either.copy()
    image = per_image.index.to_numpy()
    # no patient identifiers are published: every image is its own patient
    return index_frame("vindr", image, image, labels, EXTRA_LABELS)


def read_image_labels(path: str | Path, readers: str = "any") -> pd.DataFrame:
    """image_labels_train.csv / image_labels_test.csv -> index rows (labels a column per class, 0/1)."""
    path = Path(path)
    table = read_csv(path, dtype={"image_id": str})
    require_columns(table, ["image_id"], path)
    reader_column = next((c for c in table.columns if c.lower() == "rad_id"), None)
    classes = [c for c in table.columns if c not in ("image_id", reader_column)]
    marks = table[classes].apply(pd.to_numeric, errors="coerce")
    if marks.isna().any().any() or not marks.isin((0, 1)).all().all():
        row, col = np.argwhere((marks.isna() | ~marks.isin((0, 1))).to_numpy())[0]
        raise CxrdxError(f"{path}: line {row + 2}: {classes[col]} {table[classes[col]].iloc[row]!r}; expected 0 or 1")
    marks.columns = [_canonical(c, path) for c in classes]
    marks.insert(0, "image_id", table["image_id"].str.strip())
    return _to_index(_aggregate(marks, readers))


def read_annotations(path: str | Path, readers: str = "any") -> pd.DataFrame:
    """A box file (image_id, class_name, rad_id, boxes) -> index rows; a reader's 'No finding' marks all classes 0."""
    path = Path(path)
    table = read_csv(path, dtype={"image_id": str, "class_name": str, "rad_id": str})
    require_columns(table, ["image_id", "class_name", "rad_id"], path)
    names = table["class_name"].map(lambda n: _canonical(str(n), path))
    marked = set(names) - {NO_FINDING}
    classes = KAGGLE_CLASSES if marked <= set(KAGGLE_CLASSES) else LOCAL_CLASSES
    unexpected = sorted(marked - set(classes))
    if unexpected:
        raise CxrdxError(f"{path}: global label(s) {', '.join(unexpected)} in a box file; use image_labels_*.csv")
    marks = pd.crosstab([table["image_id"].str.strip(), table["rad_id"]], names).clip(upper=1)
    marks = marks.reindex(columns=list(classes), fill_value=0).astype(np.float64).reset_index(level="rad_id", drop=True)
    return _to_index(_aggregate(marks.reset_index(), readers))


@register("vindr", EXTRA_LABELS, "VinDr-CXR: annotations/image_labels_{train,test}.csv (or a box file), train/ and test/")
def read(data_dir: Path, readers: str = "any") -> pd.DataFrame:
    if not data_dir.is_dir():
        raise CxrdxError(f"{data_dir}: no such folder")
    tables = []
    for part in ("train", "test"):
        found = next(
            (f / f"image_labels_{part}.csv" for f in (data_dir / "annotations", data_dir) if (f / f"image_labels_{part}.csv").is_file()),
            None,
        )
        if found is not None:
            tables.append(read_image_labels(found, readers).assign(**{OFFICIAL_SPLIT: part}))
    if not tables:
        boxes = [data_dir / "annotations" / "annotations_train.csv", data_dir / "train.csv"]
        found = next((p for p in boxes if p.is_file()), None)
        if found is None:
            raise CxrdxError(
                f"{data_dir}: no VinDr-CXR labels; expected annotations/image_labels_train.csv, "
                "annotations/image_labels_test.csv, or the box file train.csv"
            )
        tables = [read_annotations(found, readers).assign(**{OFFICIAL_SPLIT: "train"})]
    table = pd.concat(tables, ignore_index=True)
    images = by_name(files_under(data_dir), _IMAGE_SUFFIXES, stem=True)
    return table.assign(path=table["Image Index"].map(images))
