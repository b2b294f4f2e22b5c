"""The 14 ChestX-ray14 findings in canonical order, and "A|B" label strings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from cxrdx.errors import CxrdxError

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
_POSITION = {name: i for i, name in enumerate(FINDINGS)}


def parse_labels(text: str, row: int | str | None = None) -> np.ndarray:
    """'Effusion|Mass' -> length-14 uint8 vector; 'No Finding' -> zeros.

    Unknown names raise CxrdxError naming the row when one is given.
    """
    vector = np.zeros(len(FINDINGS), dtype=np.uint8)
    text = (text or "").strip()
    if text in ("", NO_FINDING):
        if text == "":
            where = f" (row {row})" if row is not None else ""
            raise CxrdxError(f"empty Finding Labels{where}; expected 'No Finding' or names like 'Effusion|Mass'")
        return vector
    for name in text.split("|"):
        name = name.strip()
        position = _POSITION.get(name)
        if position is None:
            where = f" in row {row}" if row is not None else ""
            raise CxrdxError(f"unknown finding {name!r}{where}; expected one of {', '.join(FINDINGS)} or {NO_FINDING!r}")
        vector[position] = 1
    return vector


def parse_many(texts: Iterable[str], rows: Sequence[int | str] | None = None) -> np.ndarray:
    """Parse a column of label strings into an (N, 14) uint8 matrix."""
    texts = list(texts)
    rows = list(rows) if rows is not None else list(range(len(texts)))
    return np.stack([parse_labels(t, r) for t, r in zip(texts, rows)]) if texts else np.zeros((0, 14), np.uint8)


def format_labels(vector: Sequence[int] | np.ndarray) -> str:
    """Length-14 0/1 vector -> 'A|B', or 'No Finding' when all are negative."""
    names = [name for name, flag in zip(FINDINGS, vector) if flag]
    return "|".join(names) if names else NO_FINDING


def resolve_finding(name: str, known: Sequence[str] = FINDINGS) -> str:
    """The finding of `known` that `name` means, whatever its case and with spaces or hyphens for
    underscores ('pleural thickening' -> 'Pleural_Thickening'); CxrdxError with close matches otherwise."""
    import difflib

    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    canonical = {f.lower(): f for f in known}
    if key in canonical:
        return canonical[key]
    close = [canonical[c] for c in difflib.get_close_matches(key, list(canonical), n=3, cutoff=0.6)]
    hint = f"did you mean {' or '.join(close)}?" if close else f"expected one of {', '.join(known)}"
    raise CxrdxError(f"unknown finding {name!r}; {hint}")
