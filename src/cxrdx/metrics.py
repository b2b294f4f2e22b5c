"""Metrics from probabilities: the paper's Tables 3 and 4, decision thresholds, calibration, expert labels.

Inputs are arrays: `y` (N, K) 0/1 labels and `probs` (N, K) probabilities, one column per finding
in `names` order. A NaN label (a finding the image's dataset does not label) is masked: each
finding is scored on the images that label it. A finding without positives (or without negatives,
or not labelled at all) gets a NaN AUROC ("n/a"), a `MetricWarning` naming it, and is left out of
the means with a note; nothing raises for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrdx import stats
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.jsonsafe import to_json_safe

THRESHOLD_METHODS = ("youden", "f1")
EXPERT_FINDINGS = {"Pneumothorax": ("Pneumothorax",), "Nodule or mass": ("Nodule", "Mass")}
_EPS = 1e-12


class MetricWarning(UserWarning):
    """A metric that cannot be computed for a finding (no positives or no negatives)."""


def _arrays(y: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels as float64 (1, 0, NaN = not labelled) and probabilities, checked against `names`."""
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != probs.shape or y.shape[1] != len(names):
        raise CxrdxError(f"labels {y.shape} and probabilities {probs.shape} must both be (images, {len(names)})")
    if not np.isin(y[~np.isnan(y)], (0, 1)).all():
        raise CxrdxError("labels must be 0, 1 or NaN (not labelled)")
    return y, probs


def _labelled(y: np.ndarray) -> np.ndarray:
    return ~np.isnan(np.asarray(y, dtype=np.float64))


def delong(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC (M, K) and DeLong covariance (K, M, M) of (M, N, K) scores (stats.delong_covariance), each finding
    on the images that label it (NaN labels masked); NaN where a finding lacks positives or negatives."""
    labelled = _labelled(y)
    if labelled.all():
        return stats.delong_covariance(y, probs)
    m, k = probs.shape[0], y.shape[1]
    auc, cov = np.full((m, k), np.nan), np.full((k, m, m), np.nan)
    for c in range(k):
        rows = labelled[:, c]
        if rows.any():
            a, v = stats.delong_covariance(y[rows, c : c + 1], probs[:, rows, c : c + 1])
            auc[:, c], cov[c] = a[:, 0], v[0]
    return auc, cov


def degenerate(
    y: np.ndarray,
    names: Sequence[str],
    where: str = "",
    consequence: str = "AUROC is undefined (NaN) and left out of the means",
) -> dict[str, str]:
    """{finding: note} for findings with no positives, no negatives or no labels; warns once per finding."""
    y = np.asarray(y, dtype=np.float64)
    positives, labelled = np.nansum(y, axis=0), _labelled(y).sum(axis=0)
    notes = {}
    for name, count, n in zip(names, positives, labelled):
        if count == 0 or count == n:
            missing = "labelled" if n == 0 else "positive" if count == 0 else "negative"
            notes[name] = f"{name}: no {missing} images{f' in {where}' if where else ''}; {consequence}"
            warnings.warn(notes[name], MetricWarning, stacklevel=3)
    return notes


# --- threshold metrics (Table 4) --------------------------------------------------------------------


def _thresholds(thresholds: float | Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    out = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,)).copy()
    if not np.isfinite(out).all():
        raise CxrdxError("thresholds must be finite numbers")
    return out


def confusion(y: np.ndarray, probs: np.ndarray, thresholds: float | np.ndarray) -> dict[str, np.ndarray]:
    """tp, fp, tn, fn per finding over its labelled images; a probability at or above its threshold is a positive call."""
    y = np.asarray(y, dtype=np.float64)
    positive, negative = y == 1, y == 0
    pred = np.asarray(probs) >= _thresholds(thresholds, y.shape[1])
    return {
        "tp": (pred & positive).sum(axis=0),
        "fp": (pred & negative).sum(axis=0),
        "tn": (~pred & negative).sum(axis=0),
        "fn": (~pred & positive).sum(axis=0),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def macro_scores(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's macro precision/recall/F1: the unweighted mean over a finding's negative and positive class."""
    precision = (_ratio(tp, tp + fp), _ratio(tn, tn + fn))
    recall = (_ratio(tp, tp + fn), _ratio(tn, tn + fp))
    f1 = [_ratio(2 * p * r, p + r) for p, r in zip(precision, recall)]
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "macro_precision": (precision[0] + precision[1]) / 2,
        "macro_recall": (recall[0] + recall[1]) / 2,
        "macro_f1": (f1[0] + f1[1]) / 2,
    }


