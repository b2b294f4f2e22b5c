"""The training engine on the 240-image phantom cache with timm's tiny test models at 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_config

from cxrdx.checkpoint import load_checkpoint, load_train_state
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine's 2 cores are shared: one intra-op thread avoids OpenMP spin-waits (4x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_epoch_run(phantom_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxrdx.engine import train

    out = tmp_path_factory.mktemp("engine") / "run"
    return train(tiny_config(phantom_cache, out, "optim.epochs=1"), progress=False)


def test_run_directory_contract(one_epoch_run: Path, phantom_cache: Path):
    from cxrdx.data.cache import open_cache, pixel_stats
    from cxrdx.data.splits import make_split, read_split
    from cxrdx.rundir import read_config

    run = one_epoch_run
    for name in (
        "config.yaml",
        "split.csv",
        "metrics.jsonl",
        "curves.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "checkpoints/train_state.pt",
    ):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.rglob("*.tmp"))

    cache = open_cache(phantom_cache)
    split = read_split(run / "split.csv")
    pd.testing.assert_series_equal(split, make_split(cache.index, strategy="patient", seed=0), check_names=False)
    config = read_config(run)  # mean / std resolved from the training split and recorded
    rows = np.flatnonzero(split.reindex(cache.index["Image Index"]).to_numpy() == "train")
    mean, std = pixel_stats(cache, rows=rows)
    np.testing.assert_allclose([config.data.mean[0], config.data.std[0]], [mean, std], rtol=1e-6)

    best = load_checkpoint(run / "checkpoints" / "best.pt")
    # the input guard, fitted at the end on the training split, threshold on validation
    assert best.guard is not None and (best.guard.train_images, best.guard.val_images) == (len(rows), 24)
    assert best.guard.val_acceptance >= 0.95 and load_checkpoint(run / "checkpoints" / "last.pt").guard.header() == best.guard.header()
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["epoch"] == 1 and row["step"] == 5 and row["best"] is True
    for key in ("train_loss", "raw_val_loss", "raw_val_mean_auroc", "ema_val_loss", "ema_val_mean_auroc", "lr", "images_per_s"):
        assert np.isfinite(row[key]), key
    # val_* are the selected weights' columns (here the EMA's); raw_* and ema_* name theirs
    assert row["weights"] == "ema" and row["val_loss"] == row["ema_val_loss"] and row["val_auroc"] == row["ema_val_auroc"]
    assert set(row["raw_val_auroc"]) == set(row["ema_val_auroc"]) == set(FINDINGS)
    assert row["raw_val_mean_auroc"] != row["ema_val_mean_auroc"]

    import yaml

    plan = yaml.safe_load((run / "config.yaml").read_text())["plan"]
    assert (plan["processes"], plan["batch_per_process"], plan["global_batch"]) == (1, [32], 32)
    assert (plan["train_images"], plan["steps_per_epoch"], plan["total_steps"]) == (168, 5, 5)
    assert plan["ema_horizon_steps"] == 10.0 and plan["ema_horizon_epochs"] == 2.0
    assert "the run has 5 optimiser steps" in plan["warnings"][0] and "--set ema.warmup=true" in plan["warnings"][0]
    assert best.val_metrics["warnings"] == plan["warnings"]

    last = load_checkpoint(run / "checkpoints" / "last.pt")
    state = load_train_state(run / "checkpoints" / "train_state.pt")
    assert last.epoch == state["epoch"] == 1 and state["step"] == 5
    assert (best.model_name, best.input_size, best.cache_size) == ("test_resnet", 32, 64)
    assert best.mean == config.data.mean and best.thresholds == [0.5] * 14 and best.findings == list(FINDINGS)
    assert best.model_kwargs == {"drop_rate": 0.5} and best.config["model"]["name"] == "test_resnet"
    assert best.val_metrics["weights"] == "ema" and best.val_metrics["loss"] == pytest.approx(row["ema_val_loss"])
    for key, value in state["ema"].items():  # the checkpoint holds the EMA weights
        assert torch.equal(best.state_dict[key], value) and torch.equal(last.state_dict[key], value), key
    assert set(state) >= {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "epoch", "step"}


def test_run_inference_reproduces_the_validation_auroc(one_epoch_run: Path):
    from cxrdx.data.cache import open_cache
    from cxrdx.data.dataset import CacheDataset, eval_transform, make_loader, rows_for_split
    from cxrdx.data.splits import read_split
    from cxrdx.inference import mean_auroc, run_inference

    best = load_checkpoint(one_epoch_run / "checkpoints" / "best.pt")
    cache = open_cache(best.config["data"]["cache"])
    rows = rows_for_split(cache, read_split(one_epoch_run / "split.csv"), "val")
    dataset = CacheDataset(cache, rows, eval_transform(best.input_size, best.mean, best.std))
    loader = make_loader(dataset, batch_size=7, shuffle=False, workers=0)
    model = best.build_model()
    probs, targets, names = run_inference(model, loader, "cpu")
    assert probs.dtype == np.float64 and probs.shape == (len(rows), 14) and targets.dtype == np.float32
    assert names == dataset.names and np.array_equal(targets, cache.labels[rows])
    assert mean_auroc(probs, targets)[0] == pytest.approx(best.val_metrics["mean_auroc"], abs=1e-6)

    flipped, _, _ = run_inference(model, loader, "cpu", hflip=True)
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        expected = torch.sigmoid((model(images) + model(torch.flip(images, dims=[-1]))) / 2).double().numpy()
    np.testing.assert_allclose(flipped, expected, atol=1e-6)


def test_resume_ends_with_the_same_weights(phantom_cache: Path, tmp_path: Path):
    from cxrdx.engine import train

    whole = train(tiny_config(phantom_cache, tmp_path / "whole"), progress=False)
    part = train(tiny_config(phantom_cache, tmp_path / "part"), stop_after_epoch=1, progress=False)
    assert load_train_state(part / "checkpoints" / "train_state.pt")["epoch"] == 1
    train(tiny_config(phantom_cache, tmp_path / "part"), resume=True, progress=False)

    a = load_train_state(whole / "checkpoints" / "train_state.pt")
    b = load_train_state(part / "checkpoints" / "train_state.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 10)
    for part_name in ("model", "ema"):
        for key, value in a[part_name].items():
            assert torch.equal(value, b[part_name][key]), f"{part_name}.{key}"  # bitwise
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])

    def losses(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["ema_val_loss"]) for r in rows]

    assert losses(whole) == losses(part)


def test_early_stopping(phantom_cache: Path, tmp_path: Path):
    from cxrdx.engine import train

    # lr 0 and no batch norm: the model never changes, so validation never improves after the first epoch
    run = train(
        tiny_config(
            phantom_cache,
            tmp_path / "run",
            "model.name=test_convnext",
            "optim.lr=0",
            "optim.epochs=5",
            "selection.patience=1",
            "selection.monitor=mean_auroc",
            "ema.enabled=false",
            "selection.weights=raw",
        ),
        progress=False,
    )
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[0])["best"] and not json.loads(rows[1])["best"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best.epoch == 1 and best.val_metrics["weights"] == "raw"


def test_user_errors(phantom_cache: Path, phantom_split: Path, one_epoch_run: Path, tmp_path: Path):
    from cxrdx.engine import train

    with pytest.raises(CxrdxError, match="cache not found; make it with `cxrdx prepare"):
        train(tiny_config(tmp_path / "nocache", tmp_path / "a"), progress=False)
    with pytest.raises(CxrdxError, match="unknown model 'resnet5O'"):
        train(tiny_config(phantom_cache, tmp_path / "b", "model.name=resnet5O"), progress=False)
    with pytest.raises(CxrdxError, match="already holds a run; continue it with --resume"):
        train(tiny_config(phantom_cache, one_epoch_run), progress=False)
    with pytest.raises(CxrdxError, match="nothing to resume"):
        train(tiny_config(phantom_cache, tmp_path / "c"), resume=True, progress=False)

    from cxrdx.data.cache import open_cache

    split = pd.read_csv(phantom_split)  # move every Hernia image out of train
    index = open_cache(phantom_cache).index
    hernia = set(index.loc[index["Hernia"] == 1, "Image Index"])
    split.loc[split["Image Index"].isin(hernia), "split"] = "test"
    split.to_csv(tmp_path / "no_hernia.csv", index=False)
    with pytest.raises(CxrdxError, match=r"no_hernia.csv, loss 'wbce': no positive training image for Hernia"):
        train(tiny_config(phantom_cache, tmp_path / "d", f"data.split_file={tmp_path / 'no_hernia.csv'}", "loss.name=wbce"), progress=False)


def test_out_of_memory_names_the_settings(phantom_cache: Path, tmp_path: Path, monkeypatch):
    import timm.models.resnet

    from cxrdx.engine import train

    def exhausted(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(timm.models.resnet.ResNet, "forward", exhausted)
    with pytest.raises(CxrdxError, match=r"out of memory at 32 images of 32px .*lower optim.global_batch .*or data.input_size"):
        train(tiny_config(phantom_cache, tmp_path / "oom"), progress=False)


def test_resolve_device_and_amp():
    from cxrdx.runtime import resolve_amp, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CxrdxError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CxrdxError, match="no CUDA device"):
            resolve_device("cuda:1")
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(CxrdxError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)


@pytest.mark.parametrize("reduction, sum_over", [("mean", None), ("sum", None), ("sum", 150)])
def test_uneven_shares_average_to_the_global_batch(reduction, sum_over):
    """DDP averages the processes' gradients; with the loss scale each process applies, that average is the
    global batch's mean (mean-reduced), its sum, or the mean image gradient x loss.sum_over_images."""
    from cxrdx.engine import Plan, _loss_scale, spread
    from cxrdx.losses import create_loss

    plan = Plan(processes=4, per_process=spread(130, 4), train_images=1000, epochs=1, ema_decay=None)
    assert plan.per_process == (33, 33, 32, 32)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(130, len(FINDINGS), generator=generator)
    targets = (torch.rand(130, len(FINDINGS), generator=generator) < 0.2).float()
    criterion = create_loss("bce", np.full(14, 20), np.full(14, 100), reduction=reduction)
    parts = np.cumsum((0, *plan.per_process))
    averaged = (
        sum(
            _loss_scale(criterion, plan, rank, sum_over) * criterion(logits[a:b], targets[a:b])
            for rank, (a, b) in enumerate(zip(parts[:-1], parts[1:]))
        )
        / plan.processes
    )
    whole = criterion(logits, targets)
    expected = whole * sum_over / 130 if sum_over else whole
    torch.testing.assert_close(averaged, expected)
