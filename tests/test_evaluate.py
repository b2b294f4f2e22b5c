"""`cxrdx evaluate / compare / calibrate` end to end on phantoms, and the prediction-file plumbing."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import run_checkpoint
from sklearn.metrics import roc_auc_score

from cxrdx import evaluation, metrics, report, rundir
from cxrdx.cli import main
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS


@pytest.fixture(scope="module")
def run_dir(phantom_cache: Path, phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `cxrdx train` leaves it: split.csv and an (untrained) tiny model's checkpoint."""

    run = tmp_path_factory.mktemp("run")
    shutil.copy(phantom_split, run / "split.csv")
    run_checkpoint(run, phantom_cache)
    return run


@pytest.fixture(scope="module")
def evaluated(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--out", str(out), "--quiet", "--bootstrap", "20"])
            == 0
        )
    return out


def _auroc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    return roc_auc_score(y, p) if 0 < y.sum() < len(y) else np.nan


def test_evaluate_writes_a_self_contained_folder(evaluated: Path, phantom_split: Path):
    for name in ("predictions.csv", "labels.csv", "metrics.json", "report.md", "roc.png", "reliability.png"):
        assert (evaluated / name).is_file(), name
    predictions = pd.read_csv(evaluated / "predictions.csv")
    assert predictions.columns.tolist() == ["Image Index", *FINDINGS]
    split = pd.read_csv(phantom_split)
    assert set(predictions["Image Index"]) == set(split.loc[split["split"] == "test", "Image Index"])
    labels = pd.read_csv(evaluated / "labels.csv").set_index("Image Index").loc[predictions["Image Index"]]
    result = json.loads((evaluated / "metrics.json").read_text())
    for finding in FINDINGS:
        expected = _auroc_or_nan(labels[finding].to_numpy(), predictions[finding].to_numpy())
        got = result["per_finding"][finding]["auroc"]
        assert (got is None and np.isnan(expected)) or got == pytest.approx(expected)
        assert result["per_finding"][finding]["threshold"] == 0.5
    assert result["settings"]["split"] == "test" and result["overall"]["auroc_bootstrap"]["unit"] == "patient"
    text = (evaluated / "report.md").read_text()
    assert "### Table 3" in text and "### Table 4" in text and "### Table 5" in text and "Bootstrap CI" in text