def exact_match_accuracy(y: np.ndarray, probs: np.ndarray, thresholds: float | np.ndarray) -> float:
    """Fraction of images with all findings called correctly (the paper's 'overall accuracy').

    Only labelled findings are judged; images without any label are left out.
    """
    y = np.asarray(y, dtype=np.float64)
    labelled = _labelled(y)
    rows = labelled.any(axis=1)
    if not rows.any():
        return float("nan")
    pred = np.asarray(probs) >= _thresholds(thresholds, y.shape[1])
    return float(((pred == (y == 1)) | ~labelled).all(axis=1)[rows].mean())


def choose_thresholds(y: np.ndarray, probs: np.ndarray, method: str = "youden", names: Sequence[str] = FINDINGS) -> np.ndarray:
    """Per-finding thresholds maximising Youden's J (tpr - fpr) or the positive class's F1.

    Findings without both classes keep 0.5 (with a MetricWarning).
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if method not in THRESHOLD_METHODS:
        raise CxrdxError(f"unknown threshold method {method!r}; expected one of {', '.join(THRESHOLD_METHODS)}")
    y, probs = _arrays(y, probs, names)
    skip = degenerate(y, names, "the calibration split", "its threshold stays 0.5")
    out = np.full(len(names), 0.5)
    labelled = _labelled(y)
    for k, name in enumerate(names):
        if name in skip:
            continue
        yk, pk = y[labelled[:, k], k], probs[labelled[:, k], k]
        if method == "youden":
            fpr, tpr, thr = roc_curve(yk, pk)
            best = int(np.argmax(tpr - fpr))
            out[k] = min(float(thr[best]), 1.0)
        else:
            precision, recall, thr = precision_recall_curve(yk, pk)
            f1 = _ratio(2 * precision * recall, precision + recall)[:-1]
            out[k] = float(thr[int(np.argmax(f1))])
    return out


# --- calibration -------------------------------------------------------------------------------------


def _bins(probs: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((np.asarray(probs) * n_bins).astype(int), n_bins - 1)


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """One finding's reliability diagram over its labelled images: per equal-width bin, count, mean probability, positive fraction."""
    y, prob = np.asarray(y, float), np.asarray(prob, float)
    y, prob = y[~np.isnan(y)], prob[~np.isnan(y)]
    b = _bins(prob, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(b, weights=prob, minlength=n_bins) / count
        frac_pos = np.bincount(b, weights=y, minlength=n_bins) / count
    edges = np.arange(n_bins) / n_bins
    return pd.DataFrame({"low": edges, "high": edges + 1 / n_bins, "count": count, "mean_prob": mean_prob, "frac_pos": frac_pos})


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """ECE per finding over its labelled images: sum over equal-width bins of (bin share) x |positive fraction - mean probability|."""
    y, probs = np.asarray(y, float), np.asarray(probs, float)
    k = probs.shape[1]
    labelled = _labelled(y)
    flat = (_bins(probs, n_bins) + n_bins * np.arange(k)).ravel()
    gap = np.bincount(flat, weights=np.where(labelled, y - probs, 0.0).ravel(), minlength=n_bins * k).reshape(k, n_bins)
    n = labelled.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.abs(gap).sum(axis=1) / n, np.nan)


def logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs: np.ndarray, temperature: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """sigmoid(logit(p) / T) per finding; `None` returns the probabilities unchanged."""
    if temperature is None:
        return np.asarray(probs, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-logit(probs) / np.asarray(temperature, dtype=np.float64)))


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search range of fit_temperature


