"""Read ChestX-ray14 `Data_Entry` tables and find the images they name on disk."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrdx.atomic import write_text
from cxrdx.data import packaged
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS, parse_labels

METADATA_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
REQUIRED_COLUMNS = ("Image Index", "Finding Labels")
OPTIONAL_COLUMNS = ("Follow-up #", "View Position", "Patient Age", "Patient Gender")
_TEXT_COLUMNS = ("Image Index", "Finding Labels", "View Position", "Patient Gender")
_WHOLE_NUMBER = r"^\s*(\d+)\s*$"
_AGE = r"^\s*(\d+)\s*[Yy]?\s*$"  # Data_Entry_2017.csv of 2017 wrote ages as "058Y"
_PATIENT_IN_NAME = r"^(\d+)_\d+\.\w+$"  # 00012345_003.png -> 12345
SOURCE_MARKER = "cxrdx_source.json"  # written by a generator beside its Data_Entry table (the phantoms)


def read_metadata(path: str | Path) -> pd.DataFrame:
    """A Data_Entry table (plain or .gz) -> one row per image, in file order.

    Columns: "Image Index", "Patient ID" (int, from the file name when the table has none),
    "Finding Labels", the 14 FINDINGS as uint8, and "Follow-up #", "View Position",
    "Patient Age", "Patient Gender" when the table has them.
    """
    path = Path(path)
    table = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CxrdxError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {', '.join(map(repr, table.columns))}")
    if table.empty:
        raise CxrdxError(f"{path}: the table has no rows")
    names = table["Image Index"].str.strip()
    _check_names(names, path)

    out = {"Image Index": names}
    if "Patient ID" in table.columns:
        out["Patient ID"] = _integers(table["Patient ID"], _WHOLE_NUMBER, path, "Patient ID")
    else:
        out["Patient ID"] = _integers(
            names,
            _PATIENT_IN_NAME,
            path,
            "Image Index",
            hint="cannot take the Patient ID from it (expected names like 00012345_003.png); add a 'Patient ID' column",
        )
    out["Finding Labels"] = _strip(table["Finding Labels"])
    labels = _parse_labels(out["Finding Labels"], path)
    for position, finding in enumerate(FINDINGS):
        out[finding] = labels[:, position]
    for column in OPTIONAL_COLUMNS:
        if column not in table.columns:
            continue
        if column == "Follow-up #":
            out[column] = _integers(table[column], _WHOLE_NUMBER, path, column)
        elif column == "Patient Age":
            out[column] = _integers(table[column], _AGE, path, column)
        else:
            out[column] = _strip(table[column])
    return pd.DataFrame(out)


def find_metadata(data_dir: str | Path | None = None) -> Path:
    """The Data_Entry table in `data_dir` (the 2020 revision of the labels first), else the NIH
    table shipped with cxrdx: images downloaded alone need no label file."""
    if data_dir is None:
        return packaged.nih_metadata()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CxrdxError(f"{data_dir}: no such folder")
    for name in METADATA_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    return packaged.nih_metadata()


def locate_images(index: pd.DataFrame, data_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Find each image of `index` under `data_dir`: flat, images/, or images_001/images/ ... images_012/images/.

    Returns the rows whose image was found (in index order) with a "path" column, and the
    names of the images that were not found. One listing per folder, no per-image stat calls.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CxrdxError(f"{data_dir}: no such folder")
    found: dict[str, str] = {}
    for folder in _image_folders(data_dir):
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name not in found and entry.is_file():
                    found[entry.name] = entry.path
    paths = index["Image Index"].map(found)
    present = paths.notna().to_numpy()
    located = index.loc[present].assign(path=paths[present].astype(str)).reset_index(drop=True)
    missing = index.loc[~present, "Image Index"].tolist()
    return located, missing


def read_csv(path: str | Path, **options: Any) -> pd.DataFrame:
    """pandas.read_csv with a CxrdxError naming the file for anything unreadable; column names stripped."""
    try:
        table = pd.read_csv(path, **options)
    except FileNotFoundError:
        raise CxrdxError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
        raise CxrdxError(f"{path}: not a readable CSV table ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _read_table(path: Path) -> pd.DataFrame:
    # text columns as text; numbers parsed by pandas' C reader, checked in _integers
    return read_csv(path, dtype=dict.fromkeys(_TEXT_COLUMNS, str), keep_default_na=False)


def _line(row: int) -> int:
    """File line of a 0-based data row (line 1 is the header)."""
    return row + 2


def _check_names(names: pd.Series, path: Path) -> None:
    empty = (names == "").to_numpy()
    if empty.any():
        raise CxrdxError(f"{path}: line {_line(int(np.argmax(empty)))}: empty Image Index")
    repeated = names.duplicated().to_numpy()
    if repeated.any():
        row = int(np.argmax(repeated))
        first = int(np.argmax((names == names.iloc[row]).to_numpy()))
        raise CxrdxError(f"{path}: line {_line(row)}: Image Index {names.iloc[row]!r} repeats line {_line(first)}")


def _integers(values: pd.Series, pattern: str, path: Path, column: str, hint: str = "") -> np.ndarray:
    if pd.api.types.is_integer_dtype(values) and (values >= 0).all():
        return values.to_numpy(dtype=np.int64)
    text = values.astype(str)
    digits = text.str.extract(pattern, expand=False)
    bad = digits.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        reason = hint or "expected a whole number"
        raise CxrdxError(f"{path}: line {_line(row)}: {column} {text.iloc[row]!r}: {reason}")
    return digits.astype(np.int64).to_numpy()


def _strip(values: pd.Series) -> pd.Series:
    """str.strip of a column with few distinct values, applied once per value."""
    codes, uniques = pd.factorize(values)
    return pd.Series(uniques.str.strip().to_numpy()[codes], index=values.index, dtype=values.dtype)


def _parse_labels(texts: pd.Series, path: Path) -> np.ndarray:
    """Parse each distinct label string once (ChestX-ray14 has ~800 of them for 112k rows)."""
    codes, uniques = pd.factorize(texts)
    vectors = np.zeros((len(uniques), len(FINDINGS)), dtype=np.uint8)
    for k, text in enumerate(uniques):
        try:
            vectors[k] = parse_labels(text)
        except CxrdxError as exc:
            raise CxrdxError(f"{path}: line {_line(int(np.argmax(codes == k)))}: {exc}") from None
    return vectors[codes]


def _image_folders(root: Path) -> list[Path]:
    with os.scandir(root) as entries:
        parts = sorted(e.name for e in entries if e.is_dir() and e.name.startswith("images_"))
    candidates = [root, root / "images"]
    for name in parts:
        candidates += [root / name / "images", root / name]
    return [folder for folder in candidates if folder.is_dir()]


def write_source_marker(folder: str | Path, values: dict) -> Path:
    """Record where a dataset folder's images come from (e.g. {"name": "cxrdx phantoms", "synthetic": true});
    `cxrdx prepare` copies it into the cache's meta.json as `data_source`, training into the checkpoint."""
    return write_text(Path(folder) / SOURCE_MARKER, json.dumps(values, indent=2) + "\n")


def read_source_marker(folder: str | Path) -> dict | None:
    """The folder's source marker, or None (real data carries none)."""
    try:
        values = json.loads((Path(folder) / SOURCE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None
