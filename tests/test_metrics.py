"""cxrdx.metrics against scikit-learn and hand computations; degenerate findings; expert labels."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from cxrdx import metrics
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS


def _data(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 14)) < np.linspace(0.03, 0.3, 14)).astype(np.uint8)
    probs = np.clip(0.25 * y + 0.75 * rng.random((n, 14)), 0, 1)
    return y, probs


def test_threshold_metrics_match_sklearn_macro():
    y, probs = _data()
    thresholds = np.linspace(0.3, 0.7, 14)
    result = metrics.evaluate(y, probs, thresholds).per_finding
    pred = probs >= thresholds
    for k, name in enumerate(FINDINGS):
        p, r, f, _ = precision_recall_fscore_support(y[:, k], pred[:, k], average="macro", labels=[0, 1], zero_division=0)
        row = result.loc[name]
        assert (row["macro_precision"], row["macro_recall"], row["macro_f1"]) == pytest.approx((p, r, f))
        assert row["accuracy"] == pytest.approx(accuracy_score(y[:, k], pred[:, k]))
        assert row["auroc"] == pytest.approx(roc_auc_score(y[:, k], probs[:, k]))


def test_overall_summary():
    y, probs = _data()
    evaluation = metrics.evaluate(y, probs)
    overall = evaluation.overall
    assert overall.exact_match_accuracy == pytest.approx(accuracy_score(y, probs >= 0.5))  # subset accuracy
    aucs = [roc_auc_score(y[:, k], probs[:, k]) for k in range(14)]
    assert overall.auroc.mean == pytest.approx(np.mean(aucs))
    assert overall.auroc.se == pytest.approx(np.std(aucs, ddof=1) / np.sqrt(14))
    assert overall.macro_f1.mean == pytest.approx(evaluation.per_finding["macro_f1"].mean())
    assert overall.images == 600 and evaluation.notes == [] and overall.auroc_bootstrap is None
    written = evaluation.to_dict()["overall"]  # metrics.json's keys, in order
    assert list(written) == [
        "images",
        "auroc",
        "exact_match_accuracy",
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "ece",
        "left_out_of_auroc_mean",
        "level",
    ]
    assert written["auroc"] == {
        "mean": overall.auroc.mean,
        "se": overall.auroc.se,
        "low": overall.auroc.low,
        "high": overall.auroc.high,
        "n": 14,
    }
    booted = metrics.evaluate(y, probs, n_bootstrap=5).to_dict()["overall"]["auroc_bootstrap"]
    assert list(booted) == ["low", "high", "replicates", "unit"] and booted["replicates"] == 5 and booted["unit"] == "image"


def test_finding_without_positives_warns_and_is_left_out():
    y, probs = _data()
    y[:, 7] = 0  # Hernia: no positives in this split
    with pytest.warns(metrics.MetricWarning, match="Hernia: no positive images"):
        evaluation = metrics.evaluate(y, probs)
    assert np.isnan(evaluation.per_finding.loc["Hernia", "auroc"])
    assert evaluation.overall.auroc.n == 13
    assert evaluation.overall.left_out_of_auroc_mean == ["Hernia"]
    assert "Hernia" in evaluation.notes[0]
    assert evaluation.to_dict()["per_finding"]["Hernia"]["auroc"] is None  # JSON null, not NaN
    with pytest.warns(metrics.MetricWarning, match="Hernia.*threshold stays 0.5"):
        assert metrics.choose_thresholds(y, probs, "youden")[7] == 0.5


def test_youden_and_f1_thresholds_are_optimal():
    y, probs = _data(400, seed=1)
    youden = metrics.choose_thresholds(y, probs, "youden")
    f1 = metrics.choose_thresholds(y, probs, "f1")
    for k in (0, 8, 13):
        candidates = np.unique(probs[:, k])
        pos, neg = y[:, k] == 1, y[:, k] == 0
        j = [(probs[pos, k] >= t).mean() - (probs[neg, k] >= t).mean() for t in candidates]
        chosen = (probs[pos, k] >= youden[k]).mean() - (probs[neg, k] >= youden[k]).mean()
        assert chosen == pytest.approx(max(j))

        def f1_at(t: float, k: int = k) -> float:
            pred = probs[:, k] >= t
            tp = (pred & (y[:, k] == 1)).sum()
            return 2 * tp / (pred.sum() + y[:, k].sum())

        assert f1_at(f1[k]) == pytest.approx(max(f1_at(t) for t in candidates))
        best = precision_recall_fscore_support(y[:, k], probs[:, k] >= f1[k], average="binary", zero_division=0)[2]
        assert best == pytest.approx(f1_at(f1[k]))
    with pytest.raises(CxrdxError, match="unknown threshold method"):
        metrics.choose_thresholds(y, probs, "median")


def test_ece_by_hand_and_reliability_bins():
    y = np.array([[0], [1], [1], [0]])
    p = np.array([[0.05], [0.15], [0.95], [0.85]])
    # bin 0: mean 0.05, positives 0; bin 1: 0.15 vs 1; bin 8: 0.85 vs 0; bin 9: 0.95 vs 1
    expected = (0.05 + 0.85 + 0.85 + 0.05) / 4
    assert metrics.expected_calibration_error(y, p)[0] == pytest.approx(expected)
    curve = metrics.reliability(y[:, 0], p[:, 0])
    assert curve["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert curve.loc[9, "frac_pos"] == 1.0 and np.isnan(curve.loc[5, "mean_prob"])
    rng = np.random.default_rng(2)
    q = rng.random((20000, 1))
    assert metrics.expected_calibration_error((rng.random((20000, 1)) < q).astype(int), q)[0] < 0.02


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(scale=3.0, size=(20000, 14))
    truth = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 2.0))).astype(np.uint8)  # true temperature 2
    overconfident = 1 / (1 + np.exp(-z))
    t = metrics.fit_temperature(truth, overconfident)
    np.testing.assert_allclose(t, 2.0, rtol=0.08)
    fixed = metrics.apply_temperature(overconfident, t)
    assert metrics.expected_calibration_error(truth, fixed).mean() < metrics.expected_calibration_error(truth, overconfident).mean()
    np.testing.assert_allclose(metrics.apply_temperature(overconfident, np.ones(14)), overconfident, atol=1e-9)
    assert metrics.apply_temperature(overconfident, None) is not None


def test_compare_models_statistics():
    y, probs = _data(500)
    rng = np.random.default_rng(4)
    models = {"a": probs, "b": np.clip(probs + 0.1 * rng.random(probs.shape), 0, 1), "c": rng.random(probs.shape)}
    cmp = metrics.compare_models(y, models, thresholds={"a": 0.5, "b": 0.4, "c": 0.5})
    assert cmp.auc.shape == (3, 14) and cmp.delong_p.shape == (14, 3, 3)
    np.testing.assert_allclose(cmp.delong_p, cmp.delong_p.transpose(0, 2, 1))
    assert cmp.anova.subjects == 14 and cmp.anova.p < 0.001  # c is noise
    assert cmp.pairwise_p[0, 2] < 0.001
    assert cmp.evaluations["b"].per_finding["threshold"].eq(0.4).all()
    assert cmp.findings_p["a"].shape == (14, 14)
    expected = metrics.evaluate(y, models["b"], 0.4)
    pd.testing.assert_frame_equal(cmp.evaluations["b"].per_finding, expected.per_finding)


def test_expert_auroc_uses_max_of_nodule_and_mass():
    rng = np.random.default_rng(5)
    names = [f"{i:08d}_000.png" for i in range(300)]
    y = (rng.random((300, 14)) < 0.2).astype(np.uint8)
    probs = rng.random((300, 14))
    expert = pd.DataFrame(
        {"Pneumothorax": (rng.random(200) < 0.3).astype(np.uint8), "Nodule or mass": (rng.random(200) < 0.3).astype(np.uint8)},
        index=names[100:],
    )
    table = metrics.expert_auroc(names, y, probs, expert)
    assert table.loc["Pneumothorax", "images"] == 200
    nodule, mass = FINDINGS.index("Nodule"), FINDINGS.index("Mass")
    score = np.maximum(probs[100:, nodule], probs[100:, mass])
    assert table.loc["Nodule or mass", "expert_auroc"] == pytest.approx(roc_auc_score(expert["Nodule or mass"], score))
    nlp = np.maximum(y[100:, nodule], y[100:, mass])
    assert table.loc["Nodule or mass", "nlp_auroc"] == pytest.approx(roc_auc_score(nlp, score))
    assert table.loc["Nodule or mass", "nlp_positives"] == nlp.sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        none = metrics.expert_auroc(names[:100], y[:100], probs[:100], expert)
    assert none["images"].eq(0).all() and none["expert_auroc"].isna().all()
    assert any("none of the evaluated images" in str(w.message) for w in caught)


def test_read_expert_labels_reports_bad_values(tmp_path: Path):
    path = tmp_path / "expert.csv"
    path.write_text("Image Index,Pneumothorax,Nodule or mass\na.png,YES,NO\nb.png,maybe,NO\n")
    with pytest.raises(CxrdxError, match=r"row 3, column 'Pneumothorax'.*'maybe'"):
        metrics.read_expert_labels(path)
    path.write_text("Image Index,Fracture\na.png,NO\n")
    with pytest.raises(CxrdxError, match="missing column"):
        metrics.read_expert_labels(path)


def test_expert_label_counts_on_the_official_and_paper_test_splits(shared_data: Path):
    folder = shared_data / "chestxray14"
    expert = metrics.read_expert_labels(folder / "google2019_nih-chest-xray-labels.csv.gz")
    official_test = set((folder / "test_list.txt").read_text().split())
    split = pd.read_csv(folder / "paper_split.csv.gz")
    paper_test = set(split.loc[split["split"] == "test", "Image Index"])
    assert expert.index.isin(list(official_test)).sum() == 1962
    assert expert.index.isin(list(paper_test)).sum() == 900
    assert (expert["Set Id"] == "test").sum() == 1962
    assert set(np.unique(expert["Pneumothorax"])) == {0, 1}


# --- NaN labels: findings a dataset does not label ---------------------------------------------------


def _with_gaps(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels with NaN where the image's dataset does not label the finding; Hernia labelled nowhere."""
    y, probs = _data(seed=seed)
    rng = np.random.default_rng(seed)
    labelled = rng.random(y.shape) < 0.7
    labelled[:, FINDINGS.index("Hernia")] = False
    return np.where(labelled, y, np.nan), probs, labelled