def fit_temperature(y: np.ndarray, probs: np.ndarray, names: Sequence[str] = FINDINGS) -> np.ndarray:
    """Per-finding temperature minimising the validation negative log-likelihood (scipy, bounded by TEMPERATURE_BOUNDS)."""
    from scipy.optimize import minimize_scalar

    y, probs = _arrays(y, probs, names)
    skip = degenerate(y, names, "the calibration split", "its temperature stays 1")
    z = logit(probs)
    labelled = _labelled(y)
    out = np.ones(len(names))
    for k, name in enumerate(names):
        if name in skip:
            continue
        rows = labelled[:, k]

        def nll(log_t: float, zk: np.ndarray = z[rows, k], t: np.ndarray = y[rows, k]) -> float:
            s = zk / np.exp(log_t)
            return float(np.mean(np.logaddexp(0.0, s) - t * s))

        out[k] = float(np.exp(minimize_scalar(nll, bounds=tuple(np.log(TEMPERATURE_BOUNDS)), method="bounded").x))
    return out


# --- the evaluation of one model on one split --------------------------------------------------------


@dataclass(frozen=True)
class BootstrapMean:
    """The bootstrap interval of the mean AUROC over findings."""

    low: float
    high: float
    replicates: int
    unit: str  # what was resampled: "patient" or "image"


@dataclass(frozen=True)
class Overall:
    """One model's summary over the findings on one split: metrics.json's "overall"."""

    images: int
    auroc: stats.MeanCI  # over the findings with an AUROC
    exact_match_accuracy: float  # all findings called correctly (the paper's "overall accuracy")
    accuracy: stats.MeanCI
    macro_precision: stats.MeanCI
    macro_recall: stats.MeanCI
    macro_f1: stats.MeanCI
    ece: float  # mean over findings
    left_out_of_auroc_mean: list[str]
    level: float  # of the confidence intervals
    auroc_bootstrap: BootstrapMean | None = None

    def to_dict(self) -> dict[str, Any]:
        """metrics.json's "overall" object (auroc_bootstrap only when bootstrapped)."""
        values: dict[str, Any] = {}
        for name in (f.name for f in fields(self)):
            value = getattr(self, name)
            if isinstance(value, stats.MeanCI):
                value = value._asdict()
            elif isinstance(value, BootstrapMean):
                value = asdict(value)
            if value is not None:
                values[name] = value
        return values


@dataclass
class Evaluation:
    """Per-finding table (index = finding) and overall summary of one model on one split."""

    per_finding: pd.DataFrame
    overall: Overall
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        table = self.per_finding.astype(object).where(self.per_finding.notna(), None)
        return {"overall": to_json_safe(self.overall.to_dict()), "per_finding": table.to_dict(orient="index"), "notes": self.notes}


