"""cxrdx.rundir: the run and evaluation folders' files, one typed reader and writer each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdx import rundir
from cxrdx.config import config_from_dict
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS


def test_config_round_trip_and_errors(tmp_path: Path):
    config = config_from_dict({"model": {"name": "resnet18"}, "data": {"input_size": 64}, "seed": 3})
    assert rundir.write_config(tmp_path, config) == tmp_path / "config.yaml"
    assert rundir.read_config(tmp_path) == config
    with pytest.raises(CxrdxError, match="not a run directory"):
        rundir.read_config(tmp_path / "nowhere")
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(CxrdxError, match="config.yaml: not readable YAML"):
        rundir.read_config(tmp_path)
    (tmp_path / "config.yaml").write_text("modle: {}\n")
    with pytest.raises(CxrdxError, match="config.yaml: unknown config key 'modle'"):
        rundir.read_config(tmp_path)


def test_epoch_rows_keep_unknown_columns(tmp_path: Path):
    assert rundir.read_epochs(tmp_path) == []
    written = {
        "epoch": 1,
        "step": 5,
        "lr": 1e-3,
        "train_loss": 0.7,
        "weights": "raw",
        "val_loss": 0.6,
        "val_mean_auroc": 0.55,
        "val_auroc": {"Mass": 0.5},
        "raw_val_loss": 0.6,
        "raw_val_mean_auroc": 0.55,
        "raw_val_auroc": {"Mass": 0.5},
        "ema_val_loss": None,
        "ema_val_mean_auroc": None,
        "ema_val_auroc": None,
        "best": True,
        "images_per_s": 80.0,
        "seconds": 2.5,
        "grad_norm": 1.25,
    }  # the last: a column a newer version writes
    # the second row as earlier versions wrote it: no `weights`, val_* of the raw weights, selection on EMA
    rows = [rundir.EpochRow.from_dict(written), rundir.EpochRow(2, val_mean_auroc=0.6, ema_val_mean_auroc=0.65)]
    rundir.write_epochs(tmp_path, rows)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == written  # same keys, same order, nothing lost
    read = rundir.read_epochs(tmp_path)
    assert read == rows and read[0].extra == {"grad_norm": 1.25}
    assert read[0].selected_auroc == 0.55 and read[1].selected_auroc == 0.65
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(CxrdxError, match="metrics.jsonl: not JSON lines"):
        rundir.read_epochs(tmp_path)


def test_eval_metrics_round_trip_and_thresholds(tmp_path: Path):
    assert rundir.read_eval_metrics(tmp_path) == rundir.EvalMetrics()  # none: empty, no thresholds
    assert rundir.read_eval_metrics(tmp_path).thresholds is None
    per = {f: {"auroc": 0.7, "threshold": 0.1 + 0.05 * k} for k, f in enumerate(FINDINGS)}
    result = rundir.EvalMetrics(
        settings={"split": "test"}, overall={"auroc": {"mean": 0.7}}, per_finding=per, notes=["n"], extra={"future": 1}
    )
    rundir.write_eval_metrics(tmp_path, result)
    assert rundir.read_eval_metrics(tmp_path) == result
    np.testing.assert_allclose(result.thresholds, [0.1 + 0.05 * k for k in range(len(FINDINGS))])
    per["Mass"]["threshold"] = 1.5
    assert rundir.EvalMetrics(per_finding=per).thresholds is None  # out of [0, 1]: unusable
    (tmp_path / "metrics.json").write_text("{damaged")
    assert rundir.read_eval_metrics(tmp_path) == rundir.EvalMetrics()
    damaged = rundir.EvalMetrics.from_dict({"overall": None, "per_finding": [], "notes": "x", "expert_labels": [1]})
    assert damaged == rundir.EvalMetrics()


def test_predictions_and_labels_round_trip(tmp_path: Path):
    names = ["a.png", "b.png"]
    probs = np.array([[0.1] * len(FINDINGS), [1 / 3] * len(FINDINGS)])
    labels = np.eye(2, len(FINDINGS), dtype=np.uint8)
    rundir.write_predictions(tmp_path / rundir.PREDICTIONS, names, probs)
    rundir.write_labels(tmp_path / rundir.LABELS, names, labels, np.array([7, 8]))
    np.testing.assert_array_equal(rundir.read_predictions(tmp_path / rundir.PREDICTIONS).loc[names].to_numpy(), probs)
    truth = rundir.read_labels(tmp_path / rundir.LABELS)
    assert truth["Patient ID"].tolist() == [7, 8] and truth[list(FINDINGS)].to_numpy().tolist() == labels.tolist()


def test_explanations_and_localization(tmp_path: Path):
    panel = tmp_path / "Mass" / "a.groupcam.png"
    panel.parent.mkdir()
    panel.write_bytes(b"png")
    found = rundir.read_explanations(tmp_path)  # no explanations.csv: the panels on disk, probability unknown
    assert found[["Image Index", "Finding", "png"]].values.tolist() == [["a", "Mass", str(panel)]] and found["probability"].isna().all()
    table = pd.DataFrame([["a.png", "Mass", 0.8, False, str(panel), "", ""]], columns=rundir.EXPLANATION_COLUMNS)
    rundir.write_explanations(tmp_path, table)
    assert rundir.read_explanations(tmp_path)["probability"].tolist() == [0.8]

    summary = pd.DataFrame(
        {
            "method": ["groupcam", "groupcam"],
            "Finding": ["Mass", "all"],
            "n": [2, 2],
            "pointing_game": [0.5, 0.5],
            "iou": [0.2, 0.2],
            "flat": [0, 0],
        }
    )
    rundir.write_localization(tmp_path, summary, {"split": "test", "threshold": 0.4, "tolerance": 2, "images": 2, "boxes": "b.csv"})
    result = rundir.read_localization(tmp_path)
    assert (result.threshold, result.threshold_mode, result.tolerance, result.images, result.split) == (0.4, "relative", 2, 2, "test")
    assert result.settings == {"boxes": "b.csv"} and result.pointing_game() == {"groupcam": 0.5}
    pd.testing.assert_frame_equal(result.summary, summary)
    (tmp_path / rundir.LOCALIZATION).write_text("{not json")
    with pytest.raises(CxrdxError, match="localization.json: not readable"):
        rundir.read_localization(tmp_path)


def test_paths():
    run = Path("runs/a")
    assert rundir.best_checkpoint(run) == run / "checkpoints" / "best.pt" and rundir.run_dir_of(rundir.best_checkpoint(run)) == run
    assert rundir.run_dir_of("elsewhere/model.pt") == Path("elsewhere")
    assert rundir.last_checkpoint(run).name == "last.pt" and rundir.split_path(run).name == "split.csv"
