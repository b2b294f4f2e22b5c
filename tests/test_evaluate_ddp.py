"""`torchrun --nproc_per_node 2 -m cxrdx evaluate` (gloo on the CPU) writes what one process writes.

The test split has 25 images: DistributedSampler pads rank 1's interleaved shard with a repeat of
image 0, which the gather must drop, and the batch size 4 makes each rank run several batches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import run_checkpoint

from cxrdx.cli import main
from cxrdx.findings import FINDINGS

TEST_IMAGES = 25
FILES = {
    "predictions.csv",
    "labels.csv",
    "metrics.json",
    "report.md",
    "roc.png",
    "reliability.png",
    *(f"{table}.{fmt}" for table in ("subgroups", "subgroup_gaps") for fmt in ("md", "csv", "json")),
}  # phantoms have sex, age, view


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(phantom_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/checkpoints/best.pt of an untrained tiny model, with a split whose test part is odd-sized."""
    from cxrdx.data.cache import open_cache
    from cxrdx.data.splits import write_split

    run = tmp_path_factory.mktemp("run")
    names = open_cache(phantom_cache).index["Image Index"]
    write_split(pd.Series(np.where(np.arange(len(names)) < TEST_IMAGES, "test", "train"), index=names.to_numpy()), run / "split.csv")
    return run_checkpoint(run, phantom_cache)


def test_two_processes_write_what_one_writes(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--batch-size", "4", "--device", "cpu", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(one)]) == 0
    printed = capsys.readouterr().out.splitlines()

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
        *args,
        "--out",
        str(two),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines() == [printed[0], printed[1].replace(str(one), str(two))]  # rank 0 alone prints
    assert {p.name for p in two.iterdir()} == FILES  # no second set, no stray temporary files

    a, b = pd.read_csv(one / "predictions.csv"), pd.read_csv(two / "predictions.csv")
    assert len(b) == TEST_IMAGES and not b["Image Index"].duplicated().any()
    assert b["Image Index"].tolist() == a["Image Index"].tolist()
    np.testing.assert_allclose(b[list(FINDINGS)].to_numpy(), a[list(FINDINGS)].to_numpy(), rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(two / "labels.csv"), pd.read_csv(one / "labels.csv"))
    assert json.loads((two / "metrics.json").read_text())["settings"]["images"] == TEST_IMAGES
