"""PadChest (BIMCV, Alicante): one labels CSV whose `Labels` column lists the report's terms.

The term list of a report is exhaustive over PadChest's vocabulary, so a finding whose terms are
absent is negative (0). A report without an informative term (blank, or only 'unchanged' /
'exclude' / 'suboptimal study') says nothing: its findings are NaN.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx.data.datasets._common import (
    by_name,
    files_under,
    find_file,
    index_frame,
    normalise_sex,
    normalise_view,
    register,
    require_columns,
)
from cxrdx.data.metadata import read_csv
from cxrdx.errors import CxrdxError

LABEL_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
# exact PadChest terms per finding (not substrings: 'pseudonodule' is no nodule, 'subcutaneous
# emphysema' no emphysema, 'pericardial effusion' no pleural effusion); see docs/datasets.md
TERMS = {
    "Atelectasis": (
        "atelectasis",
        "atelectasis basal",
        "laminar atelectasis",
        "lobar atelectasis",
        "segmental atelectasis",
        "round atelectasis",
        "total atelectasis",
    ),
    "Cardiomegaly": ("cardiomegaly",),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("pulmonary edema",),
    "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion", "hydropneumothorax", "empyema"),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Hernia": ("hiatal hernia",),
    "Infiltration": (
        "infiltrates",
        "interstitial pattern",
        "ground glass pattern",
        "reticular interstitial pattern",
        "reticulonodular interstitial pattern",
        "alveolar pattern",
    ),
    "Mass": ("mass", "pulmonary mass", "mediastinal mass", "pleural mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
}
UNINFORMATIVE = frozenset(("", "unchanged", "exclude", "suboptimal study"))


def parse_terms(text: str, path: Path, row: int) -> frozenset[str]:
    """ "['pleural effusion', 'nodule']" -> its terms; a blank cell -> no terms."""
    if not text.strip():
        return frozenset()
    try:
        terms = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        terms = None
    if not isinstance(terms, list):
        raise CxrdxError(f"{path}: line {row + 2}: Labels {text[:60]!r}; expected a list like ['nodule', 'pneumonia']")
    return frozenset(str(t).strip() for t in terms)


def term_labels(texts: pd.Series, path: Path) -> dict[str, np.ndarray]:
    """The Labels column -> {finding: float array}, each distinct cell parsed once; uninformative rows are NaN."""
    codes, uniques = pd.factorize(texts.fillna(""))
    terms = [parse_terms(text, path, int(np.argmax(codes == k))) for k, text in enumerate(uniques)]
    informative = np.array([not t <= UNINFORMATIVE for t in terms])
    out = {}
    for finding, names in TERMS.items():
        per_unique = np.where(informative, [float(not t.isdisjoint(names)) for t in terms], np.nan)
        out[finding] = per_unique[codes]
    return out


def read_labels(path: str | Path) -> pd.DataFrame:
    """The PadChest labels CSV -> index rows (Image Index = ImageID; age from study year - birth year)."""
    path = Path(path)
    table = read_csv(
        path,
        dtype={"ImageID": str, "PatientID": str, "Projection": str, "PatientSex_DICOM": str, "Labels": str, "StudyDate_DICOM": str},
        low_memory=False,
    )
    require_columns(table, ("ImageID", "PatientID", "Projection", "Labels"), path)
    image = table["ImageID"].str.strip()
    if image.duplicated().any():
        row = int(np.argmax(image.duplicated().to_numpy()))
        raise CxrdxError(f"{path}: line {row + 2}: ImageID {image.iloc[row]!r} repeats")
    age = np.full(len(table), np.nan)
    if {"StudyDate_DICOM", "PatientBirth"} <= set(table.columns):
        year = pd.to_numeric(table["StudyDate_DICOM"].str[:4], errors="coerce")
        age = (year - pd.to_numeric(table["PatientBirth"], errors="coerce")).to_numpy()
    sex = normalise_sex(table["PatientSex_DICOM"]) if "PatientSex_DICOM" in table.columns else None
    return index_frame(
        "padchest",
        image,
        table["PatientID"].str.strip(),
        term_labels(table["Labels"], path),
        (),
        view=normalise_view(table["Projection"]),
        sex=sex,
        age=age,
    )


@register("padchest", (), "PadChest: the labels CSV, images in numbered folders (ImageDir) or flat")
def read(data_dir: Path) -> pd.DataFrame:
    table = read_labels(find_file(data_dir, (f"{LABEL_FILE}.gz", LABEL_FILE), "PadChest labels CSV"))
    images = by_name(files_under(data_dir), (".png",))
    return table.assign(path=table["Image Index"].map(images))
