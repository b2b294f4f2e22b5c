"""Statistics of the paper's tables: DeLong AUROC variances and tests, mean ± SE, RM-ANOVA, Bonferroni.

AUROC variances use the fast DeLong algorithm (Sun & Xu 2014): one sort per column gives every
image's placement value (the fraction of the other class it outranks, ties counting one half), which
is exact on ties and agrees with R's pROC (`ci.auc(method="delong")`, `roc.test(method="delong",
paired=TRUE)`): the CI is auc ± z·se clipped to [0, 1]. Arrays follow scikit-learn's layout:
`y` and `score` are (N,) for one finding or (N, K) with one column per finding; columns without
positives or without negatives give NaN (callers that know the finding names warn).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sps

from cxrdx.errors import CxrdxError


class DeLongTest(NamedTuple):
    auc_a: float | np.ndarray
    auc_b: float | np.ndarray
    z: float | np.ndarray
    p: float | np.ndarray


class MeanCI(NamedTuple):
    """Mean ± standard error with a t-based confidence interval over `n` values (NaN left out)."""

    mean: float
    se: float
    low: float
    high: float
    n: int


class AnovaResult(NamedTuple):
    f: float
    df_num: float
    df_den: float
    p: float
    subjects: int  # findings that entered the test: those with an AUROC for every model


class Difference(NamedTuple):
    """b - a with its confidence interval and two-sided z-test."""

    diff: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    z: float | np.ndarray
    p: float | np.ndarray


class BootstrapCI(NamedTuple):
    low: np.ndarray  # (K,) per-column percentile interval
    high: np.ndarray
    mean_low: float  # interval of the mean AUROC over columns
    mean_high: float
    replicates: int


# --- validation ---------------------------------------------------------------------------------


def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N,)|(N,K) labels and (..., N)|(..., N, K) scores -> bool (N,K), float (..., N, K), was-1-D."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    one = y.ndim == 1
    y2, s2 = (y[:, None], score[..., None]) if one else (y, score)
    if y2.ndim != 2 or s2.shape[-2:] != y2.shape:
        raise CxrdxError(f"labels of shape {y.shape} do not match scores of shape {score.shape}")
    if y2.size and not np.isin(y2, (0, 1)).all():
        raise CxrdxError("labels must be 0 or 1")
    if not np.isfinite(s2).all():
        raise CxrdxError("scores contain NaN or infinite values")
    return y2.astype(bool), s2, one


def _squeeze(value: np.ndarray, one: bool) -> float | np.ndarray:
    """A float for 1-D input, the (K,) array otherwise."""
    return float(value[0]) if one else value


# --- fast DeLong ----------------------------------------------------------------------------------


class _TieGroups(NamedTuple):
    """One sort per column of an (N, K) score matrix, flattened column after column."""

    order: np.ndarray  # (N, K) argsort per column
    group: np.ndarray  # (N*K,) tie-group id of each sorted element, increasing
    column: np.ndarray  # (G,) column of each tie group
    n: int
    k: int


def _tie_groups(score: np.ndarray) -> _TieGroups:
    n, k = score.shape
    order = np.argsort(score, axis=0)  # ties are grouped below, so stability is not needed
    s = np.take_along_axis(score, order, axis=0).T.ravel()
    starts = np.ones(s.size, dtype=bool)
    starts[1:] = s[1:] != s[:-1]
    starts[:: max(n, 1)] = True  # each column starts a new group
    return _TieGroups(order, np.cumsum(starts) - 1, np.flatnonzero(starts) // n, n, k)


def _group_counts(t: _TieGroups, pos_sorted: np.ndarray, weight_sorted: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted positives/negatives in each tie group, below it in its column, and per column."""
    pos_in = np.bincount(t.group, weights=pos_sorted * weight_sorted)
    neg_in = np.bincount(t.group, weights=(1.0 - pos_sorted) * weight_sorted)
    m_pos = np.bincount(t.column, weights=pos_in, minlength=t.k)
    m_neg = np.bincount(t.column, weights=neg_in, minlength=t.k)
    earlier_pos = np.concatenate(([0.0], np.cumsum(m_pos)[:-1]))  # totals of the columns before each column
    earlier_neg = np.concatenate(([0.0], np.cumsum(m_neg)[:-1]))
    pos_below = np.cumsum(pos_in) - pos_in - earlier_pos[t.column]
    neg_below = np.cumsum(neg_in) - neg_in - earlier_neg[t.column]
    return pos_in, neg_in, pos_below, neg_below, m_pos, m_neg


