"""What every dataset adapter shares: the index columns, the registry, label policies, views, image lookup."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

IMAGE, PATIENT, VIEW, SEX, AGE = "Image Index", "Patient ID", "View Position", "Patient Gender", "Patient Age"
DATASET, PATH, OFFICIAL_SPLIT = "dataset", "path", "Official Split"
FRONTAL = ("PA", "AP")
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")

_VIEW_ALIASES = {
    "PA": "PA",
    "POSTEROANTERIOR": "PA",
    "AP": "AP",
    "ANTEROPOSTERIOR": "AP",
    "AP_HORIZONTAL": "AP",
    "AP SUPINE": "AP",
    "L": "LATERAL",
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
}
_SEX_ALIASES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}


@dataclass
class Index:
    """One dataset's images with harmonised labels, as `read_dataset` returns them.

    `table`: one row per located image: Image Index, Patient ID (text), View Position, Patient Gender
    (M, F or empty), Patient Age (years, NaN when unknown), the 14 FINDINGS as float (1, 0, or NaN
    where the dataset does not say), the dataset's extra labels (same coding), dataset, path, and
    Official Split where the dataset has one.
    """

    dataset: str
    table: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    excluded_views: dict[str, int] = field(default_factory=dict)
    extra_labels: tuple[str, ...] = ()

    def unlabelled(self) -> list[str]:
        """The findings that no image of this dataset labels (all NaN)."""
        return [f for f in FINDINGS if self.table[f].isna().all()]


@dataclass(frozen=True)
class Adapter:
    """`read(data_dir, uncertain=..., **options)` -> the full table of the dataset, `path` NaN where missing."""

    name: str
    read: Callable[..., pd.DataFrame]
    extra_labels: tuple[str, ...]
    summary: str


ADAPTERS: dict[str, Adapter] = {}


def register(name: str, extra_labels: Sequence[str], summary: str) -> Callable:
    """Decorator: add a dataset reader to ADAPTERS under `name`."""

    def wrap(read: Callable[..., pd.DataFrame]) -> Callable[..., pd.DataFrame]:
        ADAPTERS[name] = Adapter(name, read, tuple(extra_labels), summary)
        return read

    return wrap


# --- tables -----------------------------------------------------------------------------------------


def require_columns(table: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CxrdxError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {', '.join(map(repr, table.columns))}")


def find_file(data_dir: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (relative paths) that exists under `data_dir`."""
    if not data_dir.is_dir():
        raise CxrdxError(f"{data_dir}: no such folder")
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise CxrdxError(f"{data_dir}: no {what}; expected one of {', '.join(names)}")


def label_values(table: pd.DataFrame, column: str, path: Path, allowed: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """A label column as float64 (blank -> NaN); any value outside `allowed` raises naming its line."""
    column_values = table[column]
    values = pd.to_numeric(column_values, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    if pd.api.types.is_numeric_dtype(column_values):
        written = column_values.notna().to_numpy()
    else:
        written = (column_values.notna() & (column_values.astype(str).str.strip() != "")).to_numpy()
    bad = np.where(np.isnan(values), written, ~np.isin(values, allowed))
    if bad.any():
        row = int(np.argmax(bad))
        raise CxrdxError(
            f"{path}: line {row + 2}: {column} {str(column_values.iloc[row])!r}; expected one of "
            f"{', '.join(f'{v:g}' for v in allowed)} or blank"
        )
    return values


def apply_uncertain(values: np.ndarray, policy: str) -> np.ndarray:
    """-1 (uncertain) -> NaN ('ignore'), 1 ('positive') or 0 ('negative')."""
    if policy not in UNCERTAIN_POLICIES:
        raise CxrdxError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, not {policy!r}")
    replacement = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}[policy]
    return np.where(values == -1, replacement, values)


def normalise_view(raw: pd.Series) -> pd.Series:
    """PA / AP / LATERAL for the usual spellings, other codes upper-cased as they are, '' when unknown."""
    text = raw.fillna("").astype(str).str.strip().str.upper()
    return text.map(lambda v: _VIEW_ALIASES.get(v, v))


def normalise_sex(raw: pd.Series) -> pd.Series:
    text = raw.fillna("").astype(str).str.strip().str.upper()
    return text.map(lambda v: _SEX_ALIASES.get(v, ""))


def index_frame(
    dataset: str,
    image: ArrayLike,
    patient: ArrayLike,
    labels: Mapping[str, np.ndarray],
    extra_labels: Sequence[str],
    view: ArrayLike | None = None,
    sex: ArrayLike | None = None,
    age: ArrayLike | None = None,
    **more: ArrayLike,
) -> pd.DataFrame:
    """The index columns in their fixed order; a finding absent from `labels` is NaN (not labelled)."""
    n = len(np.asarray(image))
    blank = np.full(n, "", dtype=object)
    out = {
        IMAGE: np.asarray(image, dtype=object),
        PATIENT: np.asarray(patient).astype(str).astype(object),
        VIEW: np.asarray(view, dtype=object) if view is not None else blank,
        SEX: np.asarray(sex, dtype=object) if sex is not None else blank,
        AGE: np.asarray(age, dtype=np.float64) if age is not None else np.full(n, np.nan),
    }
    for name in (*FINDINGS, *extra_labels):
        out[name] = np.asarray(labels[name], dtype=np.float32) if name in labels else np.full(n, np.nan, np.float32)
    out[DATASET] = np.full(n, dataset, dtype=object)
    out.update({k: np.asarray(v, dtype=object) for k, v in more.items()})
    return pd.DataFrame(out)


# --- images on disk ---------------------------------------------------------------------------------


def files_under(root: Path) -> dict[str, str]:
    """Relative POSIX path -> full path of every file below `root`, from one walk (no per-image stat)."""
    found: dict[str, str] = {}
    if not root.is_dir():
        return found
    for folder, _, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in names:
            found[prefix + name] = os.path.join(folder, name)
    return found


def by_name(files: Mapping[str, str], suffixes: Sequence[str] | None = None, stem: bool = False) -> dict[str, str]:
    """File name (or name without suffix when `stem`) -> full path; the first found wins."""
    out: dict[str, str] = {}
    for rel, full in sorted(files.items()):
        name = rel.rsplit("/", 1)[-1]
        base, dot, suffix = name.rpartition(".")
        if suffixes is not None and f".{suffix.lower()}" not in suffixes:
            continue
        out.setdefault(base if stem and dot else name, full)
    return out
