"""Other chest X-ray datasets read into the ChestX-ray14 index shape, with harmonised labels.

    index = read_dataset("chexpert", "data/CheXpert-v1.0-small", uncertain="ignore")
    index.table      # one row per located image: Image Index, Patient ID, View Position, Patient Gender,
                     # Patient Age, the 14 findings (1 / 0 / NaN = not labelled), extra labels, dataset, path
    index.missing    # images the label files name that are not on disk
    index.excluded_views   # {view: images left out}, lateral views by default

One small module per dataset registers its reader in ADAPTERS; the mapping of each dataset's
labels to the 14 findings, and its hard cases, are documented in docs/datasets.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cxrdx.data.datasets import chexpert, generic, mimic, padchest, rsna, vindr  # noqa: F401  (registration)
from cxrdx.data.datasets._common import ADAPTERS, FRONTAL, PATH, UNCERTAIN_POLICIES, VIEW, Adapter, Index
from cxrdx.errors import CxrdxError

__all__ = ["ADAPTERS", "FRONTAL", "UNCERTAIN_POLICIES", "Adapter", "Index", "list_datasets", "read_dataset"]


def list_datasets() -> list[str]:
    return sorted(ADAPTERS)


def read_dataset(name: str, data_dir: str | Path, views: Sequence[str] | None = FRONTAL, **options: str) -> Index:
    """Read dataset `name` from `data_dir`: labels mapped to the 14 findings, images located.

    `views`: the View Position values kept (default PA and AP; None keeps all). Images without
    view information are kept. Options are the adapter's own (e.g. uncertain="ignore" |
    "positive" | "negative" for CheXpert, MIMIC and generic; readers="any" | "majority" for VinDr).
    """
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise CxrdxError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    try:
        table = adapter.read(Path(data_dir), **options)
    except TypeError as exc:
        raise CxrdxError(f"dataset {name!r}: {exc}") from None
    excluded_views: dict[str, int] = {}
    if views is not None:
        keep = table[VIEW].isin(list(views)) | (table[VIEW] == "")
        excluded_views = {str(v): int(n) for v, n in table.loc[~keep, VIEW].value_counts().items()}
        table = table.loc[keep]
    present = table[PATH].notna()
    missing = table.loc[~present, "Image Index"].tolist()
    located = table.loc[present].reset_index(drop=True)
    return Index(name, located, missing, excluded_views, adapter.extra_labels)
