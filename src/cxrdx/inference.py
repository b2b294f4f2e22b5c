"""Batch inference without training: a model over a loader → logits / probabilities in dataset order
(gathered over torchrun's ranks), the temperature-scaled sigmoid every prediction path uses, and the
validation AUROC."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import expit
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cxrdx.findings import FINDINGS
from cxrdx.ood import OodGuard, logits_and_features, score
from cxrdx.runtime import autocast, resolve_amp


def _is_channels_last(model: nn.Module) -> bool:
    return any(p.ndim == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters())


def _gathering() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def inference_sampler(dataset: Dataset) -> DistributedSampler | None:
    """This rank's shard of `dataset` for run_inference under DDP (in order; run_inference drops the
    padding when it gathers); None in a single process."""
    return DistributedSampler(dataset, shuffle=False) if _gathering() else None


def _local_indices(loader: DataLoader) -> list[int]:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return list(sampler)
    return list(range(_size(loader)))


class Collected(NamedTuple):
    """What `collect_logits` gathers for every sample, in dataset order."""

    logits: np.ndarray  # (N, K) float64
    targets: np.ndarray  # (N, K) float32: 1, 0, NaN = not labelled
    names: np.ndarray  # (N,) object
    ood_scores: np.ndarray | None  # (N,) the input guard's content-check score; None without a guard


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    hflip: bool = False,
    guard: OodGuard | None = None,
) -> Collected:
    """Logits, targets and names of every sample on every rank; with `guard`, also its content-check score,
    from the features of the same forward pass."""
    was_training = model.training
    model.eval()
    outputs, targets, names, scores = [], [], [], []
    channels_last = _is_channels_last(model)
    for images, labels, batch_names in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            if guard is None:
                out = model(images).float()
            else:
                out, features = logits_and_features(model, images)
                out = out.float()
                scores.append(score(guard, features.float().cpu().numpy()))
            if hflip:
                out = (out + model(torch.flip(images, dims=[-1])).float()) / 2
        outputs.append(out.cpu().double().numpy())
        targets.append(np.asarray(labels, dtype=np.float32))
        names.extend(batch_names)
    model.train(was_training)
    width = len(FINDINGS)
    out = np.concatenate(outputs) if outputs else np.zeros((0, width))
    tgt = np.concatenate(targets) if targets else np.zeros((0, width), dtype=np.float32)
    ood = (np.concatenate(scores) if scores else np.zeros(0)) if guard is not None else None
    if not _gathering():
        return Collected(out, tgt, np.asarray(names, dtype=object), ood)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (_local_indices(loader), out, tgt, names, ood))
    n = _size(loader)
    out_all, tgt_all, names_all = np.zeros((n, width)), np.zeros((n, width), dtype=np.float32), np.empty(n, dtype=object)
    ood_all = np.zeros(n) if guard is not None else None
    for indices, out, tgt, nm, part in gathered:  # DistributedSampler's padding repeats samples: same values
        out_all[indices], tgt_all[indices], names_all[indices] = out, tgt, nm
        if ood_all is not None:
            ood_all[indices] = part
    return Collected(out_all, tgt_all, names_all, ood_all)


def run_inference(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    amp: bool | str = True,
    hflip: bool = False,
    temperature: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities (N,14) float64, targets (N,14) float32 (NaN: not labelled) and image names, in dataset order, gathered
    over all ranks under DDP (DistributedSampler padding dropped). `amp`: autocast as resolve_amp
    decides (True = "auto": on CUDA only); `hflip`: average the logits of each image and its mirror;
    `temperature`: per-finding divisor of the logits before the sigmoid."""
    device = torch.device(device)
    logits, targets, names, _ = collect_logits(model, loader, device, resolve_amp("auto" if amp is True else amp, device), hflip)
    return probabilities(logits, temperature), targets, names.tolist()


def probabilities(logits: np.ndarray, temperature: Sequence[float] | None = None) -> np.ndarray:
    """Logits (..., K) → probabilities float64: the sigmoid of the logits divided by the per-finding
    `temperature` (a checkpoint's calibration) when there is one. Every prediction path goes through here."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature is not None:
        logits = logits / np.asarray(temperature, dtype=np.float64)
    return expit(logits)


def mean_auroc(probs: np.ndarray, targets: np.ndarray) -> tuple[float, list[float | None]]:
    """Mean AUROC over the findings with both classes among their labelled images, and the per-finding values (None: undefined)."""
    from sklearn.metrics import roc_auc_score

    per = []
    for j in range(targets.shape[1]):
        labelled = ~np.isnan(targets[:, j])
        column = targets[labelled, j]
        per.append(float(roc_auc_score(column, probs[labelled, j])) if 0 < column.sum() < len(column) else None)
    defined = [v for v in per if v is not None]
    return (float(np.mean(defined)) if defined else float("nan")), per


def _size(loader: DataLoader) -> int:
    """The number of samples of a loader's dataset (map-style datasets all have a length)."""
    return len(cast(Sized, loader.dataset))