def test_compare_reproduces_evaluate(evaluated: Path, capsys: pytest.CaptureFixture):
    assert main(["compare", str(evaluated), str(evaluated / "predictions.csv"), "--names", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "### Table 3" in out and "### Model vs model: DeLong" in out and "### Table 5. Findings compared by AUROC: b" in out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)  # phantom test split: some findings lack positives
        cmp, _ = evaluation.compare_runs([evaluated, evaluated], ["a", "b"])
    result = json.loads((evaluated / "metrics.json").read_text())
    for k, finding in enumerate(FINDINGS):
        stored = result["per_finding"][finding]["auroc"]
        assert (stored is None and np.isnan(cmp.auc[0, k])) or cmp.auc[0, k] == pytest.approx(stored, abs=1e-12)
    assert np.nanmax(np.abs(cmp.auc[0] - cmp.auc[1])) == 0


def test_raw_files_and_cache_give_the_same_predictions(run_dir: Path, phantom_dir: Path):
    checkpoint = run_dir / "checkpoints" / "best.pt"
    cached = evaluation.predict_split(checkpoint, progress=False).predictions
    predicted = evaluation.predict_split(checkpoint, data_dir=phantom_dir, progress=False)
    raw = predicted.predictions
    assert predicted.notes == [] and predicted.checkpoint.model_name == "test_resnet"
    order = pd.Index(raw.names).get_indexer(cached.names)
    np.testing.assert_allclose(raw.probs[order], cached.probs, atol=1e-5)
    np.testing.assert_array_equal(raw.labels[order], cached.labels)
    flipped = evaluation.predict_split(checkpoint, hflip=True, progress=False).predictions
    assert flipped.probs.shape == cached.probs.shape and not np.allclose(flipped.probs, cached.probs)


def test_calibrate_stores_thresholds_and_temperature(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from cxrdx.checkpoint import load_checkpoint

    source = run_dir / "checkpoints" / "best.pt"
    target = run_dir / "checkpoints" / "calibrated.pt"
    assert main(["calibrate", "--checkpoint", str(source), "--thresholds", "youden", "--temperature", "--out", str(target), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "ece_after" in captured.out and str(target) in captured.out
    ckpt = load_checkpoint(target)
    assert len(ckpt.temperature) == 14 and all(0.05 <= t <= 20 for t in ckpt.temperature)
    assert len(ckpt.thresholds) == 14 and ckpt.thresholds != [0.5] * 14
    assert load_checkpoint(source).temperature is None  # --out leaves the source alone
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["evaluate", "--checkpoint", str(target), "--out", str(out), "--thresholds", "checkpoint", "--quiet"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [result["per_finding"][f]["threshold"] for f in FINDINGS] == pytest.approx(ckpt.thresholds)
    assert result["settings"]["temperature"] == pytest.approx(ckpt.temperature)


def test_findings_without_positives_are_notes_not_crashes(run_dir: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(CxrdxError, match="nothing to calibrate"):
        evaluation.calibrate_checkpoint(run_dir / "checkpoints" / "best.pt")
    val = evaluation.predict_split(run_dir / "checkpoints" / "best.pt", split="val", progress=False).predictions
    # the stratified split gives every finding val positives: leave out the Hernia images to lack one
    keep = val.labels[:, FINDINGS.index("Hernia")] == 0
    labels, probs = val.labels[keep], val.probs[keep]
    missing = [f for f, count in zip(FINDINGS, labels.sum(axis=0)) if count == 0]
    assert "Hernia" in missing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cmp = metrics.compare_models(labels, {"tiny": probs, "flat": np.full_like(probs, 0.5)})
    assert [str(w.message).split(":")[0] for w in caught if w.category is metrics.MetricWarning] == missing
    assert cmp.evaluations["tiny"].overall.left_out_of_auroc_mean == missing
    assert cmp.anova.subjects == 14 - len(missing)
    assert "Table 5" in report.markdown(report.table5(cmp, "tiny"))


def _write_run(folder: Path, names: list[str], probs: np.ndarray, labels: np.ndarray | None = None) -> Path:
    evaluation.write_predictions(folder / "predictions.csv", names, probs)
    if labels is not None:
        evaluation.write_labels(folder / "labels.csv", names, labels, np.arange(len(names)) // 2)
    return folder


def test_compare_cli_on_prediction_files(tmp_path: Path, capsys: pytest.CaptureFixture):
    rng = np.random.default_rng(0)
    names = [f"{i:08d}_000.png" for i in range(300)]
    y = (rng.random((300, 14)) < 0.2).astype(np.uint8)
    a = _write_run(tmp_path / "model_a", names, np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0, 1), y)
    order = rng.permutation(300)  # a second file may list the images in another order
    b = _write_run(tmp_path / "model_b", [names[i] for i in order], rng.random(y.shape)[order])
    out = tmp_path / "tables"
    assert main(["compare", str(a), str(b / "predictions.csv"), "--out", str(out), "--format", "csv", "json"]) == 0
    printed = capsys.readouterr().out
    for title in ("Table 3", "Table 4", "DeLong p-values", "repeated-measures ANOVA", "Table 5. Findings compared by AUROC: model_a"):
        assert title in printed
    assert (out / "roc.png").is_file() and (out / "table3.csv").is_file() and (out / "anova.json").is_file()
    assert not (out / "table3.md").exists()
    table3 = pd.read_csv(out / "table3.csv").set_index("Finding")
    assert table3.loc["Effusion", "model_a"] == pytest.approx(roc_auc_score(y[:, 4], pd.read_csv(a / "predictions.csv")["Effusion"]))
    labels_from_entry = tmp_path / "Data_Entry_2017.csv"
    pd.DataFrame(
        {
            "Image Index": names,
            "Finding Labels": ["|".join(f for f, v in zip(FINDINGS, row) if v) or "No Finding" for row in y],
            "Patient ID": range(300),
        }
    ).to_csv(labels_from_entry, index=False)
    cmp, _ = evaluation.compare_runs([a, b], labels=labels_from_entry)
    assert cmp.auc[0, 4] == pytest.approx(table3.loc["Effusion", "model_a"])
    aligned = evaluation.load_runs([a, b], labels=labels_from_entry)
    assert aligned.names == names and list(aligned.probs) == ["model_a", "model_b"]
    np.testing.assert_array_equal(aligned.labels, y)
    np.testing.assert_array_equal(aligned.patients, np.arange(300))
    np.testing.assert_allclose(aligned.probs["model_b"][order], pd.read_csv(b / "predictions.csv").iloc[:, 1:].to_numpy())


def test_prediction_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    names = ["00000001_000.png", "00000002_000.png"]
    bad = tmp_path / "bad.csv"
    frame = pd.DataFrame(np.full((2, 14), 0.5), columns=list(FINDINGS))
    frame.insert(0, "Image Index", names)
    frame.loc[1, "Edema"] = 1.5
    frame.to_csv(bad, index=False)
    with pytest.raises(CxrdxError, match=r"bad.csv: line 3 \(00000002_000.png\)"):
        evaluation.read_predictions(bad)
    a = _write_run(tmp_path / "a", names, np.full((2, 14), 0.5), np.zeros((2, 14), np.uint8))
    b = _write_run(tmp_path / "b", names[:1], np.full((1, 14), 0.5))
    with pytest.raises(CxrdxError, match="not the same images"):
        evaluation.load_runs([a, b])
    with pytest.raises(CxrdxError, match="no labels"):
        evaluation.load_runs([b, b])
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def _store_thresholds(folder: Path, thresholds: np.ndarray) -> None:
    """metrics.json's per-finding thresholds, as `cxrdx evaluate --thresholds youden` leaves them."""
    per = {f: {"auroc": 0.7, "threshold": float(t)} for f, t in zip(FINDINGS, thresholds)}
    rundir.write_eval_metrics(folder, rundir.EvalMetrics(settings={"thresholds": "youden"}, per_finding=per))


def test_compare_uses_each_runs_own_thresholds(tmp_path: Path, capsys: pytest.CaptureFixture):
    rng = np.random.default_rng(1)
    names = [f"{i:08d}_000.png" for i in range(200)]
    y = (rng.random((200, 14)) < 0.3).astype(np.uint8)
    pa, pb, pc = (np.clip(s * y + (1 - s) * rng.random(y.shape), 0, 1) for s in (0.4, 0.2, 0.3))
    a, b, c = (_write_run(tmp_path / n, names, p, y) for n, p in (("a", pa), ("b", pb), ("c", pc)))
    ta, tb = np.linspace(0.2, 0.6, 14), np.linspace(0.7, 0.3, 14)
    _store_thresholds(a, ta)
    _store_thresholds(b, tb)
    accuracy = lambda p, t: ((p >= t) == y).mean(axis=0)  # noqa: E731

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both runs have thresholds: nothing to warn about
        cmp, _ = evaluation.compare_runs([a, b])
    for model, p, t in (("a", pa, ta), ("b", pb, tb)):
        per = cmp.evaluations[model].per_finding
        np.testing.assert_allclose(per["threshold"], t)
        np.testing.assert_allclose(per["accuracy"], accuracy(p, t))
    forced, _ = evaluation.compare_runs([a, b], threshold=0.45)
    for model, p in (("a", pa), ("b", pb)):
        np.testing.assert_allclose(forced.evaluations[model].per_finding["threshold"], 0.45)
        np.testing.assert_allclose(forced.evaluations[model].per_finding["accuracy"], accuracy(p, 0.45))

    (b / "metrics.json").write_text("{damaged")  # unusable and absent (c) both mean 0.5, with a note
    with pytest.warns(UserWarning, match="no thresholds in metrics.json for b, c: Table 4 uses 0.5"):
        mixed, _ = evaluation.compare_runs([a, b / "predictions.csv", c])
    np.testing.assert_allclose(mixed.evaluations["a"].per_finding["threshold"], ta)
    for model in ("b", "c"):
        np.testing.assert_allclose(mixed.evaluations[model].per_finding["threshold"], 0.5)

    out = tmp_path / "tables"
    assert main(["compare", str(a), str(c), "--out", str(out), "--format", "csv"]) == 0
    assert "cxrdx compare: note: no thresholds in metrics.json for c" in capsys.readouterr().err
    table4 = pd.read_csv(out / "table4.csv").set_index(["Metric", "Finding"])
    assert table4.loc[("Accuracy", "Mass"), "a"] == pytest.approx(accuracy(pa, ta)[FINDINGS.index("Mass")])
    assert main(["compare", str(a), str(c), "--threshold", "0.45", "--out", str(out), "--format", "csv"]) == 0
    assert "no thresholds" not in capsys.readouterr().err
    table4 = pd.read_csv(out / "table4.csv").set_index(["Metric", "Finding"])
    assert table4.loc[("Accuracy", "Mass"), "a"] == pytest.approx(accuracy(pa, 0.45)[FINDINGS.index("Mass")])


def test_missing_split_file_is_explained(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    lone = tmp_path / "lone.pt"
    shutil.copy(run_dir / "checkpoints" / "best.pt", lone)
    assert main(["evaluate", "--checkpoint", str(lone), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "split.csv: split file not found; pass --split-file FILE, or --split all" in err


def test_expert_labels_default_to_the_packaged_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    # bare --expert-labels: Google's 2019 labels shipped with cxrdx (no phantom has one, hence 0 images)
    args = ["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--out", str(tmp_path), "--quiet", "--expert-labels"]
    assert main(args) == 0
    expert = json.loads((tmp_path / "metrics.json").read_text())["expert_labels"]
    assert {finding: row["images"] for finding, row in expert.items()} == {"Pneumothorax": 0, "Nodule or mass": 0}
    assert "none of the evaluated images has an expert label" in capsys.readouterr().err
