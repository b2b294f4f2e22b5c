"""CheXpert (Stanford; v1.0 and v1.0-small): train.csv / valid.csv, labels 1, 0, -1 (uncertain), blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx.data.datasets._common import (
    OFFICIAL_SPLIT,
    apply_uncertain,
    files_under,
    index_frame,
    label_values,
    normalise_sex,
    normalise_view,
    register,
    require_columns,
)
from cxrdx.data.metadata import read_csv
from cxrdx.errors import CxrdxError

# the CheXpert labeller's observations (shared with MIMIC-CXR-JPG's chexpert and negbio tables)
NO_FINDING = "No Finding"
TO_FINDING = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
EXTRA_LABELS = ("Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other", "Fracture", "Support Devices")
OBSERVATIONS = (NO_FINDING, *TO_FINDING, *EXTRA_LABELS)
# "No Finding" says no pathology is mentioned; support devices are not a pathology for the labeller
_NOT_PATHOLOGY = ("Support Devices",)
UNMENTIONED = ("missing", "negative")
LABEL_FILES = (("train.csv", "train"), ("valid.csv", "val"))


def labeller_labels(table: pd.DataFrame, path: Path, uncertain: str, unmentioned: str) -> dict[str, np.ndarray]:
    """The CheXpert labeller's columns -> {finding or extra label: float array}.

    Blank means "not mentioned in the report": NaN, except that "No Finding" = 1 makes the blank
    pathologies 0 (as the labeller defines it); `unmentioned="negative"` makes every blank 0.
    """
    if unmentioned not in UNMENTIONED:
        raise CxrdxError(f"unmentioned must be one of {', '.join(UNMENTIONED)}, not {unmentioned!r}")
    require_columns(table, OBSERVATIONS, path)
    healthy = label_values(table, NO_FINDING, path, (0.0, 1.0, -1.0)) == 1
    out = {}
    for observation in OBSERVATIONS[1:]:
        values = label_values(table, observation, path, (0.0, 1.0, -1.0))
        blank = np.isnan(values)
        if unmentioned == "negative":
            values[blank] = 0.0
        elif observation not in _NOT_PATHOLOGY:
            values[blank & healthy] = 0.0
        out[TO_FINDING.get(observation, observation)] = apply_uncertain(values, uncertain)
    return out


def read_labels(path: str | Path, uncertain: str = "ignore", unmentioned: str = "missing", split: str = "") -> pd.DataFrame:
    """One CheXpert label table (train.csv or valid.csv) -> index rows; Image Index is the path below the dataset folder."""
    path = Path(path)
    table = read_csv(path, dtype={"Path": str, "Sex": str, "Frontal/Lateral": str, "AP/PA": str})
    require_columns(table, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"), path)
    # "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg" -> "train/patient00001/..."
    image = table["Path"].str.strip().str.split("/", n=1).str[1]
    patient = image.str.extract(r"/(patient\d+)/", expand=False)
    bad = patient.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise CxrdxError(f"{path}: line {row + 2}: Path {table['Path'].iloc[row]!r}; expected .../train/patientNNNNN/studyN/viewN_*.jpg")
    lateral = table["Frontal/Lateral"].str.strip().str.lower() == "lateral"
    view = normalise_view(table["AP/PA"].where(~lateral, "LATERAL"))
    age = pd.to_numeric(table["Age"], errors="coerce")
    return index_frame(
        "chexpert",
        image,
        patient,
        labeller_labels(table, path, uncertain, unmentioned),
        EXTRA_LABELS,
        view=view,
        sex=normalise_sex(table["Sex"]),
        age=age.where(age > 0),
        **{OFFICIAL_SPLIT: np.full(len(table), split, dtype=object)},
    )


def locate(table: pd.DataFrame, data_dir: Path) -> pd.Series:
    """Images below `data_dir`, the dataset folder (holding train/ and valid/) or its parent."""
    files = files_under(data_dir)
    below = {rel.split("/", 1)[1]: full for rel, full in files.items() if rel.startswith("CheXpert-v1.0")}
    return table["Image Index"].map(lambda rel: files.get(rel) or below.get(rel))


@register("chexpert", EXTRA_LABELS, "CheXpert v1.0 / v1.0-small: train.csv and valid.csv")
def read(data_dir: Path, uncertain: str = "ignore", unmentioned: str = "missing") -> pd.DataFrame:
    folder = _label_folder(data_dir)
    tables = [read_labels(folder / name, uncertain, unmentioned, split) for name, split in LABEL_FILES if (folder / name).is_file()]
    table = pd.concat(tables, ignore_index=True)
    return table.assign(path=locate(table, data_dir))


def _label_folder(data_dir: Path) -> Path:
    """`data_dir` when it holds train.csv or valid.csv, else its CheXpert-v1.0* folder that does."""
    if not data_dir.is_dir():
        raise CxrdxError(f"{data_dir}: no such folder")
    for folder in (data_dir, *sorted(data_dir.glob("CheXpert-v1.0*"))):
        if any((folder / name).is_file() for name, _ in LABEL_FILES):
            return folder
    raise CxrdxError(f"{data_dir}: no CheXpert label table; expected train.csv and/or valid.csv (or in CheXpert-v1.0*/)")
