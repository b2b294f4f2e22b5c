"""MIMIC-CXR-JPG 2.x: labels per study (chexpert or negbio table), metadata and official split per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx.data.datasets._common import (
    OFFICIAL_SPLIT,
    files_under,
    find_file,
    index_frame,
    normalise_view,
    register,
    require_columns,
)
from cxrdx.data.datasets.chexpert import EXTRA_LABELS, labeller_labels
from cxrdx.data.metadata import read_csv
from cxrdx.errors import CxrdxError

LABELLERS = ("chexpert", "negbio")
_KEYS = ["subject_id", "study_id"]
_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def _table(data_dir: Path, kind: str) -> Path:
    names = [f"mimic-cxr-2.0.0-{kind}.csv{gz}" for gz in (".gz", "")]
    return find_file(data_dir, names, f"MIMIC-CXR-JPG {kind} table")


def read_labels(
    labels: str | Path,
    metadata: str | Path,
    split: str | Path | None = None,
    uncertain: str = "ignore",
    unmentioned: str = "missing",
) -> pd.DataFrame:
    """Join the per-study labels onto the per-image metadata; Image Index is the path below files/.

    Images of a study without a label row keep NaN labels (not labelled), they are not dropped.
    """
    labels, metadata = Path(labels), Path(metadata)
    meta = read_csv(metadata, dtype={"dicom_id": str, "ViewPosition": str})
    require_columns(meta, ["dicom_id", *_KEYS, "ViewPosition"], metadata)
    studies = read_csv(labels)
    require_columns(studies, _KEYS, labels)
    if studies.duplicated(_KEYS).any():
        row = int(np.argmax(studies.duplicated(_KEYS).to_numpy()))
        raise CxrdxError(f"{labels}: line {row + 2}: study {studies['study_id'].iloc[row]} repeats")
    studies = studies.assign(**{k: studies[k].astype(np.int64) for k in _KEYS})
    joined = meta.assign(**{k: meta[k].astype(np.int64) for k in _KEYS}).merge(studies, on=_KEYS, how="left")
    subject, study = joined["subject_id"].astype(str), joined["study_id"].astype(str)
    image = "p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + joined["dicom_id"].str.strip() + ".jpg"
    official = np.full(len(joined), "", dtype=object)
    if split is not None:
        split = Path(split)
        parts = read_csv(split, dtype={"dicom_id": str, "split": str})
        require_columns(parts, ["dicom_id", "split"], split)
        official = joined["dicom_id"].map(parts.set_index("dicom_id")["split"].map(_SPLITS)).fillna("").to_numpy()
    return index_frame(
        "mimic",
        image,
        subject,
        labeller_labels(joined, labels, uncertain, unmentioned),
        EXTRA_LABELS,
        view=normalise_view(joined["ViewPosition"]),
        **{OFFICIAL_SPLIT: official},
    )


@register("mimic", EXTRA_LABELS, "MIMIC-CXR-JPG 2.x: *-chexpert.csv or *-negbio.csv, *-metadata.csv, *-split.csv")
def read(data_dir: Path, uncertain: str = "ignore", unmentioned: str = "missing", labeller: str = "chexpert") -> pd.DataFrame:
    if labeller not in LABELLERS:
        raise CxrdxError(f"labeller must be one of {', '.join(LABELLERS)}, not {labeller!r}")
    try:
        split: Path | None = _table(data_dir, "split")
    except CxrdxError:
        split = None
    table = read_labels(_table(data_dir, labeller), _table(data_dir, "metadata"), split, uncertain, unmentioned)
    files = files_under(data_dir / "files")
    return table.assign(path=table["Image Index"].map(files))