def test_fully_labelled_float_labels_give_the_same_evaluation():
    y, probs = _data()
    as_uint8 = metrics.evaluate(y, probs, np.linspace(0.3, 0.7, 14), n_bootstrap=20)
    as_float = metrics.evaluate(y.astype(np.float32), probs, np.linspace(0.3, 0.7, 14), n_bootstrap=20)
    pd.testing.assert_frame_equal(as_uint8.per_finding, as_float.per_finding)
    assert as_uint8.overall == as_float.overall


def test_each_finding_is_scored_on_the_images_that_label_it():
    y, probs, labelled = _with_gaps()
    thresholds = np.linspace(0.3, 0.7, 14)
    with pytest.warns(metrics.MetricWarning, match="Hernia: no labelled images"):
        evaluation = metrics.evaluate(y, probs, thresholds)
    table = evaluation.per_finding
    for k, name in enumerate(FINDINGS):
        if name == "Hernia":
            continue
        rows = labelled[:, k]
        yk, pk = y[rows, k], probs[rows, k]
        alone = metrics.evaluate(yk[:, None], pk[:, None], thresholds[k], names=[name]).per_finding.loc[name]
        pd.testing.assert_series_equal(table.loc[name], alone)
        assert table.loc[name, "auroc"] == pytest.approx(roc_auc_score(yk, pk))
        assert table.loc[name, "images"] == rows.sum() and table.loc[name, "positives"] == yk.sum()
        assert table.loc[name, "accuracy"] == pytest.approx(accuracy_score(yk, pk >= thresholds[k]))
    # the finding labelled nowhere is n/a everywhere, not 0, and out of the means
    hernia = table.loc["Hernia"]
    assert hernia["images"] == 0 and hernia["positives"] == 0
    for column in ("positive_ratio", "auroc", "auroc_low", "accuracy", "macro_f1", "ece"):
        assert np.isnan(hernia[column]), column
    assert evaluation.overall.left_out_of_auroc_mean == ["Hernia"] and evaluation.overall.auroc.n == 13
    assert evaluation.overall.auroc.mean == pytest.approx(table["auroc"].drop("Hernia").mean())
    assert evaluation.to_dict()["per_finding"]["Hernia"]["auroc"] is None


