"""`torchrun --nproc_per_node 2 -m cxrdx train` (gloo on the CPU) ends with the weights of one process
running the same global batch.

Deterministic set-up: timm's test_convnext (layer norm, no batch norm), no dropout, no augmentation.
Each rank sums the loss over its half batch; DDP averages the gradients and the engine scales the
summed loss by the world size, so both runs take the same steps. Only the order of floating-point
additions differs: the weights agree to 1e-5 (observed: about 1e-7).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrdx.checkpoint import load_checkpoint, load_train_state
from cxrdx.config import load_config, save_config

TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(cache: Path, out: Path):
    return load_config(
        None,
        [
            f"data.cache={cache}",
            f"out={out}",
            "data.input_size=32",
            "data.workers=0",
            "model.name=test_convnext",
            "model.drop_rate=0",
            "data.autoaugment=false",
            "data.hflip=false",
            "data.random_erasing=0",
            "optim.global_batch=32",
            "optim.epochs=1",
            "optim.lr=1e-3",
            "ema.decay=0.9",
            "loss.name=wbce",
            "runtime.channels_last=false",
        ],
    )


@pytest.fixture(scope="module")
def two_process_run(phantom_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    save_config(_config(phantom_cache, folder / "two"), folder / "two.yaml")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "cxrdx",
        "train",
        "--config",
        str(folder / "two.yaml"),
        "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines() == [str(folder / "two")]  # rank 0 alone prints the run dir
    return folder / "two"


def test_two_processes_match_one(two_process_run: Path, phantom_cache: Path, tmp_path: Path):
    from cxrdx.engine import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(_config(phantom_cache, tmp_path / "one"), progress=False)
    finally:
        torch.set_num_threads(before)
    a = load_checkpoint(one / "checkpoints" / "last.pt")
    b = load_checkpoint(two_process_run / "checkpoints" / "last.pt")
    state_a, state_b = (load_train_state(run / "checkpoints" / "train_state.pt") for run in (one, two_process_run))
    assert state_a["step"] == state_b["step"] == 5  # 168 training images, global batch 32
    assert state_b["world_size"] == 2 and len(state_b["rng"]) == 2
    for part in ("model", "ema"):
        for key, value in state_a[part].items():
            torch.testing.assert_close(state_b[part][key], value, atol=TOLERANCE, rtol=0, msg=f"{part}.{key}")
    # validation gathered over both ranks: the full validation split, not rank 0's half
    assert b.val_metrics["loss"] == pytest.approx(a.val_metrics["loss"], rel=1e-5)
    assert b.val_metrics["mean_auroc"] == pytest.approx(a.val_metrics["mean_auroc"], abs=1e-6)
    assert (two_process_run / "split.csv").read_text() == (one / "split.csv").read_text()


def test_paper_preset_on_four_processes(phantom_cache: Path, tmp_path: Path):
    """`torchrun --nproc_per_node 4 cxrdx train --config paper/resnet50_ours` as the README says, on the CPU:
    the preset unchanged but for the data (phantom cache, its size, a global batch that fits 168 images and
    does not divide by 4), no ImageNet weights (no network in tests), one epoch and one thread per process."""
    import yaml

    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "4",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "cxrdx",
        "train",
        "--config",
        "paper/resnet50_ours",
        "--quiet",
        "--set",
        f"data.cache={phantom_cache}",
        "--set",
        "data.input_size=32",
        "--set",
        "data.workers=0",
        "--set",
        "model.pretrained=none",
        "--set",
        "optim.epochs=1",
        "--set",
        "optim.global_batch=30",
        "--set",
        "runtime.threads=1",
        "--set",
        f"out={out}",
    ]
    import os

    import cxrdx

    source = str(Path(cxrdx.__file__).resolve().parents[1])  # this cxrdx, from another folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "4 process(es) x 8 or 7 images = global batch 30 per optimiser step; 168 training images: 5 steps per epoch" in result.stderr
    plan = yaml.safe_load((out / "config.yaml").read_text())["plan"]
    assert plan["batch_per_process"] == [8, 8, 7, 7] and plan["total_steps"] == 5 and plan["warnings"] == []
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best.model_name == "resnet50" and best.val_metrics["weights"] == "raw"  # the released code saved the raw model
    assert load_train_state(out / "checkpoints" / "train_state.pt")["world_size"] == 4
