"""cxrdx.stats against R's pROC (stored fixture), scikit-learn, scipy, hand computations and the paper's Table 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from cxrdx import stats
from cxrdx.errors import CxrdxError

FIXTURE = Path(__file__).parent / "fixtures" / "proc_delong.json"

# The paper's Table 3: per-finding AUROC of its six models (canonical finding order).
PAPER_TABLE3 = {
    "CoAtNet-0-rw + WBCE": [0.795, 0.901, 0.787, 0.903, 0.874, 0.927, 0.826, 0.865, 0.686, 0.827, 0.748, 0.804, 0.751, 0.870],
    "CoAtNet-0-rw + ours": [0.833, 0.914, 0.809, 0.912, 0.890, 0.940, 0.835, 0.791, 0.715, 0.856, 0.779, 0.819, 0.789, 0.902],
    "EfficientNet-b5 + WBCE": [0.795, 0.906, 0.798, 0.905, 0.872, 0.906, 0.805, 0.826, 0.699, 0.827, 0.745, 0.810, 0.736, 0.878],
    "EfficientNet-b5 + ours": [0.812, 0.905, 0.802, 0.908, 0.882, 0.912, 0.807, 0.837, 0.712, 0.832, 0.755, 0.810, 0.774, 0.886],
    "ResNet50 + WBCE": [0.776, 0.908, 0.786, 0.898, 0.867, 0.872, 0.790, 0.847, 0.688, 0.819, 0.722, 0.789, 0.733, 0.857],
    "ResNet50 + ours": [0.791, 0.890, 0.788, 0.899, 0.878, 0.871, 0.788, 0.768, 0.705, 0.823, 0.718, 0.790, 0.733, 0.859],
}
# Its "Overall" row: mean ± SE (95% CI).
PAPER_OVERALL = [
    (0.826, 0.018, 0.786, 0.866),
    (0.842, 0.017, 0.805, 0.879),
    (0.822, 0.018, 0.784, 0.860),
    (0.831, 0.016, 0.796, 0.866),
    (0.811, 0.018, 0.772, 0.850),
    (0.807, 0.017, 0.770, 0.844),
]


def _case(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array([int(c) for c in case["y"]]), np.array(case["a"], float), np.array(case["b"], float)


def test_delong_matches_proc_fixture():
    fixture = json.loads(FIXTURE.read_text())
    assert len(fixture["cases"]) >= 10
    worst = 0.0
    for name, case in fixture["cases"].items():
        y, a, b = _case(case)
        auc_a, low_a, high_a = stats.auroc_ci(y, a)
        auc_b, low_b, high_b = stats.auroc_ci(y, b)
        test = stats.delong_test(y, a, b)
        _, cov = stats.delong_covariance(y[:, None], np.stack([a, b])[..., None])
        ours = {
            "auc_a": auc_a,
            "low_a": low_a,
            "high_a": high_a,
            "var_a": cov[0, 0, 0],
            "auc_b": auc_b,
            "low_b": low_b,
            "high_b": high_b,
            "var_b": cov[0, 1, 1],
            "z": test.z,
            "p": test.p,
        }
        for key, expected in case["proc"].items():
            assert ours[key] == pytest.approx(expected, abs=1e-6), f"{name}: {key}"
            worst = max(worst, abs(ours[key] - expected))
    assert worst < 1e-9  # in practice the agreement is at rounding level


def test_hand_computed_ties():
    # positives score 2 and 3, negatives 1, 2, 2: placements V10 = (2/3, 1), V01 = (1, 3/4, 3/4)
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([1.0, 2, 2, 2, 3])
    auc, cov = stats.delong_covariance(y[:, None], s[None, :, None])
    assert auc[0, 0] == pytest.approx(5 / 6)
    # var = S10/m + S01/n = (1/18)/2 + (1/48)/3
    assert cov[0, 0, 0] == pytest.approx(5 / 144)
    _, v = stats.placements(y[:, None].astype(bool), s[:, None])
    np.testing.assert_allclose(v[:, 0], [1, 0.75, 0.75, 2 / 3, 1])
    auc, low, high = stats.auroc_ci(y, s)
    half = sps.norm.ppf(0.975) * np.sqrt(5 / 144)
    assert (low, high) == pytest.approx((5 / 6 - half, 1.0))  # upper end clipped to 1 as in pROC


def test_auroc_matches_sklearn_per_column_with_ties():
    rng = np.random.default_rng(0)
    y = (rng.random((3000, 14)) < np.linspace(0.002, 0.3, 14)).astype(np.uint8)
    y[:2] = 1
    s = rng.integers(0, 40, (3000, 14)) + 3 * y  # many ties
    auc, low, high = stats.auroc_ci(y, s)
    expected = [roc_auc_score(y[:, k], s[:, k]) for k in range(14)]
    np.testing.assert_allclose(auc, expected, atol=1e-12)
    assert np.all(low <= auc) and np.all(auc <= high)
    single = [stats.auroc_ci(y[:, k], s[:, k]) for k in range(14)]
    np.testing.assert_allclose(np.array(single).T, [auc, low, high], atol=1e-12)


def test_missing_class_gives_nan_not_error():
    y = np.zeros((20, 2), dtype=np.uint8)
    y[:5, 1] = 1
    s = np.random.default_rng(1).random((20, 2))
    auc, low, high = stats.auroc_ci(y, s)
    assert np.isnan(auc[0]) and np.isnan(low[0]) and np.isfinite(auc[1])
    assert np.isnan(stats.delong_test(y[:, 0], s[:, 0], s[:, 1]).p)


def test_identical_scores_and_perfect_separation():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    test = stats.delong_test(y, s, s)
    assert (test.z, test.p) == (0.0, 1.0)
    assert stats.auroc_ci(y, s) == (1.0, 1.0, 1.0)


def test_bad_input_is_a_user_error():
    with pytest.raises(CxrdxError, match="0 or 1"):
        stats.auroc_ci(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(CxrdxError, match="NaN"):
        stats.auroc_ci(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(CxrdxError, match="shape"):
        stats.auroc_ci(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


def test_pairwise_delong_is_the_paired_test():
    rng = np.random.default_rng(2)
    y = (rng.random((400, 3)) < 0.2).astype(np.uint8)
    scores = rng.random((3, 400, 3)) + y * np.array([0.2, 0.5, 0.8])[:, None, None]
    auc, cov = stats.delong_covariance(y, scores)
    p = stats.pairwise_delong(auc, cov)
    for k in range(3):
        direct = stats.delong_test(y[:, k], scores[0, :, k], scores[2, :, k])
        assert p[k, 0, 2] == pytest.approx(direct.p) == pytest.approx(p[k, 2, 0])
        assert p[k, 1, 1] == 1.0


def test_mean_se_ci_reproduces_the_papers_overall_row():
    for values, (mean, se, low, high) in zip(PAPER_TABLE3.values(), PAPER_OVERALL):
        result = stats.mean_se_ci(values)
        assert [round(v, 3) for v in result[:4]] == [mean, se, low, high]
        assert result.n == 14
    assert stats.mean_se_ci([0.8, np.nan, 0.9]).n == 2
    assert np.isnan(stats.mean_se_ci([np.nan]).mean)


def test_rm_anova_and_bonferroni_reproduce_the_papers_footnotes():
    table = np.array(list(PAPER_TABLE3.values())).T  # findings x models
    diff, p = stats.pairwise_paired_t(table)
    coat_ours, eff_ours, res_wbce, res_ours = 1, 3, 4, 5
    # Table 3 footnotes a and b: p = 0.037, < 0.001, 0.004, 0.004
    assert round(p[coat_ours, res_wbce], 3) == 0.037
    assert p[coat_ours, res_ours] < 0.001
    assert round(p[eff_ours, res_wbce], 3) == 0.004
    assert round(p[eff_ours, res_ours], 3) == 0.004
    assert diff[coat_ours, res_wbce] == pytest.approx(0.842 - 0.811, abs=1e-3)
    raw = sps.ttest_rel(table[:, coat_ours], table[:, res_wbce]).pvalue
    assert p[coat_ours, res_wbce] == pytest.approx(min(1.0, raw * 15))


def test_rm_anova_matches_the_sums_of_squares():
    rng = np.random.default_rng(3)
    table = rng.random((14, 4)) + np.array([0.0, 0.1, 0.2, 0.05])
    result = stats.rm_anova(table)
    n, k = table.shape
    grand = table.mean()
    ss_model = n * ((table.mean(axis=0) - grand) ** 2).sum()
    ss_subject = k * ((table.mean(axis=1) - grand) ** 2).sum()
    ss_error = ((table - grand) ** 2).sum() - ss_model - ss_subject
    f = (ss_model / (k - 1)) / (ss_error / ((n - 1) * (k - 1)))
    assert result.f == pytest.approx(f)
    assert (result.df_num, result.df_den) == (k - 1, (n - 1) * (k - 1))
    assert result.p == pytest.approx(sps.f.sf(f, k - 1, (n - 1) * (k - 1)))
    with_gap = table.copy()
    with_gap[0, 1] = np.nan  # a finding without AUROC for one model is left out
    assert stats.rm_anova(with_gap).subjects == 13


def test_pearson_matches_scipy_and_skips_nan():
    x = [0.1, 0.2, 0.3, 0.5, np.nan]
    y = [0.9, 0.7, 0.8, 0.6, 0.5]
    expected = sps.pearsonr(x[:4], y[:4])
    assert stats.pearson(x, y) == pytest.approx((expected.statistic, expected.pvalue))
    assert np.isnan(stats.pearson([1, 2], [3, 4])[0])


def _correlated_findings(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two findings sharing most positives, scored by one model whose two outputs share most signal."""
    latent = rng.random(n) < 0.3
    y = np.stack([latent, latent ^ (rng.random(n) < 0.05)], axis=1).astype(np.uint8)
    common = rng.normal(size=n)
    s = np.stack([common + 1.0 * y[:, 0], common + 0.6 * y[:, 1]], axis=1) + 0.3 * rng.normal(size=(n, 2))
    return y, s


