"""External validation: one model's AUROC on its internal test split against other datasets (the generalisation table).

Each set is an evaluation folder written by `cxrdx evaluate` (predictions.csv + labels.csv). Per
finding: the AUROC with its DeLong CI on every set, and for each external set the difference
external - internal with its CI and p. The sets hold different images, so the difference is an
unpaired z-test whose DeLong variances add (`stats.unpaired_difference`). A finding an external
set does not label (all NaN) is n/a there, as is one without positive or negative images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdx import metrics, report, stats
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

NOT_LABELLED = "n/a (not labelled)"


@dataclass
class ScoredSet:
    """Per-finding AUROC and DeLong variance of one model on one set of images."""

    name: str
    auc: np.ndarray  # (K,) NaN: undefined
    var: np.ndarray  # (K,)
    images: np.ndarray  # (K,) images that label the finding
    positives: np.ndarray  # (K,)
    checkpoint: str = ""  # the model evaluated, when known


def score_set(name: str, y: np.ndarray, probs: np.ndarray, checkpoint: str = "") -> ScoredSet:
    """AUROC and DeLong variance per finding; y: (N, K) 1 / 0 / NaN (not labelled)."""
    y = np.asarray(y, dtype=np.float64)
    auc, cov = metrics.delong(y, np.asarray(probs, dtype=np.float64)[None])
    return ScoredSet(name, auc[0], cov[:, 0, 0], (~np.isnan(y)).sum(axis=0), np.nansum(y, axis=0).astype(int), checkpoint)


def read_set(folder: str | Path, name: str | None = None) -> ScoredSet:
    """An evaluation folder (or its predictions.csv) of `cxrdx evaluate` -> its ScoredSet."""
    from cxrdx.evaluation import find_predictions, load_runs
    from cxrdx.rundir import read_eval_metrics

    predictions = find_predictions(folder)
    aligned = load_runs([predictions])
    probs, y = aligned.probs, aligned.labels
    checkpoint = str(read_eval_metrics(predictions.parent).settings.get("checkpoint", ""))
    label = name or (Path(folder).name if Path(folder).is_dir() else predictions.parent.name)
    return score_set(label, y, next(iter(probs.values())), checkpoint)


@dataclass
class Generalisation:
    """The internal set, the external sets, and per external set (rows) and finding (columns) the
    difference external - internal: diff, low, high, p."""

    internal: ScoredSet
    external: list[ScoredSet]
    diff: np.ndarray  # (E, K)
    low: np.ndarray
    high: np.ndarray
    p: np.ndarray
    findings: list[str]
    level: float = 0.95


def generalisation(
    internal: ScoredSet, external: Sequence[ScoredSet], names: Sequence[str] = FINDINGS, level: float = 0.95
) -> Generalisation:
    parts = [stats.unpaired_difference(internal.auc, internal.var, e.auc, e.var, level) for e in external]
    diff, low, high, p = (np.array([getattr(d, f) for d in parts]).reshape(len(parts), len(names)) for f in ("diff", "low", "high", "p"))
    return Generalisation(internal, list(external), diff, low, high, p, list(names), level)


def _auroc_ci(value: float, low: float, high: float, images: int) -> str:
    """'0.812 (0.771, 0.853)'; n/a when undefined, saying so when no image labels the finding."""
    if images == 0:
        return NOT_LABELLED
    if not np.isfinite(value):
        return "n/a"
    return f"{report.format_value(value)} ({report.format_value(low)}, {report.format_value(high)})"


def _common(g: Generalisation) -> np.ndarray:
    """The findings with an AUROC on the internal and on every external set."""
    return np.isfinite(g.internal.auc) & np.all([np.isfinite(e.auc) for e in g.external], axis=0)


def mean_difference(g: Generalisation, external: int = 0) -> tuple[float, float]:
    """The external set's mean AUROC and its mean difference from the internal one, over the findings
    scored on every set (the table's "Mean" row)."""
    common = _common(g)
    if not common.any():
        return float("nan"), float("nan")
    return float(np.mean(g.external[external].auc[common])), float(np.mean(g.diff[external][common]))


def generalisation_table(g: Generalisation) -> report.Table:
    """Rows: the findings, then the mean over the findings scored on every set; per set its AUROC (CI),
    per external set the difference with the internal one (CI) and p."""
    level = f"{round(g.level * 100)}%"
    common = _common(g)

    def mean(values: np.ndarray) -> float:
        return float(np.mean(values[common])) if common.any() else float("nan")

    data: dict[str, list[float]] = {}
    shown: dict[str, list[str]] = {}
    for s in (g.internal, *g.external):
        low, high = stats.normal_ci(s.auc, s.var, g.level)
        data[f"{s.name} AUROC"] = [*s.auc, mean(s.auc)]
        data[f"{s.name} low"], data[f"{s.name} high"] = [*low, np.nan], [*high, np.nan]
        data[f"{s.name} images"] = [*s.images, np.nan]
        shown[f"{s.name} AUROC ({level} CI)"] = [
            *(_auroc_ci(a, lo, hi, n) for a, lo, hi, n in zip(s.auc, low, high, s.images)),
            report.format_value(mean(s.auc)),
        ]
    for i, e in enumerate(g.external):
        data[f"{e.name} - {g.internal.name}"] = [*g.diff[i], mean(g.diff[i])]
        data[f"{e.name} diff low"], data[f"{e.name} diff high"] = [*g.low[i], np.nan], [*g.high[i], np.nan]
        data[f"{e.name} p"] = [*g.p[i], np.nan]
        shown[f"{e.name} − {g.internal.name} ({level} CI)"] = [
            *(_auroc_ci(d, lo, hi, 1) for d, lo, hi in zip(g.diff[i], g.low[i], g.high[i])),
            report.format_value(mean(g.diff[i])),
        ]
        shown[f"{e.name} p"] = [*(report.format_p(p) for p in g.p[i]), ""]
    index = pd.Index([*g.findings, "Mean"], name="finding")
    return report.Table(
        "generalisation",
        f"Generalisation: AUROC on the internal test split and on external sets (DeLong {level} CI)",
        pd.DataFrame(data, index=index),
        pd.DataFrame(shown, index=index),
        _notes(g, int(common.sum())),
    )


def _notes(g: Generalisation, common: int) -> list[str]:
    notes = [
        (
            "Difference: external − internal AUROC; the sets hold different images, so it is an unpaired DeLong z-test "
            "(the variances add). p is not adjusted for multiple comparisons."
        ),
        f"Mean: over the {common} findings with an AUROC on every set (no CI).",
    ]
    for e in g.external:
        unlabelled = [f for f, n in zip(g.findings, e.images) if n == 0]
        if unlabelled:
            notes.append(f"{e.name} does not label {', '.join(unlabelled)}: n/a.")
        if e.checkpoint and g.internal.checkpoint and e.checkpoint != g.internal.checkpoint:
            notes.append(
                f"{e.name} was evaluated with {e.checkpoint}, the internal set with {g.internal.checkpoint}: not the same model file."
            )
    return notes


def compare_external(
    internal: str | Path,
    external: Sequence[str | Path],
    names: Sequence[str] | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] = report.FORMATS,
) -> tuple[Generalisation, report.Table]:
    """The generalisation table of evaluation folders; `names`: internal first, then one per external set."""
    paths = [internal, *external]
    if names is not None and len(names) != len(paths):
        raise CxrdxError(f"{len(names)} names for {len(paths)} evaluation folders (the internal one first, then each external one)")
    sets = [read_set(p, None if names is None else names[i]) for i, p in enumerate(paths)]
    if len({s.name for s in sets}) != len(sets):
        sets = [replace(s, name=str(p)) for p, s in zip(paths, sets)]
    g = generalisation(sets[0], sets[1:])
    table = generalisation_table(g)
    if out is not None:
        report.write_tables([table], out, formats)
    return g, table
