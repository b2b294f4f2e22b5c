"""RSNA Pneumonia Detection Challenge (2018): stage_2_train_labels.csv (one row per box), DICOM images.

Target 1 ("Lung Opacity", opacity suggestive of pneumonia) -> Pneumonia 1; Target 0 -> Pneumonia 0.
The other 13 findings are not labelled. View, age and sex come from a headers CSV when one is
given (torchxrayvision ships one) or else from the DICOM headers of the located images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx.data.datasets._common import (
    by_name,
    files_under,
    find_file,
    index_frame,
    label_values,
    normalise_sex,
    normalise_view,
    register,
    require_columns,
)
from cxrdx.data.metadata import read_csv
from cxrdx.errors import CxrdxError

EXTRA_LABELS = ("Lung Opacity",)
LABEL_FILES = ("stage_2_train_labels.csv", "stage_2_train_labels.csv.zip", "stage_1_train_labels.csv")
HEADER_FILES = ("stage_2_train_images_dicom_headers.csv.gz", "stage_2_train_images_dicom_headers.csv")
_HEADER_COLUMNS = ("ViewPosition", "PatientAge", "PatientSex")
_IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")


def read_labels(path: str | Path, headers: str | Path | pd.DataFrame | None = None) -> pd.DataFrame:
    """The challenge's label table (one row per box, or one per image without a box) -> one index row per image.

    `headers`: a CSV (or table) with PatientID, ViewPosition, PatientAge, PatientSex per image.
    """
    path = Path(path)
    table = read_csv(path, dtype={"patientId": str})
    require_columns(table, ("patientId", "Target"), path)
    table["patientId"] = table["patientId"].str.strip()
    target = pd.Series(label_values(table, "Target", path), index=table.index).groupby(table["patientId"], sort=False)
    if (target.min() != target.max()).any():
        raise CxrdxError(f"{path}: image {(target.min() != target.max()).idxmax()!r} has rows with Target 0 and 1")
    per_image = target.max()
    image = per_image.index.to_numpy()
    info = _header_table(headers).reindex(image) if headers is not None else pd.DataFrame(index=image, columns=_HEADER_COLUMNS)
    labels = {"Pneumonia": per_image.to_numpy(), "Lung Opacity": per_image.to_numpy()}
    # one image per patientId: the challenge published no patient identifiers beyond it
    return index_frame(
        "rsna",
        image,
        image,
        labels,
        EXTRA_LABELS,
        view=normalise_view(info["ViewPosition"]),
        sex=normalise_sex(info["PatientSex"]),
        age=_years(info["PatientAge"]),
    )


def _years(ages: pd.Series) -> np.ndarray:
    """DICOM ages ("051Y", or plain "51" as the challenge wrote them) -> years; anything else NaN."""
    text = ages.fillna("").astype(str).str.extract(r"^\s*(\d+)\s*[Yy]?\s*$", expand=False)
    return pd.to_numeric(text, errors="coerce").to_numpy(np.float64)


def _header_table(headers: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(headers, pd.DataFrame):
        return headers
    headers = Path(headers)
    table = read_csv(headers, dtype={"PatientID": str, "ViewPosition": str, "PatientSex": str})
    require_columns(table, ("PatientID", *_HEADER_COLUMNS), headers)
    return table.assign(PatientID=table["PatientID"].str.strip()).drop_duplicates("PatientID").set_index("PatientID")


def dicom_headers(paths: pd.Series) -> pd.DataFrame:
    """View, age and sex read from the DICOM files in `paths` (index = image id); other files give blanks."""
    import pydicom

    rows = {}
    for image, path in paths.dropna().items():
        if not str(path).lower().endswith(".dcm"):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_COLUMNS))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise CxrdxError(f"{path}: unreadable DICOM header ({exc})") from None
        rows[image] = [str(header.get(tag, "")) for tag in _HEADER_COLUMNS]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(_HEADER_COLUMNS))


@register("rsna", EXTRA_LABELS, "RSNA Pneumonia: stage_2_train_labels.csv, stage_2_train_images/*.dcm")
def read(data_dir: Path) -> pd.DataFrame:
    labels = find_file(data_dir, LABEL_FILES, "RSNA label table")
    images = by_name(files_under(data_dir), _IMAGE_SUFFIXES, stem=True)
    try:
        headers: Path | pd.DataFrame = find_file(data_dir, HEADER_FILES, "headers CSV")
    except CxrdxError:
        ids = read_csv(labels, usecols=["patientId"], dtype=str)["patientId"].str.strip().unique()
        headers = dicom_headers(pd.Series(ids, index=ids).map(images))
    table = read_labels(labels, headers)
    return table.assign(path=table["Image Index"].map(images))