def _brute_force_components(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Each image's DeLong structural component for each finding, by the definition (double loops)."""
    n, k = y.shape
    out = np.zeros((n, k))
    for j in range(k):
        pos, neg = np.flatnonzero(y[:, j]), np.flatnonzero(1 - y[:, j])
        kernel = lambda a, b, j=j: 1.0 if s[a, j] > s[b, j] else 0.5 if s[a, j] == s[b, j] else 0.0
        auc = np.mean([kernel(a, b) for a in pos for b in neg])
        for i in pos:
            out[i, j] = (np.mean([kernel(i, b) for b in neg]) - auc) / np.sqrt(len(pos) * (len(pos) - 1))
        for i in neg:
            out[i, j] = (np.mean([kernel(a, i) for a in pos]) - auc) / np.sqrt(len(neg) * (len(neg) - 1))
    return out


def test_findings_covariance_by_hand():
    # A: positives 0.9 (outranks both negatives) and 0.4 (one of two): AUROC 0.75; placements 1, 0.5 | 0.5, 1
    # B: positives 0.8 and 0.6, negatives 0.3 and 0.7: AUROC 0.75; placements 1, 0.5 | 1, 0.5
    y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    s = np.array([[0.9, 0.8], [0.4, 0.3], [0.5, 0.6], [0.1, 0.7]])
    auc, cov = stats.findings_covariance(y, s)
    # components ±0.25/sqrt(2): A (+, -, -, +), B (+, +, -, -): variances 4 * 0.0625 / 2, covariance 0
    np.testing.assert_allclose(auc, [0.75, 0.75])
    np.testing.assert_allclose(cov, [[0.125, 0.0], [0.0, 0.125]], atol=1e-15)
    y[:, 1], s[:, 1] = y[:, 0], [0.9, 0.6, 0.5, 0.1]  # B now A's labels, 0.6 outranking both negatives
    auc, cov = stats.findings_covariance(y, s)
    np.testing.assert_allclose(auc, [0.75, 1.0])
    np.testing.assert_allclose(cov, [[0.125, 0.0], [0.0, 0.0]], atol=1e-15)  # a perfect AUROC has no variance


def test_findings_covariance_matches_the_definition_and_delong():
    rng = np.random.default_rng(7)
    y = (rng.random((40, 3)) < [0.3, 0.5, 0.2]).astype(np.uint8)
    s = np.round(rng.random((40, 3)) + 0.4 * y, 1)  # rounded: ties
    components = _brute_force_components(y, s)
    auc, cov = stats.findings_covariance(y, s)
    np.testing.assert_allclose(cov, components.T @ components, atol=1e-12)
    np.testing.assert_allclose(np.diagonal(cov), stats.delong_covariance(y, s[None])[1][:, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(auc, [roc_auc_score(y[:, j], s[:, j]) for j in range(3)])
    y[:, 2] = 0
    assert np.isnan(stats.findings_covariance(y, s)[1][2]).all()


def test_paired_variance_of_the_difference_matches_a_large_bootstrap():
    rng = np.random.default_rng(11)
    y, s = _correlated_findings(400, rng)
    auc, cov = stats.findings_covariance(y, s)
    paired = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    counts = np.stack([np.bincount(d, minlength=400) for d in rng.integers(0, 400, size=(4000, 400))]).astype(float)
    replicates = []
    for j in range(2):  # AUROC of each resample by its definition, counts weighting the image pairs
        pos, neg = y[:, j] == 1, y[:, j] == 0
        kernel = (s[pos, j][:, None] > s[neg, j][None, :]) + 0.5 * (s[pos, j][:, None] == s[neg, j][None, :])
        w_pos, w_neg = counts[:, pos], counts[:, neg]
        replicates.append(np.einsum("bi,ij,bj->b", w_pos, kernel, w_neg) / (w_pos.sum(1) * w_neg.sum(1)))
    assert paired == pytest.approx(np.var(replicates[0] - replicates[1]), rel=0.1)
    assert paired < 0.35 * (cov[0, 0] + cov[1, 1])  # strongly correlated: far below the independent variance


def test_compare_findings_bonferroni_and_stars():
    rng = np.random.default_rng(3)
    y = (rng.random((60, 4)) < 0.4).astype(np.uint8)
    s = rng.random((60, 4)) + np.array([1.5, 0.2, 0.9, 0.0]) * y
    components = _brute_force_components(y, s)
    cov = components.T @ components
    auc = np.array([roc_auc_score(y[:, j], s[:, j]) for j in range(4)])
    p = stats.compare_findings(y, s)
    for a, b in [(0, 1), (0, 3), (1, 2), (2, 3)]:
        z = (auc[a] - auc[b]) / np.sqrt(cov[a, a] + cov[b, b] - 2 * cov[a, b])
        assert p[a, b] == pytest.approx(min(1.0, 6 * 2 * sps.norm.sf(abs(z)))) == pytest.approx(p[b, a])
    assert p[0, 3] < 0.001 and p[1, 3] == 1.0  # one clear difference, one capped at 1
    assert np.isnan(np.diagonal(p)).all()
    assert [stats.stars(v) for v in (0.0005, 0.005, 0.03, 0.2)] == ["***", "**", "*", "n.s."]


def test_patient_bootstrap_is_wider_when_images_repeat():
    rng = np.random.default_rng(4)
    y = (rng.random((300, 2)) < 0.3).astype(np.uint8)
    s = rng.random((300, 2)) + 0.5 * y
    y3, s3 = np.repeat(y, 3, axis=0), np.repeat(s, 3, axis=0)
    patients = np.repeat(np.arange(300), 3)
    by_image = stats.bootstrap_auroc(y3, s3, None, n_boot=300, seed=0)
    by_patient = stats.bootstrap_auroc(y3, s3, patients, n_boot=300, seed=0)
    width_image = by_image.high - by_image.low
    width_patient = by_patient.high - by_patient.low
    assert np.all(width_patient > 1.4 * width_image)  # about sqrt(3) wider
    _, low, high = stats.auroc_ci(y, s)
    np.testing.assert_allclose(width_patient, high - low, rtol=0.3)  # the DeLong width of the unrepeated data
    assert by_patient.mean_low < np.mean(stats.auroc_ci(y, s)[0]) < by_patient.mean_high
    reweighted = stats.bootstrap_auroc(y, s, None, n_boot=1, seed=5)
    draw = np.random.default_rng(5).integers(0, 300, 300)
    expected = [roc_auc_score(y[draw, k], s[draw, k]) for k in range(2)]
    np.testing.assert_allclose(reweighted.low, expected)  # one replicate = AUROC of the resampled rows


def test_bootstrap_rejects_mismatched_groups():
    with pytest.raises(CxrdxError, match="group ids"):
        stats.bootstrap_auroc(np.array([0, 1, 1]), np.array([0.1, 0.5, 0.7]), groups=[1, 2], n_boot=5)


def test_paper_pearson_with_positive_ratio(shared_data: Path):
    from cxrdx.data.metadata import read_metadata
    from cxrdx.findings import FINDINGS

    index = read_metadata(shared_data / "chestxray14" / "Data_Entry_2017_v2020.csv.gz")
    split = pd.read_csv(shared_data / "chestxray14" / "paper_split.csv.gz")
    test = index[index["Image Index"].isin(split.loc[split["split"] == "test", "Image Index"])]
    assert len(test) == 22425
    ratio = test[list(FINDINGS)].mean().to_numpy()
    paper = [(-0.517, 0.058), (-0.385, 0.174), (-0.421, 0.134), (-0.432, 0.123), (-0.442, 0.113), (-0.269, 0.352)]
    for values, (r, p) in zip(PAPER_TABLE3.values(), paper):
        ours = stats.pearson(values, ratio)
        assert ours == pytest.approx((r, p), abs=0.005)  # the v2020 labels differ slightly from the paper's