def test_exact_match_and_calibration_skip_unlabelled_entries():
    y = np.array([[1, np.nan], [0, 1], [np.nan, np.nan], [1, 0]])
    probs = np.array([[0.9, 0.9], [0.2, 0.1], [0.9, 0.9], [0.4, 0.1]])
    # row 0: labelled finding right; row 1: second wrong; row 2: no labels, left out; row 3: first wrong
    assert metrics.exact_match_accuracy(y, probs, 0.5) == pytest.approx(1 / 3)
    np.testing.assert_allclose(
        metrics.expected_calibration_error(y, probs, 10), [(0.1 + 0.2 + 0.6) / 3, abs(0.9 - 0.1) / 2]
    )  # one bin: gaps cancel
    assert metrics.expected_calibration_error(np.full((2, 1), np.nan), np.full((2, 1), 0.5)).tolist() == [
        pytest.approx(np.nan, nan_ok=True)
    ]
    assert metrics.reliability(y[:, 0], probs[:, 0])["count"].sum() == 3
    tp = metrics.confusion(y, probs, 0.5)
    assert [tp[k].tolist() for k in ("tp", "fp", "tn", "fn")] == [[1, 0], [0, 0], [1, 1], [1, 1]]


def test_thresholds_temperatures_and_comparison_with_unlabelled_findings():
    y, probs, labelled = _with_gaps()
    k = FINDINGS.index("Effusion")
    with pytest.warns(metrics.MetricWarning, match="Hernia"):
        chosen = metrics.choose_thresholds(y, probs, "f1")
    with pytest.warns(metrics.MetricWarning, match="Hernia"):
        temperatures = metrics.fit_temperature(y, probs)
    rows = labelled[:, k]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the labelled subset alone has both classes
        assert chosen[k] == metrics.choose_thresholds(y[rows][:, [k]], probs[rows][:, [k]], "f1", names=["Effusion"])[0]
        assert temperatures[k] == pytest.approx(metrics.fit_temperature(y[rows][:, [k]], probs[rows][:, [k]], names=["Effusion"])[0])
    assert chosen[7] == 0.5 and temperatures[7] == 1.0
    with pytest.warns(metrics.MetricWarning, match="Hernia: no labelled images"):
        cmp = metrics.compare_models(
            y, {"a": probs, "b": np.clip(probs + 0.05 * np.sin(np.arange(600))[:, None], 0, 1)}, groups=np.arange(600) // 3, n_bootstrap=30
        )
    assert np.isnan(cmp.auc[:, 7]).all() and np.isfinite(np.delete(cmp.auc, 7, axis=1)).all()
    assert np.isnan(cmp.positive_ratio[7]) and cmp.positive_ratio[k] == pytest.approx(np.nanmean(y[:, k]))
    assert np.isnan(cmp.findings_p["a"][7]).all() and np.isnan(cmp.delong_p[7]).all()
    assert cmp.anova.subjects == 13  # findings with an AUROC for every model
    boot = cmp.evaluations["a"].per_finding
    assert np.isnan(boot.loc["Hernia", "auroc_boot_low"]) and (boot["auroc_boot_low"].drop("Hernia") < boot["auroc"].drop("Hernia")).all()
    with pytest.raises(CxrdxError, match="labels must be 0, 1 or NaN"):
        metrics.evaluate(np.full((3, 14), 2.0), np.zeros((3, 14)))