def evaluate(
    y: np.ndarray,
    probs: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    names: Sequence[str] = FINDINGS,
    level: float = 0.95,
    groups: Sequence | np.ndarray | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    n_bins: int = 10,
    auroc: tuple[np.ndarray, np.ndarray] | None = None,
) -> Evaluation:
    """Tables 3 and 4 for one model: AUROC with DeLong CI, threshold metrics, ECE, and their summaries.

    `groups` (patient ids) with `n_bootstrap > 0` adds patient-level bootstrap CIs. `auroc` passes
    already computed (AUROC, DeLong variance) per finding.

    Args:
        y: (N, K) labels: 1, 0, or NaN for an image a dataset does not label for that finding.
        probs: (N, K) probabilities.
        thresholds: one decision threshold, or one per finding.
        names: the K finding names (rows of `per_finding`).
        level: confidence level of the intervals.
        groups: (N,) patient ids for the bootstrap.
        n_bootstrap: bootstrap replicates (0: none).
        seed: bootstrap seed.
        n_bins: bins of the expected calibration error.
        auroc: precomputed (AUROC, variance) arrays, to skip DeLong.

    Returns:
        An `Evaluation`: `per_finding` (AUROC and CI, accuracy, precision, recall, F1, ECE...) and
        `overall` (mean ± SE with t CIs over the findings, as the paper's Tables 3 and 4).

    Example:
        >>> import numpy as np
        >>> y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 5)
        >>> result = evaluate(y, np.where(y == 1, 0.8, 0.3), names=["A", "B"])
        >>> float(result.per_finding.loc["A", "auroc"])
        1.0
    """
    y, probs = _arrays(y, probs, names)
    notes = list(degenerate(y, names).values())
    thr = _thresholds(thresholds, len(names))
    if auroc is None:
        auc, cov = delong(y, probs[None])
        auroc = auc[0], cov[:, 0, 0]
    auc, var = auroc
    low, high = stats.normal_ci(auc, var, level)
    labelled = _labelled(y).sum(axis=0)
    scores = macro_scores(**confusion(y, probs, thr))
    scores = {m: np.where(labelled > 0, v, np.nan) for m, v in scores.items()}  # n/a, not 0, for an unlabelled finding
    table = pd.DataFrame(
        {
            "positives": np.nansum(y, axis=0).astype(int),
            "images": labelled,
            "positive_ratio": _positive_ratio(y),
            "auroc": auc,
            "auroc_low": low,
            "auroc_high": high,
            "auroc_se": np.sqrt(var),
            "threshold": thr,
            **scores,
            "ece": expected_calibration_error(y, probs, n_bins),
        },
        index=pd.Index(list(names), name="finding"),
    )
    bootstrap = None
    if n_bootstrap > 0:
        boot = stats.bootstrap_auroc(y, probs, groups, n_bootstrap, level, seed)
        table["auroc_boot_low"], table["auroc_boot_high"] = boot.low, boot.high
        bootstrap = BootstrapMean(boot.mean_low, boot.mean_high, boot.replicates, "patient" if groups is not None else "image")
    mean_ci = {m: stats.mean_se_ci(table[m].to_numpy(), level) for m in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
    overall = Overall(
        images=int(y.shape[0]),
        auroc=stats.mean_se_ci(auc, level),
        exact_match_accuracy=exact_match_accuracy(y, probs, thr),
        **mean_ci,
        ece=float(table["ece"].mean()) if len(names) else float("nan"),
        left_out_of_auroc_mean=[n for n, a in zip(names, auc) if not np.isfinite(a)],
        level=level,
        auroc_bootstrap=bootstrap,
    )
    return Evaluation(table, overall, notes)


def _positive_ratio(y: np.ndarray) -> np.ndarray:
    """Positives over labelled images per finding; NaN where none is labelled."""
    labelled = _labelled(y).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(labelled > 0, np.nansum(y, axis=0) / labelled, np.nan)


# --- several models on the same images (Tables 3-5, `cxrdx compare`) --------------------------------


@dataclass
class Comparison:
    """Models side by side on the same images; arrays are (models, findings) unless noted."""

    models: list[str]
    findings: list[str]
    evaluations: dict[str, Evaluation]
    positive_ratio: np.ndarray  # (K,)
    auc: np.ndarray
    var: np.ndarray
    pearson: dict[str, tuple[float, float]]  # model -> (r, p) of AUROC vs positive ratio
    delong_p: np.ndarray  # (K, M, M) paired DeLong p-values per finding
    anova: stats.AnovaResult  # RM-ANOVA of AUROC over findings, model as the within factor
    pairwise_diff: np.ndarray  # (M, M) mean AUROC difference, row minus column
    pairwise_p: np.ndarray  # (M, M) Bonferroni-adjusted paired t-test p
    findings_p: dict[str, np.ndarray]  # model -> (K, K) Table 5 p-values, Bonferroni-adjusted
    notes: list[str]
    level: float = 0.95


def compare_models(
    y: np.ndarray,
    probs: dict[str, np.ndarray],
    names: Sequence[str] = FINDINGS,
    thresholds: float | np.ndarray | Mapping[str, np.ndarray | float] = 0.5,
    level: float = 0.95,
    groups: Sequence | np.ndarray | None = None,
    n_bootstrap: int = 0,
) -> Comparison:
    """All statistics of Tables 3-5 for models that scored the same images (rows aligned with `y`).

    `thresholds`: one value or array for all models, or {model: thresholds}; `groups` and
    `n_bootstrap` add patient-level bootstrap CIs (see `evaluate`).
    """
    models = list(probs)
    if not models:
        raise CxrdxError("no models to compare")
    arrays = [_arrays(y, probs[m], names)[1] for m in models]
    y = _arrays(y, arrays[0], names)[0]
    notes = list(degenerate(y, names).values())
    auc, cov = delong(y, np.stack(arrays))
    var = np.einsum("kmm->mk", cov)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # said once above for all models
        evaluations = {
            m: evaluate(
                y,
                a,
                thresholds[m] if isinstance(thresholds, Mapping) else thresholds,
                names,
                level,
                groups=groups,
                n_bootstrap=n_bootstrap,
                auroc=(auc[i], var[i]),
            )
            for i, (m, a) in enumerate(zip(models, arrays))
        }
    ratio = _positive_ratio(y)
    diff, pair_p = stats.pairwise_paired_t(auc.T)
    return Comparison(
        models=models,
        findings=list(names),
        evaluations=evaluations,
        positive_ratio=ratio,
        auc=auc,
        var=var,
        pearson={m: stats.pearson(auc[i], ratio) for i, m in enumerate(models)},
        delong_p=stats.pairwise_delong(auc, cov),
        anova=stats.rm_anova(auc.T),
        pairwise_diff=diff,
        pairwise_p=pair_p,
        findings_p={m: stats.compare_findings(y, a) for m, a in zip(models, arrays)},
        notes=notes,
        level=level,
    )


# --- expert labels (Google 2019 adjudicated subset) -------------------------------------------------


def read_expert_labels(path: str | Path) -> pd.DataFrame:
    """The radiologist-adjudicated labels: index Image Index, uint8 columns of EXPERT_FINDINGS, and 'Set Id'."""
    path = Path(path)
    if not path.is_file():
        raise CxrdxError(f"{path}: expert label file not found")
    try:
        table = pd.read_csv(path)
    except (ValueError, OSError) as exc:
        raise CxrdxError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in ("Image Index", *EXPERT_FINDINGS) if c not in table.columns]
    if missing:
        raise CxrdxError(f"{path}: missing column(s) {', '.join(missing)}; expected the Google 2019 label file")
    out = table.set_index("Image Index")[list(EXPERT_FINDINGS)]
    for column in EXPERT_FINDINGS:
        values = out[column].astype(str).str.strip().str.upper()
        bad = ~values.isin(("YES", "NO"))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise CxrdxError(f"{path}: row {row}, column {column!r}: expected YES or NO, found {out[column].iloc[row - 2]!r}")
        out[column] = (values == "YES").astype(np.uint8)
    if "Set Id" in table.columns:
        out["Set Id"] = table["Set Id"].to_numpy()
    return out