def placements(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC per column and every image's placement value, from one sort per column.

    y: (N, K) bool, score: (N, K). Returns auc (K,) and v (N, K): for a positive image the fraction of
    negatives it outranks (DeLong's V10), for a negative one the fraction of positives that outrank it
    (V01); ties count one half. Columns without positives or without negatives get NaN.
    """
    t = _tie_groups(score)
    pos = np.take_along_axis(y, t.order, axis=0).T.ravel().astype(np.float64)
    pos_in, neg_in, pos_below, neg_below, m_pos, m_neg = _group_counts(t, pos, np.ones_like(pos))
    with np.errstate(invalid="ignore", divide="ignore"):
        v10 = (neg_below + 0.5 * neg_in) / m_neg[t.column]
        v01 = (m_pos[t.column] - pos_below - 0.5 * pos_in) / m_pos[t.column]
        auc = np.bincount(t.column, weights=pos_in * v10, minlength=t.k) / m_pos
    v = np.empty(score.shape)
    np.put_along_axis(v, t.order, np.where(pos > 0, v10[t.group], v01[t.group]).reshape(t.k, t.n).T, axis=0)
    auc[(m_pos == 0) | (m_neg == 0)] = np.nan
    return auc, v


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of M models on the same images and their DeLong covariance, per column.

    y: (N, K) 0/1, scores: (M, N, K). Returns auc (M, K) and cov (K, M, M).
    """
    yb, s, _ = _check(y, scores)
    s = s[None] if s.ndim == 2 else s
    parts = [placements(yb, model) for model in s]
    auc = np.stack([a for a, _ in parts])
    centred = np.stack([v for _, v in parts]) - auc[:, None, :]
    m, n = yb.sum(axis=0), (~yb).sum(axis=0)
    pos_c, neg_c = (centred * yb).transpose(2, 0, 1), (centred * ~yb).transpose(2, 0, 1)  # (K, M, N)
    pos_part, neg_part = pos_c @ pos_c.transpose(0, 2, 1), neg_c @ neg_c.transpose(0, 2, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = pos_part / ((m - 1.0) * m)[:, None, None] + neg_part / ((n - 1.0) * n)[:, None, None]
    cov[(m < 2) | (n < 2)] = np.nan
    return auc, cov


def auroc_ci(y: np.ndarray, score: np.ndarray, level: float = 0.95) -> tuple:
    """(auc, low, high): DeLong confidence interval, auc ± z·se clipped to [0, 1] as pROC does.

    Floats for (N,) input; arrays of K for (N, K) input.
    """
    yb, s, one = _check(y, score)
    auc, cov = delong_covariance(yb, s)
    low, high = normal_ci(auc[0], cov[:, 0, 0], level)
    return tuple(_squeeze(v, one) for v in (auc[0], low, high))


def normal_ci(auc: np.ndarray, var: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """auc ± z·sqrt(var), clipped to [0, 1] (pROC's DeLong interval)."""
    half = sps.norm.ppf(0.5 + level / 2) * np.sqrt(var)
    return np.clip(auc - half, 0, 1), np.clip(auc + half, 0, 1)


def _z_test(diff: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided normal test; a zero variance gives z = 0 (p = 1) for equal AUROCs, ±inf otherwise."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(var > 0, diff / np.sqrt(np.where(var > 0, var, 1.0)), np.where(diff == 0, 0.0, np.sign(diff) * np.inf))
    z = np.where(np.isnan(diff) | np.isnan(var), np.nan, z)
    return z, 2 * sps.norm.sf(np.abs(z))


def unpaired_difference(
    auc_a: np.ndarray | float, var_a: np.ndarray | float, auc_b: np.ndarray | float, var_b: np.ndarray | float, level: float = 0.95
) -> Difference:
    """AUROC b - a of two independent sets of images (other patients, another hospital): their
    DeLong variances add. The CI is diff ± z·sqrt(var_a + var_b), not clipped; p is two-sided."""
    a, b = np.asarray(auc_a, dtype=float), np.asarray(auc_b, dtype=float)
    diff, var = b - a, np.asarray(var_a, dtype=float) + np.asarray(var_b, dtype=float)
    half = sps.norm.ppf(0.5 + level / 2) * np.sqrt(var)
    z, p = _z_test(diff, var)
    one = diff.ndim == 0
    return Difference(*(float(v) if one else v for v in (diff, diff - half, diff + half, z, p)))


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> DeLongTest:
    """Paired two-sided DeLong test of two scores on the same images (pROC's roc.test, paired)."""
    yb, a, one = _check(y, score_a)
    _, b, _ = _check(y, score_b)
    auc, cov = delong_covariance(yb, np.stack([a, b]))
    z, p = _z_test(auc[0] - auc[1], cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1])
    return DeLongTest(*(_squeeze(v, one) for v in (auc[0], auc[1], z, p)))


def pairwise_delong(auc: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Paired DeLong p-values (K, M, M) between every two models, from `delong_covariance`'s output."""
    var = np.einsum("kaa->ka", cov)
    diff = auc.T[:, :, None] - auc.T[:, None, :]
    return _z_test(diff, var[:, :, None] + var[:, None, :] - 2 * cov)[1]


def findings_covariance(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of one model's K findings on the same images and their joint DeLong covariance (K, K).

    The findings have different positive sets, but every image enters every AUROC, so the estimates
    are correlated. DeLong's structural components generalise: each image's placement value for a
    finding, centred and scaled by 1/sqrt(m(m-1)) as a positive or 1/sqrt(n(n-1)) as a negative of
    that finding, is its component; the covariance is the components' cross product over images. The
    diagonal is DeLong's variance, and for two scores of one finding it is DeLong's paired covariance.
    Findings with fewer than two positives or negatives get NaN rows and columns; NaN labels (a
    finding a dataset does not label) leave that image out of that finding.
    """
    y = np.asarray(y, dtype=np.float64)
    labelled = ~np.isnan(y)  # an unlabelled image (NaN) enters neither that finding's AUROC nor its component
    _, s, _ = _check(np.where(labelled, y, 0), score)
    auc = np.full(y.shape[1], np.nan)
    components = np.zeros_like(s)
    for k in range(y.shape[1]):
        rows = labelled[:, k]
        yb = y[rows, k] == 1
        m, n = float(yb.sum()), float((~yb).sum())
        if m < 2 or n < 2:
            continue
        a, v = placements(yb[:, None], s[rows, k][:, None])
        auc[k] = a[0]
        components[rows, k] = (v[:, 0] - a[0]) * np.where(yb, 1 / np.sqrt(m * (m - 1)), 1 / np.sqrt(n * (n - 1)))
    valid = ~np.isnan(auc)
    cov = components.T @ components
    cov[~valid, :] = np.nan
    cov[:, ~valid] = np.nan
    return auc, cov


def compare_findings(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Table 5: p-values (K, K) between one model's findings' AUROCs, Bonferroni-adjusted over K(K-1)/2 pairs.

    Two-sided z-test of each AUROC difference with its paired variance var_a + var_b - 2 cov_ab from
    `findings_covariance`: the AUROCs share the test images, so treating them as independent
    (var_a + var_b) would misstate the variance of their difference.
    """
    auc, cov = findings_covariance(y, score)
    var = np.diagonal(cov)
    _, p = _z_test(auc[:, None] - auc[None, :], var[:, None] + var[None, :] - 2 * cov)
    k = auc.size
    adjusted = bonferroni(p, k * (k - 1) // 2)
    np.fill_diagonal(adjusted, np.nan)
    return adjusted


# --- summaries and tests over findings ------------------------------------------------------------


def bonferroni(p: np.ndarray | float, comparisons: int) -> np.ndarray:
    return np.minimum(np.asarray(p, dtype=float) * comparisons, 1.0)


def stars(p: float) -> str:
    """The paper's significance marks: *** p<0.001, ** p<0.01, * p<0.05, n.s. otherwise."""
    if not np.isfinite(p):
        return "–"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def mean_se_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> MeanCI:
    """Mean ± SE and its t-interval with n-1 degrees of freedom (the paper's '0.842 ± 0.017 (0.805, 0.879)')."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return MeanCI(np.nan, np.nan, np.nan, np.nan, 0)
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, np.nan, np.nan, np.nan, 1)
    se = float(x.std(ddof=1) / np.sqrt(x.size))
    half = float(sps.t.ppf(0.5 + level / 2, x.size - 1)) * se
    return MeanCI(mean, se, mean - half, mean + half, int(x.size))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Pearson r and two-sided p over the pairs where both are finite; NaN with fewer than 3."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return np.nan, np.nan
    result = sps.pearsonr(a[keep], b[keep])
    return float(result.statistic), float(result.pvalue)


def _complete_rows(table: np.ndarray) -> np.ndarray:
    table = np.asarray(table, float)
    return table[np.isfinite(table).all(axis=1)]


def rm_anova(table: np.ndarray) -> AnovaResult:
    """One-way repeated-measures ANOVA (statsmodels AnovaRM): rows = subjects (findings), columns = models.

    Findings missing for any model are left out (AnovaRM needs a balanced design).
    """
    from statsmodels.stats.anova import AnovaRM

    data = _complete_rows(table)
    rows, cols = data.shape
    if rows < 2 or cols < 2:
        return AnovaResult(np.nan, np.nan, np.nan, np.nan, rows)
    long = pd.DataFrame({"subject": np.repeat(np.arange(rows), cols), "model": np.tile(np.arange(cols), rows), "value": data.ravel()})
    res = AnovaRM(long, depvar="value", subject="subject", within=["model"]).fit().anova_table.iloc[0]
    return AnovaResult(float(res["F Value"]), float(res["Num DF"]), float(res["Den DF"]), float(res["Pr > F"]), rows)


def pairwise_paired_t(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bonferroni-adjusted paired t-tests between every two columns (the RM-ANOVA post hoc).

    Returns (mean difference row - column, adjusted p), both (M, M).
    """
    data = _complete_rows(table)
    m = data.shape[1]
    diff = np.full((m, m), np.nan)
    p = np.full((m, m), np.nan)
    pairs = list(itertools.combinations(range(m), 2))
    for a, b in pairs:
        d = data[:, a] - data[:, b]
        diff[a, b], diff[b, a] = d.mean() if d.size else np.nan, -d.mean() if d.size else np.nan
        if d.size >= 2:
            raw = 1.0 if np.all(d == 0) else sps.ttest_rel(data[:, a], data[:, b]).pvalue
            p[a, b] = p[b, a] = float(bonferroni(raw, len(pairs)))
    return diff, p


# --- patient-level bootstrap ------------------------------------------------------------------------


def bootstrap_auroc(
    y: np.ndarray,
    score: np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile CIs of per-column AUROCs and of their mean, resampling groups (patients) with replacement.

    Images of one patient are not independent, so whole patients are drawn; `groups=None` resamples
    images. Each replicate reweights the one pre-sorted score matrix (no re-sort). A NaN label
    (finding not labelled for that image) has weight 0.
    """
    if n_boot < 1:
        raise CxrdxError(f"bootstrap needs at least one replicate, got {n_boot}")
    labelled = ~np.isnan(np.asarray(y, dtype=np.float64))
    yb, s, _ = _check(np.where(labelled, y, 0), score)
    labelled = labelled.reshape(yb.shape)
    codes = pd.factorize(np.asarray(groups))[0] if groups is not None else np.arange(yb.shape[0])
    if codes.size != yb.shape[0]:
        raise CxrdxError(f"{codes.size} group ids for {yb.shape[0]} images")
    t = _tie_groups(s)
    pos = np.take_along_axis(yb, t.order, axis=0).T.ravel().astype(np.float64)
    codes_sorted = codes[t.order].T.ravel()
    labelled_sorted = np.take_along_axis(labelled, t.order, axis=0).T.ravel()
    n_groups = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    aucs = np.empty((n_boot, t.k))
    for r in range(n_boot):
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups).astype(np.float64)
        pos_in, neg_in, _, neg_below, m_pos, m_neg = _group_counts(t, pos, weight[codes_sorted] * labelled_sorted)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[r] = np.bincount(t.column, weights=pos_in * (neg_below + 0.5 * neg_in), minlength=t.k) / (m_pos * m_neg)
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():  # all-NaN columns (a finding without positives) stay NaN quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(aucs, [tail, 100 - tail], axis=0)
        mean_low, mean_high = np.nanpercentile(np.nanmean(aucs, axis=1), [tail, 100 - tail])
    return BootstrapCI(low, high, float(mean_low), float(mean_high), n_boot)
