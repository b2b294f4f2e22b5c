"""AUROC by patient group (sex, age band, view position, dataset or site) and the largest gap per finding.

Each group's AUROC has its DeLong CI (findings scored on the images of the group that label them).
The gap of an attribute is the highest minus the lowest group AUROC of a finding; the two groups
hold different images, so it is tested as an unpaired z-test whose DeLong variances add
(`stats.unpaired_difference`). The p-values are not adjusted for the number of groups or findings,
and taking the largest of several gaps makes them optimistic: read them as a screen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx import metrics, stats
from cxrdx.findings import FINDINGS
from cxrdx.report import DASH, Table, format_p, format_value
from cxrdx.rundir import META_COLUMNS

COLUMNS = META_COLUMNS  # the index columns subgroups are drawn from
SEX, AGE, VIEW, DATASET = COLUMNS
AGE_BANDS = ((0.0, 40.0, "<40"), (40.0, 60.0, "40–59"), (60.0, 80.0, "60–79"), (80.0, np.inf, "≥80"))
SEXES, VIEWS = ("F", "M"), ("AP", "PA")


def groups_of(meta: pd.DataFrame) -> dict[str, pd.Series]:
    """{attribute: each image's group ('' when unknown)} for the attributes `meta` has.

    sex (F / M), age (the bands of AGE_BANDS), view (AP / PA; lateral and unknown views are in no
    group), dataset (only when the images come from more than one).
    """
    out: dict[str, pd.Series] = {}
    if SEX in meta.columns:
        sex = meta[SEX].fillna("").astype(str).str.strip().str.upper()
        out["sex"] = sex.where(sex.isin(SEXES), "")
    if AGE in meta.columns:
        age = pd.to_numeric(meta[AGE], errors="coerce").to_numpy(dtype=float)
        band = np.full(len(age), "", dtype=object)
        for low, high, name in AGE_BANDS:
            band[(age >= low) & (age < high)] = name
        out["age"] = pd.Series(band, index=meta.index)
    if VIEW in meta.columns:
        view = meta[VIEW].fillna("").astype(str).str.strip().str.upper()
        out["view"] = view.where(view.isin(VIEWS), "")
    if DATASET in meta.columns:
        dataset = meta[DATASET].fillna("").astype(str)
        if dataset[dataset != ""].nunique() > 1:
            out["dataset"] = dataset
    return out


def _order(attribute: str, values: Iterable[str]) -> list[str]:
    fixed = {"sex": SEXES, "age": tuple(b[2] for b in AGE_BANDS), "view": VIEWS}.get(attribute)
    present = set(values) - {""}
    return [g for g in fixed if g in present] if fixed else sorted(present)


@dataclass
class Subgroups:
    """`auroc`: one row per (finding, attribute, group): images (labelling the finding), positives,
    auroc, low, high, var. `gaps`: one row per (finding, attribute) with two or more groups of
    defined AUROC: low_group, high_group, gap (high - low), low, high, z, p."""

    auroc: pd.DataFrame
    gaps: pd.DataFrame
    level: float = 0.95


def subgroup_auroc(y: np.ndarray, probs: np.ndarray, meta: pd.DataFrame, names: Sequence[str] = FINDINGS, level: float = 0.95) -> Subgroups:
    """Per-finding AUROC with DeLong CI in every group of `groups_of(meta)`, and each attribute's largest gap.

    y: (N, K) 1 / 0 / NaN (not labelled), probs: (N, K), meta: N rows in the same order.
    """
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    rows = []
    for attribute, group_of in groups_of(meta.reset_index(drop=True)).items():
        values = group_of.to_numpy()
        for group in _order(attribute, values):
            mask = values == group
            yg = y[mask]
            auc, cov = metrics.delong(yg, probs[mask][None])
            var = np.einsum("kmm->mk", cov)[0]
            low, high = stats.normal_ci(auc[0], var, level)
            labelled, positives = (~np.isnan(yg)).sum(axis=0), np.nansum(yg, axis=0)
            for k, finding in enumerate(names):
                rows.append((finding, attribute, group, int(labelled[k]), int(positives[k]), auc[0, k], low[k], high[k], var[k]))
    columns = ["finding", "attribute", "group", "images", "positives", "auroc", "low", "high", "var"]
    table = pd.DataFrame(rows, columns=columns)
    by_finding = np.argsort(table["finding"].map({f: k for k, f in enumerate(names)}).to_numpy(), kind="stable")
    table = table.iloc[by_finding].set_index(["finding", "attribute", "group"])
    return Subgroups(table, _gaps(table, level), level)


def _gaps(table: pd.DataFrame, level: float) -> pd.DataFrame:
    rows = []
    for (finding, attribute), part in table.groupby(level=["finding", "attribute"], sort=False):
        defined = part[np.isfinite(part["auroc"]) & np.isfinite(part["var"])]
        if len(defined) < 2:
            continue
        low_row, high_row = defined["auroc"].idxmin(), defined["auroc"].idxmax()
        lo, hi = defined.loc[low_row], defined.loc[high_row]
        d = stats.unpaired_difference(lo["auroc"], lo["var"], hi["auroc"], hi["var"], level)
        rows.append((finding, attribute, low_row[2], high_row[2], d.diff, d.low, d.high, d.z, d.p))
    columns = ["finding", "attribute", "low_group", "high_group", "gap", "low", "high", "z", "p"]
    return pd.DataFrame(rows, columns=columns).set_index(["finding", "attribute"])


def read_subgroups(folder: str | Path) -> Subgroups | None:
    """The subgroup AUROCs of an evaluation folder (predictions.csv + labels.csv with the subgroup
    columns, as `cxrdx evaluate` writes it); None when its labels have no subgroup column."""
    from cxrdx.evaluation import LABELS, find_predictions, load_runs
    from cxrdx.rundir import read_labels

    predictions = find_predictions(folder)
    aligned = load_runs([predictions])
    names, probs, y = aligned.names, aligned.probs, aligned.labels
    labels = read_labels(predictions.parent / LABELS)
    meta = labels.loc[names, [c for c in COLUMNS if c in labels.columns]]
    if not groups_of(meta):
        return None
    return subgroup_auroc(y, next(iter(probs.values())), meta)


# --- tables ----------------------------------------------------------------------------------------


def _with_ci(value: float, low: float, high: float) -> str:
    return f"{format_value(value)} ({format_value(low)}, {format_value(high)})" if np.isfinite(value) else "n/a"


def subgroup_tables(result: Subgroups) -> list[Table]:
    """`subgroups` (AUROC per finding and group) and `subgroup_gaps` (the largest gap per finding and attribute)."""
    level = f"{round(result.level * 100)}%"
    auroc = result.auroc.drop(columns="var")
    shown = pd.DataFrame(
        {
            "images": auroc["images"].astype(str),
            "positives": auroc["positives"].astype(str),
            f"AUROC ({level} CI)": [_with_ci(a, lo, hi) for a, lo, hi in zip(auroc["auroc"], auroc["low"], auroc["high"])],
        },
        index=auroc.index,
    )
    groups = Table(
        "subgroups",
        f"AUROC by subgroup (DeLong {level} CI)",
        auroc,
        shown,
        [
            "images: the group's images that label the finding; n/a: no positive or no negative image among them.",
            f"Age bands: {', '.join(b[2] for b in AGE_BANDS)} years; view: AP and PA only.",
        ],
    )
    gaps = result.gaps
    shown_gaps = pd.DataFrame(
        {
            "groups": [f"{h} vs {lo}" for lo, h in zip(gaps["low_group"], gaps["high_group"])],
            f"gap ({level} CI)": [
                f"{format_value(g)} ({format_value(a)}, {format_value(b)})" for g, a, b in zip(gaps["gap"], gaps["low"], gaps["high"])
            ],
            "p": [format_p(p) for p in gaps["p"]],
            "": [stats.stars(p) if np.isfinite(p) else DASH for p in gaps["p"]],
        },
        index=gaps.index,
    )
    gap_table = Table(
        "subgroup_gaps",
        "Largest AUROC gap between the groups of each attribute",
        gaps,
        shown_gaps,
        [
            (
                "gap: highest minus lowest AUROC among the groups with a CI (two or more positive and negative images); "
                "unpaired DeLong z-test (different images: the variances add)."
            ),
            "p is not adjusted for multiple comparisons, and the largest of several gaps is an optimistic pick.",
        ],
    )
    return [groups, gap_table]
