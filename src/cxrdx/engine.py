"""The training loop: single process or torchrun DDP, AMP, EMA, OneCycle, exact resume, run directory."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import expit
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cxrdx.atomic import atomic_path, write_text
from cxrdx.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cxrdx.config import TrainConfig, config_from_dict, save_config
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

# --- devices, precision, processes ---------------------------------------------------------------


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


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
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


def _is_channels_last(model: nn.Module) -> bool:
    return any(p.ndim == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- data ----------------------------------------------------------------------------------------


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class _EpochSampler(Sampler):
    """Yields (epoch, index) so each sample's augmentation is seeded by (seed, epoch, index):
    identical for any number of workers or ranks, and after a resume."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _SeededDataset(Dataset):
    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))  # CPU only: cheap
            return self.dataset[index]


@dataclass
class _Data:
    cache: Any
    split: Any  # pd.Series: Image Index -> train / val / test
    source: str  # where the split came from, for messages
    train_rows: np.ndarray
    val_rows: np.ndarray
    mean: list[float]
    std: list[float]


def _open_data(config: TrainConfig, split_path: Path | None) -> _Data:
    from cxrdx.data.cache import open_caches, pixel_stats
    from cxrdx.data.dataset import rows_for_split
    from cxrdx.data.splits import make_split, read_split

    cache_paths = [Path(p) for p in (config.data.caches or [config.data.cache])]
    for cache_path in cache_paths:
        if not cache_path.exists():
            raise CxrdxError(f"{cache_path}: cache not found; make it with `cxrdx prepare --data-dir DATA_DIR --out {cache_path}`")
    cache = open_caches(cache_paths)
    if split_path is not None:
        split = read_split(split_path)
    else:
        split = make_split(cache.index, strategy="patient", seed=config.seed)
    train_rows = np.asarray(rows_for_split(cache, split, "train"))
    val_rows = np.asarray(rows_for_split(cache, split, "val"))
    if config.data.mean is None or config.data.std is None:
        mean, std = pixel_stats(cache, rows=train_rows)
    else:
        mean, std = config.data.mean, config.data.std
    as_list = lambda v: [float(x) for x in np.atleast_1d(np.asarray(v, dtype=np.float64))]  # noqa: E731
    source = str(split_path) if split_path else f"the patient split (seed {config.seed})"
    return _Data(cache, split, source, train_rows, val_rows, as_list(mean), as_list(std))


def _loaders(config: TrainConfig, data: _Data, info: Dist, device: torch.device) -> tuple[DataLoader, DataLoader, _EpochSampler]:
    from cxrdx.data.dataset import CacheDataset, eval_transform, make_loader, train_transform

    cfg = config.data
    pin = device.type == "cuda"
    size = cfg.input_size
    train_set = CacheDataset(
        data.cache,
        data.train_rows,
        train_transform(size, data.mean, data.std, autoaugment=cfg.autoaugment, hflip=cfg.hflip, random_erasing=cfg.random_erasing),
    )
    val_set = CacheDataset(data.cache, data.val_rows, eval_transform(size, data.mean, data.std))
    per_rank = config.optim.batch_size // info.world_size
    sampler = _EpochSampler(DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=config.seed))
    train_loader = make_loader(
        _SeededDataset(train_set, config.seed), per_rank, shuffle=False, workers=cfg.workers,
        sampler=sampler, drop_last=len(sampler) >= per_rank, pin_memory=pin,
    )
    # The loader's own generator: creating its iterator must not consume the global RNG (exact resume).
    train_loader.generator = torch.Generator().manual_seed(config.seed)
    val_sampler = DistributedSampler(val_set, info.world_size, info.rank, shuffle=False) if info.enabled else None
    val_loader = make_loader(val_set, per_rank, shuffle=False, workers=cfg.workers, sampler=val_sampler, pin_memory=pin)
    return train_loader, val_loader, sampler


# --- inference -----------------------------------------------------------------------------------


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
    return list(range(len(loader.dataset)))


