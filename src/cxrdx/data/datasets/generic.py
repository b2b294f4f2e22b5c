"""A hospital's own export: one CSV with an image path, one column per finding, optional patient/view/sex/age.

    path,patient,view,sex,age,Effusion,Pneumothorax,Cardiomegaly
    2024/0001.dcm,P17,PA,F,64,1,0,
    2024/0002.png,P17,LATERAL,F,64,0,-1,0

Finding columns are named as the 14 findings (case, spaces and underscores do not matter); values
1, 0, -1 (uncertain) or blank (not labelled, NaN). A finding without a column is not labelled.
Paths are relative to the data folder (or absolute). Without a patient column every image is its
own patient, which makes a patient-wise split image-wise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx.data.datasets._common import (
    apply_uncertain,
    files_under,
    index_frame,
    label_values,
    normalise_sex,
    normalise_view,
    register,
)
from cxrdx.data.metadata import read_csv
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

LABEL_FILE = "labels.csv"
META_ALIASES = {
    "path": ("path", "image", "image index", "file"),
    "patient": ("patient", "patient id", "patient_id"),
    "view": ("view", "view position", "viewposition"),
    "sex": ("sex", "gender", "patient gender", "patient sex"),
    "age": ("age", "patient age"),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _columns(table: pd.DataFrame, path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """{meta role: column} and {finding: column}; any other column is an error."""
    findings = {_key(f): f for f in FINDINGS}
    roles = {_key(alias): role for role, aliases in META_ALIASES.items() for alias in aliases}
    meta, labels, unknown = {}, {}, []
    for column in table.columns:
        key = _key(column)
        if key in roles and roles[key] not in meta:
            meta[roles[key]] = column
        elif key in findings and findings[key] not in labels:
            labels[findings[key]] = column
        else:
            unknown.append(column)
    if unknown:
        raise CxrdxError(
            f"{path}: unknown or repeated column(s) {', '.join(map(repr, unknown))}; expected path, patient, view, sex, "
            f"age and finding columns named {', '.join(FINDINGS)}"
        )
    if "path" not in meta:
        raise CxrdxError(f"{path}: no image path column (name it 'path')")
    return meta, labels


def read_labels(path: str | Path, uncertain: str = "ignore") -> pd.DataFrame:
    """The export CSV -> index rows; Image Index is the path as written."""
    path = Path(path)
    table = read_csv(path, dtype=str, keep_default_na=False)
    meta, columns = _columns(table, path)
    image = table[meta["path"]].str.strip()
    if (image == "").any() or image.duplicated().any():
        row = int(np.argmax(((image == "") | image.duplicated()).to_numpy()))
        raise CxrdxError(f"{path}: line {row + 2}: image path {image.iloc[row]!r} is empty or repeats")
    labels = {f: apply_uncertain(label_values(table, c, path, (0.0, 1.0, -1.0)), uncertain) for f, c in columns.items()}
    if "age" in meta:
        age = pd.to_numeric(table[meta["age"]], errors="coerce")
        bad = (table[meta["age"]].str.strip() != "") & (age.isna() | (age < 0))
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise CxrdxError(f"{path}: line {row + 2}: age {table[meta['age']].iloc[row]!r}; expected years or blank")
    return index_frame(
        "generic",
        image,
        table[meta["patient"]].str.strip() if "patient" in meta else image,
        labels,
        (),
        view=normalise_view(table[meta["view"]]) if "view" in meta else None,
        sex=normalise_sex(table[meta["sex"]]) if "sex" in meta else None,
        age=age.to_numpy() if "age" in meta else None,
    )


@register("generic", (), "a CSV of your own: path, findings, optional patient/view/sex/age (labels.csv)")
def read(data_dir: Path, uncertain: str = "ignore", labels: str | Path | None = None) -> pd.DataFrame:
    if not data_dir.is_dir():
        raise CxrdxError(f"{data_dir}: no such folder")
    table = read_labels(Path(labels) if labels is not None else data_dir / LABEL_FILE, uncertain)
    files = files_under(data_dir)

    def where(image: str) -> str | None:
        if Path(image).is_absolute():
            return image if Path(image).is_file() else None
        return files.get(os.path.normpath(image).replace(os.sep, "/"))

    return table.assign(path=table["Image Index"].map(where))