def expert_auroc(
    image_index: Sequence[str],
    y: np.ndarray,
    probs: np.ndarray,
    expert: pd.DataFrame,
    names: Sequence[str] = FINDINGS,
    level: float = 0.95,
) -> pd.DataFrame:
    """AUROC (DeLong CI) against expert labels beside NLP labels, on the images that have expert labels.

    'Nodule or mass' is scored by the larger of the Nodule and Mass probabilities; its NLP label is
    Nodule or Mass.
    """
    y, probs = _arrays(y, probs, names)
    position = {n: i for i, n in enumerate(names)}
    index = pd.Index(list(image_index))
    keep = index.isin(expert.index)
    if not keep.any():
        warnings.warn("none of the evaluated images has an expert label", MetricWarning, stacklevel=2)
    rows = []
    for finding, parts in EXPERT_FINDINGS.items():
        cols = [position[p] for p in parts]
        score = probs[keep][:, cols].max(axis=1)
        labels = {"expert": expert.loc[index[keep], finding].to_numpy(), "nlp": y[keep][:, cols].max(axis=1)}
        row: dict[str, Any] = {"finding": finding, "images": int(keep.sum())}
        for source, truth in labels.items():
            auc, var = stats.delong_covariance(truth[:, None], score[None, :, None])
            if keep.any():
                degenerate(truth[:, None], [finding], f"the {source}-labelled images")
            low, high = stats.normal_ci(auc[0, 0], var[0, 0, 0], level)
            row |= {f"{source}_positives": int(truth.sum()), f"{source}_auroc": auc[0, 0], f"{source}_low": low, f"{source}_high": high}
        row["label_agreement"] = float((labels["expert"] == labels["nlp"]).mean()) if keep.any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("finding")
