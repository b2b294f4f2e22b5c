"""Where and how the code runs: device choice, autocast precision, torchrun's process group and its exit.

Training (`cxrdx.engine`) and inference (`cxrdx.inference`, `cxrdx.predict`, `cxrdx.evaluation`) share it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cxrdx.errors import CxrdxError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU; `cuda:N` is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CxrdxError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CxrdxError(f"device {name!r}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CxrdxError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_amp(setting: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an amp setting, or None for full precision."""
    if setting is False or setting == "off":
        return None
    if device.type != "cuda":
        # bf16 autocast is slower than fp32 on most CPUs; only an explicit "bf16" turns it on.
        if setting == "fp16":
            raise CxrdxError("runtime.amp=fp16 needs a CUDA device; use bf16 or off on the CPU")
        return torch.bfloat16 if setting == "bf16" else None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` for the block; no change for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _init_distributed(device_name: str) -> tuple[Dist, torch.device, bool]:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; returns (dist info, device, whether we created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda" and info.enabled:  # one GPU per process, even when a fixed index was asked for
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        created = True
    return info, device, created


@contextlib.contextmanager
def distributed(device_name: str = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """torchrun's process group for the block (gloo on the CPU, NCCL on CUDA, device per LOCAL_RANK):
    created when absent and torn down on leaving (after a barrier when the block succeeded). One process:
    Dist() and its device."""
    info, device, created = _init_distributed(device_name)
    try:
        yield info, device
        if created:
            dist.barrier()  # only on success: a failed rank must exit, not wait for peers stuck in a collective
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def leave_torchrun_worker() -> None:
    """Under torchrun, end this process now with status 0 once its work succeeded: gloo workers can abort
    in interpreter teardown after a successful run. A single process returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