@torch.no_grad()
def _logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None, hflip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits (float64), targets (float32: 1, 0, NaN = not labelled) and names of every sample, in dataset order, on every rank."""
    was_training = model.training
    model.eval()
    outputs, targets, names = [], [], []
    channels_last = _is_channels_last(model)
    for images, labels, batch_names in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            out = model(images).float()
            if hflip:
                out = (out + model(torch.flip(images, dims=[-1])).float()) / 2
        outputs.append(out.cpu().double().numpy())
        targets.append(np.asarray(labels, dtype=np.float32))
        names.extend(batch_names)
    model.train(was_training)
    width = len(FINDINGS)
    out = np.concatenate(outputs) if outputs else np.zeros((0, width))
    tgt = np.concatenate(targets) if targets else np.zeros((0, width), dtype=np.float32)
    if not _gathering():
        return out, tgt, np.asarray(names, dtype=object)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (_local_indices(loader), out, tgt, names))
    n = len(loader.dataset)
    out_all, tgt_all, names_all = np.zeros((n, width)), np.zeros((n, width), dtype=np.float32), np.empty(n, dtype=object)
    for indices, out, tgt, nm in gathered:  # DistributedSampler's padding repeats samples: same values
        out_all[indices], tgt_all[indices], names_all[indices] = out, tgt, nm
    return out_all, tgt_all, names_all


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
    logits, targets, names = _logits(model, loader, device, resolve_amp("auto" if amp is True else amp, device), hflip)
    if temperature is not None:
        logits = logits / np.asarray(temperature, dtype=np.float64)
    return expit(logits), targets, names.tolist()


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


# --- model, optimiser, schedule ------------------------------------------------------------------


def _build_model(config: TrainConfig, device: torch.device, info: Dist) -> nn.Module:
    from cxrdx.models import create_model

    cfg = config.model
    try:
        model = create_model(cfg.name, pretrained=cfg.pretrained, num_findings=len(FINDINGS), drop_rate=cfg.drop_rate, **cfg.kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise CxrdxError(f"model.name={cfg.name!r}: cannot create it ({exc})") from None
    if config.runtime.sync_bn and info.enabled:
        if device.type != "cuda":
            raise CxrdxError("runtime.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm); set it false on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    cfg = config.optim
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    cfg = config.optim
    if not 0 < cfg.pct_start < 1:
        raise CxrdxError(f"optim.pct_start={cfg.pct_start}: the warm-up fraction must be between 0 and 1")
    # OneCycleLR needs more than one warm-up step; only tiny test runs are stretched by this
    total = max(cfg.epochs * steps_per_epoch, math.floor(1 / cfg.pct_start) + 1)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total, pct_start=cfg.pct_start,
        anneal_strategy="cos", div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
    )


def _criterion(config: TrainConfig, data: _Data, device: torch.device) -> nn.Module:
    from cxrdx.losses import create_loss, label_counts

    positives, negatives = label_counts(data.cache.labels[data.train_rows])
    try:
        return create_loss(config.loss.name, positives, negatives, **config.loss.hyper).to(device)
    except CxrdxError as exc:  # e.g. a finding without positive training images: name the split
        raise CxrdxError(f"{data.source}, loss {config.loss.name!r}: {exc}") from None


def _loss_scale(criterion: nn.Module, world_size: int) -> float:
    # DDP averages gradients over ranks: a loss summed over the batch must be scaled back to the global sum.
    return float(world_size) if getattr(criterion, "reduction", "mean") == "sum" else 1.0


def _per_image(total: float, count: int, criterion: nn.Module) -> float:
    """A reported loss comparable across batch sizes: sum-reduced losses are divided by the image count."""
    return total / max(count, 1) if getattr(criterion, "reduction", "mean") == "sum" else total


# --- state ---------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_rng_states(device: torch.device, info: Dist) -> list[dict[str, Any]]:
    state = _rng_state(device)
    if not info.enabled:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _better(value: float, best: float | None, monitor: str) -> bool:
    """The first epoch always counts, so best.pt exists; a NaN never replaces a number."""
    if best is None or math.isnan(best):
        return True
    if math.isnan(value):
        return False
    return value < best if monitor == "val_loss" else value > best


# --- logging -------------------------------------------------------------------------------------


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """Loss and mean-AUROC curves per epoch, raw and EMA weights (matplotlib without pyplot: no GUI backend)."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_auc = fig.subplots(1, 2)
    for ax, series in (
        (ax_loss, (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)"))),
        (ax_auc, (("val_mean_auroc", "val"), ("ema_val_mean_auroc", "val (EMA)"))),
    ):
        for key, label in series:
            if any(r.get(key) is not None for r in rows):
                ax.plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set(xlabel="epoch", ylabel="loss per image", title="Loss")
    ax_auc.set(xlabel="epoch", ylabel="mean AUROC", title="Validation mean AUROC")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


# --- training ------------------------------------------------------------------------------------


@dataclass
class _State:
    epoch: int = 0  # epochs completed
    step: int = 0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0


@dataclass
class Run:
    """Everything one process trains with; `train` builds it and loops over epochs."""

    config: TrainConfig
    run_dir: Path
    info: Dist
    device: torch.device
    amp: torch.dtype | None
    data: _Data
    model: nn.Module  # what the step calls: DDP- and compile-wrapped when asked
    ema: Any  # timm ModelEmaV3, or None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: _EpochSampler
    state: _State

    @property
    def weights(self) -> nn.Module:
        """The weights that are validated for selection and saved: EMA when on, else the raw model."""
        return self.ema.module if self.ema is not None else _unwrap(self.model)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a (per-rank) batch: forward, backward, clip, optimizer, schedule, EMA."""
        config = self.config
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True).float()
        if config.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            with _autocast(self.device, self.amp):
                logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
            self.scaler.scale(loss * _loss_scale(self.criterion, self.info.world_size)).backward()
            if config.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            raise CxrdxError(
                f"out of memory at {images.shape[0]} images of {config.data.input_size}px per process "
                f"({config.model.name}); lower optim.batch_size or data.input_size, or set runtime.amp=auto on a GPU"
            ) from None
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(_unwrap(self.model), step=self.state.step)
        return loss.detach()


def _train_epoch(run: Run, progress: bool) -> tuple[float, float]:
    """One pass over the training split; returns (loss per image averaged over all ranks, images/s)."""
    from tqdm import tqdm

    info, criterion = run.info, run.criterion
    run.model.train()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss sum, batch count
    seen, start = 0, time.perf_counter()
    bar = tqdm(run.train_loader, desc=f"epoch {run.state.epoch + 1}/{run.config.optim.epochs}",
               disable=not (progress and info.main), file=sys.stderr, leave=False, dynamic_ncols=True)
    for images, targets, _ in bar:
        loss = run.step(images, targets)
        total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=run.device)])
        batch = images.shape[0]
        seen += batch * info.world_size
        if info.main and progress and (run.state.step % 5 == 0 or seen == batch * info.world_size):
            value = loss.item()
            _check_finite(value, f"at step {run.state.step}")
            bar.set_postfix(loss=f"{_per_image(value, batch, criterion):.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                            img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    if info.enabled:
        dist.all_reduce(total)
    loss_sum, batches = total.tolist()
    _check_finite(loss_sum, f"in epoch {run.state.epoch + 1}")  # every rank, with or without a progress bar
    mean_loss = _per_image(loss_sum / max(batches, 1), run.config.optim.batch_size // info.world_size, criterion)
    return mean_loss, seen / max(time.perf_counter() - start, 1e-9)


def _check_finite(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise CxrdxError(f"the training loss became {loss} {where}; lower optim.lr or set runtime.amp=off")


def _validate(run: Run, model: nn.Module) -> dict[str, Any]:
    logits, targets, _ = _logits(model, run.val_loader, run.device, run.amp)
    with torch.no_grad():
        loss = run.criterion(torch.as_tensor(logits, dtype=torch.float32, device=run.device),
                             torch.as_tensor(targets, dtype=torch.float32, device=run.device)).item()
    auroc, per = mean_auroc(expit(logits), targets)
    return {"loss": _per_image(loss, len(targets), run.criterion), "mean_auroc": auroc, "auroc": dict(zip(FINDINGS, per))}


def _checkpoint(run: Run, metrics: dict[str, Any], train_state: dict[str, Any] | None = None) -> Checkpoint:
    config = run.config
    return Checkpoint(
        model_name=config.model.name,
        state_dict={k: v.detach().cpu().clone() for k, v in run.weights.state_dict().items()},
        input_size=config.data.input_size,
        mean=run.data.mean,
        std=run.data.std,
        cache_size=int(run.data.cache.size),
        model_kwargs={"drop_rate": config.model.drop_rate, **config.model.kwargs},
        config=config.to_dict(),
        val_metrics=metrics,
        epoch=run.state.epoch,
        train_state=train_state,
    )


def _train_state(run: Run, rng: list[dict[str, Any]]) -> dict[str, Any]:
    state = run.state
    return {
        "model": _unwrap(run.model).state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng,  # one entry per rank
        "epoch": state.epoch,
        "step": state.step,
        "best": state.best,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "world_size": run.info.world_size,
    }


def _restore(run: Run, train_state: dict[str, Any]) -> None:
    _unwrap(run.model).load_state_dict(train_state["model"])
    if run.ema is not None and train_state.get("ema") is not None:
        run.ema.module.load_state_dict(train_state["ema"])
    run.optimizer.load_state_dict(train_state["optimizer"])
    run.scheduler.load_state_dict(train_state["scheduler"])
    run.scaler.load_state_dict(train_state["scaler"])
    rng = train_state["rng"]
    if len(rng) == run.info.world_size:
        _set_rng_state(rng[run.info.rank], run.device)
    else:  # a different number of processes: the run continues, without bitwise equality
        _seed_everything(run.config.seed + run.info.rank + 1000 * train_state["epoch"])
    run.state = _State(train_state["epoch"], train_state["step"], train_state["best"], train_state["best_epoch"],
                       train_state["bad_epochs"])


def _prepare_run_dir(config: TrainConfig, resume: bool, info: Dist) -> Path:
    run_dir = Path(config.out)
    last = run_dir / "checkpoints" / "last.pt"
    if resume and not last.is_file():
        raise CxrdxError(f"{run_dir}: nothing to resume (no checkpoints/last.pt)")
    if not resume and last.is_file():
        raise CxrdxError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} or choose --set out=OTHER_DIR")
    if info.main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was trained with (RUN/config.yaml)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CxrdxError(f"{run_dir}: not a run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def setup_run(config: TrainConfig, resume: bool = False, info: Dist | None = None, device: torch.device | None = None) -> Run:
    """Open the data, write RUN/split.csv and RUN/config.yaml (rank 0), build model, EMA, optimizer,
    schedule and loaders; with `resume`, restore RUN/checkpoints/last.pt."""
    info = info or Dist()
    device = device or resolve_device(config.runtime.device)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    if config.optim.batch_size % info.world_size:
        raise CxrdxError(f"optim.batch_size={config.optim.batch_size} is not divisible by the {info.world_size} processes")
    run_dir = _prepare_run_dir(config, resume, info)
    split_path = run_dir / "split.csv" if resume else (Path(config.data.split_file) if config.data.split_file else None)
    data = _open_data(config, split_path)
    if not resume:
        config.data.mean, config.data.std = data.mean, data.std
    if info.main and not resume:
        from cxrdx.data.splits import write_split

        write_split(data.split, run_dir / "split.csv")
        save_config(config, run_dir / "config.yaml")

    criterion = _criterion(config, data, device)
    _seed_everything(config.seed)  # identical initial weights on every rank
    model = _build_model(config, device, info)
    _seed_everything(config.seed + info.rank)  # per-rank dropout
    train_loader, val_loader, sampler = _loaders(config, data, info, device)
    if len(train_loader) == 0:
        raise CxrdxError(f"the training split ({len(data.train_rows)} images) is smaller than one batch")
    amp = resolve_amp(config.runtime.amp, device)
    wrapped: nn.Module = model
    if info.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = None
    if config.ema.enabled:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema.decay, use_warmup=config.ema.warmup)
    if config.runtime.compile:
        wrapped = torch.compile(wrapped)
    optimizer = _optimizer(config, model)
    run = Run(
        config=config, run_dir=run_dir, info=info, device=device, amp=amp, data=data, model=wrapped, ema=ema,
        criterion=criterion, optimizer=optimizer, scheduler=_scheduler(config, optimizer, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16), train_loader=train_loader,
        val_loader=val_loader, sampler=sampler, state=_State(),
    )
    if resume:
        _restore(run, load_checkpoint(run_dir / "checkpoints" / "last.pt").train_state)
    return run


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None, progress: bool = True) -> Path:
    """Train per `config` into the run directory `config.out` and return it. Under torchrun every
    process calls this; rank 0 writes. `resume` continues RUN/checkpoints/last.pt exactly;
    `stop_after_epoch` ends after that many epochs (the schedule still spans optim.epochs)."""
    config = copy.deepcopy(config)
    with distributed(config.runtime.device) as (info, device):
        run = setup_run(config, resume, info, device)
        _fit(run, stop_after_epoch, progress)
        return run.run_dir


def _fit(run: Run, stop_after_epoch: int | None, progress: bool) -> None:
    config, info, state = run.config, run.info, run.state
    metrics_path = run.run_dir / "metrics.jsonl"
    history = [r for r in _read_metrics(metrics_path) if r["epoch"] <= state.epoch]
    writer = _tensorboard(run.run_dir) if info.main else None
    last_epoch = config.optim.epochs if stop_after_epoch is None else min(stop_after_epoch, config.optim.epochs)
    monitor = config.selection.monitor
    while state.epoch < last_epoch:
        run.sampler.set_epoch(state.epoch)
        start = time.perf_counter()
        train_loss, images_per_s = _train_epoch(run, progress)
        raw = _validate(run, _unwrap(run.model))
        ema_metrics = _validate(run, run.ema.module) if run.ema is not None else None
        selected = ema_metrics or raw
        value = selected["loss"] if monitor == "val_loss" else selected["mean_auroc"]
        improved = _better(value, state.best, monitor)
        state.epoch += 1
        if improved:
            state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        else:
            state.bad_epochs += 1
        row = {
            "epoch": state.epoch, "step": state.step, "lr": run.scheduler.get_last_lr()[0],
            "train_loss": train_loss, "val_loss": raw["loss"], "val_mean_auroc": raw["mean_auroc"],
            "ema_val_loss": ema_metrics["loss"] if ema_metrics else None,
            "ema_val_mean_auroc": ema_metrics["mean_auroc"] if ema_metrics else None,
            "val_auroc": selected["auroc"], "best": improved, "images_per_s": images_per_s,
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        rng = _all_rng_states(run.device, info)  # every rank takes part in the gather
        if info.main:
            metrics = {"loss": selected["loss"], "mean_auroc": selected["mean_auroc"], "auroc": selected["auroc"],
                       "weights": "ema" if run.ema is not None else "raw"}
            if improved:
                save_checkpoint(run.run_dir / "checkpoints" / "best.pt", _checkpoint(run, metrics))
            _write_metrics(metrics_path, history)
            save_checkpoint(run.run_dir / "checkpoints" / "last.pt", _checkpoint(run, metrics, _train_state(run, rng)))
            plot_curves(history, run.run_dir / "curves.png")
            if writer is not None:
                for key in ("train_loss", "val_loss", "val_mean_auroc", "ema_val_loss", "ema_val_mean_auroc", "lr"):
                    if row[key] is not None:
                        writer.add_scalar(key, row[key], state.epoch)
            if progress:
                print(_summary(row), file=sys.stderr, flush=True)
        if config.selection.patience is not None and state.bad_epochs >= config.selection.patience:
            if info.main and progress:
                print(f"early stop: no {monitor} improvement for {state.bad_epochs} epochs", file=sys.stderr)
            break
    if writer is not None:
        writer.close()
    if info.enabled:
        dist.barrier()


def _summary(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}", f"val_loss {row['val_loss']:.4f}",
             f"val_auroc {row['val_mean_auroc']:.4f}"]
    if row["ema_val_loss"] is not None:
        parts += [f"ema_val_loss {row['ema_val_loss']:.4f}", f"ema_val_auroc {row['ema_val_mean_auroc']:.4f}"]
    parts.append(f"{row['images_per_s']:.1f} img/s" + (" *best*" if row["best"] else ""))
    return " | ".join(parts)
