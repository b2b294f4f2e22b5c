"""The training loop: single process or torchrun DDP, AMP, EMA, OneCycle, exact resume, run directory.

Devices, precision and the process group are `cxrdx.runtime`'s; validation runs `cxrdx.inference`."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cxrdx import rundir
from cxrdx.checkpoint import Checkpoint, load_checkpoint, load_train_state, pickle_train_state, save_checkpoint, save_train_state
from cxrdx.config import TrainConfig
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.inference import collect_logits, mean_auroc, probabilities
from cxrdx.runtime import Dist, autocast, distributed, resolve_amp, resolve_device

if TYPE_CHECKING:
    from cxrdx.data.dataset import CacheDataset


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- data ----------------------------------------------------------------------------------------


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def spread(global_batch: int, processes: int) -> tuple[int, ...]:
    """Each process's share of a global batch: equal parts, the remainder one image each to the first ranks."""
    if global_batch < processes:
        raise CxrdxError(f"optim.global_batch={global_batch} is smaller than the {processes} processes: each needs an image")
    base, extra = divmod(global_batch, processes)
    return tuple(base + (rank < extra) for rank in range(processes))


@dataclass(frozen=True)
class Plan:
    """What a config means on this many processes and training images; printed at start, kept in config.yaml."""

    processes: int
    per_process: tuple[int, ...]  # images per process per optimiser step
    train_images: int
    epochs: int
    ema_decay: float | None  # None: EMA off
    warnings: tuple[str, ...] = ()

    @property
    def global_batch(self) -> int:
        return sum(self.per_process)

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images // self.global_batch  # full global batches only; the remainder is reshuffled

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def ema_horizon_steps(self) -> float | None:
        return None if self.ema_decay is None else 1.0 / (1.0 - self.ema_decay)

    @property
    def ema_horizon_epochs(self) -> float | None:
        steps = self.ema_horizon_steps
        return None if steps is None or self.steps_per_epoch == 0 else steps / self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        horizon = self.ema_horizon_epochs
        return {
            "processes": self.processes,
            "batch_per_process": list(self.per_process),
            "global_batch": self.global_batch,
            "train_images": self.train_images,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "ema_horizon_steps": None if self.ema_horizon_steps is None else round(self.ema_horizon_steps, 1),
            "ema_horizon_epochs": None if horizon is None else round(horizon, 2),
            "warnings": list(self.warnings),
        }

    def lines(self) -> list[str]:
        sizes = sorted(set(self.per_process), reverse=True)
        per = " or ".join(str(b) for b in sizes)
        text = [
            f"{self.processes} process(es) x {per} images = global batch {self.global_batch} per optimiser step; "
            f"{self.train_images:,} training images: {self.steps_per_epoch:,} steps per epoch, "
            f"{self.total_steps:,} steps in {self.epochs} epochs",
        ]
        if self.ema_decay is not None and self.steps_per_epoch:
            text.append(f"EMA decay {self.ema_decay}: horizon {self.ema_horizon_steps:,.0f} steps = {self.ema_horizon_epochs:.2f} epochs")
        return text + [f"warning: {w}" for w in self.warnings]


def plan_run(config: TrainConfig, processes: int, train_images: int) -> Plan:
    """The batches, steps and EMA horizon that `config` gives on `processes` processes, with warnings."""
    optim = config.optim
    if optim.batch_per_process is not None:
        per_process = (optim.batch_per_process,) * processes
    else:
        assert optim.global_batch is not None  # the config sets exactly one of the two
        per_process = spread(optim.global_batch, processes)
    ema = config.ema
    plan = Plan(processes, per_process, train_images, optim.epochs, ema.decay if ema.enabled else None)
    return dataclasses.replace(plan, warnings=tuple(_short_run_warnings(config, plan)))


def _short_run_warnings(config: TrainConfig, plan: Plan) -> list[str]:
    """A run shorter than a few EMA horizons saves EMA weights that are mostly the initial network."""
    if plan.ema_decay is None or config.ema.warmup or config.selection.weights != "ema" or plan.total_steps == 0:
        return []
    left = plan.ema_decay**plan.total_steps
    if left <= 0.05:  # three horizons or more
        return []
    suggestion = 1 - 3 / plan.total_steps
    return [
        f"the run has {plan.total_steps:,} optimiser steps and an EMA horizon of {plan.ema_horizon_steps:,.0f} steps "
        f"(ema.decay={plan.ema_decay}): at its end the EMA weights still hold {100 * left:.1f}% of the initial "
        "weights, and they are what is validated, selected and saved (selection.weights=ema). Fix: "
        f"--set ema.warmup=true, or --set ema.decay={suggestion:.4g} (a horizon of a third of the run), or --set selection.weights=raw"
    ]


class _GlobalBatchSampler(Sampler):
    """This process's part of each global batch, as lists of (epoch, index).

    One permutation per epoch (seeded by seed and epoch), cut into full global batches; process r
    takes its slice of each. The global batches are the same for any number of processes, and each
    sample's augmentation is seeded by (seed, epoch, index): identical for any number of workers or
    processes, and after a resume.
    """

    def __init__(self, size: int, plan: Plan, rank: int, seed: int):
        self.size, self.plan, self.seed, self.epoch = size, plan, seed, 0
        self.offset = sum(plan.per_process[:rank])
        self.count = plan.per_process[rank]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        batch = self.plan.global_batch
        for step in range(self.plan.steps_per_epoch):
            start = step * batch + self.offset
            yield [(self.epoch, index) for index in order[start : start + self.count]]

    def __len__(self) -> int:
        return self.plan.steps_per_epoch


class _SeededDataset(Dataset):
    def __init__(self, dataset: CacheDataset, seed: int):
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
    train_rows = np.asarray(rows_for_split(cache, split, "train", config.data.allow_missing))
    val_rows = np.asarray(rows_for_split(cache, split, "val", config.data.allow_missing))
    mean: float | list[float]
    std: float | list[float]
    if config.data.mean is None or config.data.std is None:
        mean, std = pixel_stats(cache, rows=train_rows)
    else:
        mean, std = config.data.mean, config.data.std
    as_list = lambda v: [float(x) for x in np.atleast_1d(np.asarray(v, dtype=np.float64))]  # noqa: E731
    source = str(split_path) if split_path else f"the patient split (seed {config.seed})"
    return _Data(cache, split, source, train_rows, val_rows, as_list(mean), as_list(std))


def _loaders(
    config: TrainConfig, data: _Data, plan: Plan, info: Dist, device: torch.device
) -> tuple[DataLoader, DataLoader, _GlobalBatchSampler]:
    from cxrdx.data.dataset import CacheDataset, eval_transform, make_loader, train_transform

    cfg = config.data
    pin = device.type == "cuda"
    size = cfg.input_size
    train_set = CacheDataset(
        data.cache,
        data.train_rows,
        train_transform(
            size,
            data.mean,
            data.std,
            autoaugment=cfg.autoaugment,
            hflip=cfg.hflip,
            random_erasing=cfg.random_erasing,
            augment_before_resize=cfg.augment_before_resize,
        ),
    )
    val_set = CacheDataset(data.cache, data.val_rows, eval_transform(size, data.mean, data.std))
    sampler = _GlobalBatchSampler(len(train_set), plan, info.rank, config.seed)
    train_loader = make_loader(
        _SeededDataset(train_set, config.seed),
        1,
        shuffle=False,
        workers=cfg.workers,
        batch_sampler=sampler,
        pin_memory=pin,
    )
    # The loader's own generator: creating its iterator must not consume the global RNG (exact resume).
    train_loader.generator = torch.Generator().manual_seed(config.seed)
    val_sampler: DistributedSampler | None = (
        DistributedSampler(val_set, info.world_size, info.rank, shuffle=False) if info.enabled else None
    )
    val_loader = make_loader(val_set, max(plan.per_process), shuffle=False, workers=cfg.workers, sampler=val_sampler, pin_memory=pin)
    return train_loader, val_loader, sampler


# --- model, optimiser, schedule ------------------------------------------------------------------


def _build_model(config: TrainConfig, device: torch.device, info: Dist) -> nn.Module:
    from cxrdx.models import create_model

    cfg = config.model
    try:
        model = create_model(
            cfg.name,
            pretrained=cfg.pretrained,
            num_findings=len(FINDINGS),
            drop_rate=cfg.drop_rate,
            first_conv=cfg.first_conv,
            **cfg.kwargs,
        )
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
    no_decay = getattr(model, "no_weight_decay", None)  # timm models name their own exempt parameters
    skip = no_decay() if callable(no_decay) else ()
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
        optimizer,
        max_lr=cfg.lr,
        total_steps=total,
        pct_start=cfg.pct_start,
        anneal_strategy="cos",
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )


def _criterion(config: TrainConfig, data: _Data, device: torch.device) -> nn.Module:
    from cxrdx.losses import create_loss, label_counts

    positives, negatives = label_counts(data.cache.labels[data.train_rows])
    try:
        return create_loss(config.loss.name, positives, negatives, **config.loss.hyper).to(device)
    except CxrdxError as exc:  # e.g. a finding without positive training images: name the split
        raise CxrdxError(f"{data.source}, loss {config.loss.name!r}: {exc}") from None


def _loss_scale(criterion: nn.Module, plan: Plan, rank: int, sum_over_images: int | None) -> float:
    """The factor on this process's loss so that DDP's average of the gradients is the global batch's:
    its mean for a mean-reduced loss (processes may hold unequal shares), and for a summed loss the sum
    over the global batch, or the mean image gradient x `sum_over_images` when that is set."""
    if getattr(criterion, "reduction", "mean") != "sum":
        return plan.per_process[rank] * plan.processes / plan.global_batch
    return plan.processes * (sum_over_images / plan.global_batch if sum_over_images else 1.0)


def _per_image(total: float, count: int, criterion: nn.Module) -> float:
    """A reported loss comparable across batch sizes: sum-reduced losses are divided by the image count."""
    return total / max(count, 1) if getattr(criterion, "reduction", "mean") == "sum" else total


# --- state ---------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    name, keys, *position = np.random.get_state()
    # plain values only (numpy's key array as a list): the resume file then loads with weights_only=True
    state = {"python": random.getstate(), "numpy": (name, np.asarray(keys).tolist(), *position), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, *position = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *position))
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
    sampler: _GlobalBatchSampler
    plan: Plan
    state: _State

    @property
    def weights(self) -> nn.Module:
        """The weights that are selected and saved (selection.weights): the EMA or the raw model."""
        return self.ema.module if self.config.selection.weights == "ema" else _unwrap(self.model)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a (per-rank) batch: forward, backward, clip, optimizer, schedule, EMA."""
        config = self.config
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True).float()
        if config.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            with autocast(self.device, self.amp):
                logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
            scale = _loss_scale(self.criterion, self.plan, self.info.rank, config.loss.sum_over_images)
            self.scaler.scale(loss * scale).backward()
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
                f"({config.model.name}); lower optim.global_batch (or optim.batch_per_process) or data.input_size, "
                "or set runtime.amp=auto on a GPU"
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
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss summed over images, images
    seen, start = 0, time.perf_counter()
    bar = tqdm(
        run.train_loader,
        desc=f"epoch {run.state.epoch + 1}/{run.config.optim.epochs}",
        disable=not (progress and info.main),
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    for images, targets, _ in bar:
        loss = run.step(images, targets)
        batch = images.shape[0]
        summed = loss.double() if getattr(criterion, "reduction", "mean") == "sum" else loss.double() * batch
        total += torch.stack([summed, torch.full((), batch, dtype=torch.float64, device=run.device)])
        seen += run.plan.global_batch
        if info.main and progress and (run.state.step % 5 == 0 or seen == run.plan.global_batch):
            value = loss.item()
            _check_finite(value, f"at step {run.state.step}")
            bar.set_postfix(
                loss=f"{_per_image(value, batch, criterion):.4f}",
                lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.1f}",
            )
    bar.close()
    if info.enabled:
        dist.all_reduce(total)
    loss_sum, images = total.tolist()
    _check_finite(loss_sum, f"in epoch {run.state.epoch + 1}")  # every rank, with or without a progress bar
    return loss_sum / max(images, 1), seen / max(time.perf_counter() - start, 1e-9)


def _check_finite(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise CxrdxError(f"the training loss became {loss} {where}; lower optim.lr or set runtime.amp=off")


def _validate(run: Run, model: nn.Module) -> dict[str, Any]:
    logits, targets, _, _ = collect_logits(model, run.val_loader, run.device, run.amp)
    with torch.no_grad():
        loss = run.criterion(
            torch.as_tensor(logits, dtype=torch.float32, device=run.device),
            torch.as_tensor(targets, dtype=torch.float32, device=run.device),
        ).item()
    auroc, per = mean_auroc(probabilities(logits), targets)
    return {"loss": _per_image(loss, len(targets), run.criterion), "mean_auroc": auroc, "auroc": dict(zip(FINDINGS, per))}


def _checkpoint(run: Run, metrics: dict[str, Any]) -> Checkpoint:
    config = run.config
    return Checkpoint(
        model_name=config.model.name,
        state_dict={k: v.detach().cpu().clone() for k, v in run.weights.state_dict().items()},
        input_size=config.data.input_size,
        mean=run.data.mean,
        std=run.data.std,
        cache_size=int(run.data.cache.size),
        model_kwargs={"drop_rate": config.model.drop_rate, **config.model.kwargs},
        config={**config.to_dict(), "data_source": run.data.cache.meta.get("data_source")},  # the phantoms' marker, for the model card
        val_metrics=metrics,
        epoch=run.state.epoch,
    )


def _train_state(run: Run, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """What `--resume` needs beyond the config: tensors and plain values only (see save_train_state)."""
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
    run.state = _State(train_state["epoch"], train_state["step"], train_state["best"], train_state["best_epoch"], train_state["bad_epochs"])


def _load_resume_state(run_dir: Path, trust_pickle: bool) -> dict[str, Any]:
    """RUN/checkpoints/train_state.pt; a run of an older cxrdx keeps it inside its pickle last.pt."""
    path = rundir.train_state_path(run_dir)
    if path.is_file():
        return load_train_state(path)  # never unpickles classes, whatever trust_pickle says
    return pickle_train_state(rundir.last_checkpoint(run_dir), trust_pickle)


def _prepare_run_dir(config: TrainConfig, resume: bool, info: Dist) -> Path:
    run_dir = Path(config.out)
    last = rundir.last_checkpoint(run_dir)
    if resume and not last.is_file():
        raise CxrdxError(f"{run_dir}: nothing to resume (no checkpoints/last.pt)")
    if not resume and last.is_file():
        raise CxrdxError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} or choose --set out=OTHER_DIR")
    if info.main:
        rundir.last_checkpoint(run_dir).parent.mkdir(parents=True, exist_ok=True)
    return run_dir


def setup_run(
    config: TrainConfig, resume: bool = False, info: Dist | None = None, device: torch.device | None = None, trust_pickle: bool = False
) -> Run:
    """Open the data, write RUN/split.csv and RUN/config.yaml (rank 0), build model, EMA, optimizer,
    schedule and loaders; with `resume`, restore RUN/checkpoints/train_state.pt (`trust_pickle`: or the
    state inside an old pickle last.pt)."""
    info = info or Dist()
    device = device or resolve_device(config.runtime.device)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    run_dir = _prepare_run_dir(config, resume, info)
    resume_state = _load_resume_state(run_dir, trust_pickle) if resume else None  # a refused file fails before the slow setup
    split_path = rundir.split_path(run_dir) if resume else (Path(config.data.split_file) if config.data.split_file else None)
    data = _open_data(config, split_path)
    if not resume:
        config.data.mean, config.data.std = data.mean, data.std
    plan = plan_run(config, info.world_size, len(data.train_rows))
    if plan.steps_per_epoch == 0:
        raise CxrdxError(
            f"the training split ({len(data.train_rows)} images) is smaller than one global batch "
            f"({plan.global_batch}); lower optim.global_batch"
        )
    if info.main:
        print("\n".join(plan.lines()), file=sys.stderr, flush=True)
    if info.main and not resume:
        from cxrdx.data.splits import write_split

        write_split(data.split, rundir.split_path(run_dir))
        rundir.write_config(run_dir, config, plan.to_dict())

    criterion = _criterion(config, data, device)
    _seed_everything(config.seed)  # identical initial weights on every rank
    model = _build_model(config, device, info)
    _seed_everything(config.seed + info.rank)  # per-rank dropout
    train_loader, val_loader, sampler = _loaders(config, data, plan, info, device)
    amp = resolve_amp(config.runtime.amp, device)
    wrapped: nn.Module = model
    if info.enabled:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = None
    if config.ema.enabled:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema.decay, use_warmup=config.ema.warmup)
    if config.runtime.compile:
        wrapped = cast(nn.Module, torch.compile(wrapped))
    optimizer = _optimizer(config, model)
    run = Run(
        config=config,
        run_dir=run_dir,
        info=info,
        device=device,
        amp=amp,
        data=data,
        model=wrapped,
        ema=ema,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=_scheduler(config, optimizer, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        plan=plan,
        state=_State(),
    )
    if resume_state is not None:
        _restore(run, resume_state)
    return run


def train(
    config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None, progress: bool = True, trust_pickle: bool = False
) -> Path:
    """Train per `config` into the run directory `config.out` and return it. Under torchrun every
    process calls this; rank 0 writes. `resume` continues the run exactly where its last epoch ended
    (`trust_pickle`: also a run whose last.pt is an old pickle checkpoint);
    `stop_after_epoch` ends after that many epochs (the schedule still spans optim.epochs)."""
    config = copy.deepcopy(config)
    with distributed(config.runtime.device) as (info, device):
        run = setup_run(config, resume, info, device, trust_pickle)
        _fit(run, stop_after_epoch, progress)
        if info.main:
            from cxrdx.card import write_run_card

            write_run_card(run.run_dir)
        return run.run_dir


def _fit(run: Run, stop_after_epoch: int | None, progress: bool) -> None:
    from cxrdx.report.figures import plot_curves

    config, info, state = run.config, run.info, run.state
    history = [r for r in rundir.read_epochs(run.run_dir) if r.epoch <= state.epoch]
    writer = _tensorboard(run.run_dir) if info.main else None
    last_epoch = config.optim.epochs if stop_after_epoch is None else min(stop_after_epoch, config.optim.epochs)
    monitor = config.selection.monitor
    while state.epoch < last_epoch:
        run.sampler.set_epoch(state.epoch)
        start = time.perf_counter()
        train_loss, images_per_s = _train_epoch(run, progress)
        raw = _validate(run, _unwrap(run.model))
        ema_metrics = _validate(run, run.ema.module) if run.ema is not None else None
        selected = ema_metrics if config.selection.weights == "ema" and ema_metrics is not None else raw
        value = selected["loss"] if monitor == "val_loss" else selected["mean_auroc"]
        improved = _better(value, state.best, monitor)
        state.epoch += 1
        if improved:
            state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        else:
            state.bad_epochs += 1
        row = {
            "epoch": state.epoch,
            "step": state.step,
            "lr": run.scheduler.get_last_lr()[0],
            "train_loss": train_loss,
            "weights": config.selection.weights,
            **_prefixed("val_", selected),
            **_prefixed("raw_val_", raw),
            **_prefixed("ema_val_", ema_metrics),
            "best": improved,
            "images_per_s": images_per_s,
            "seconds": time.perf_counter() - start,
        }
        history.append(rundir.EpochRow.from_dict(row))
        rng = _all_rng_states(run.device, info)  # every rank takes part in the gather
        if info.main:
            metrics = {
                "loss": selected["loss"],
                "mean_auroc": selected["mean_auroc"],
                "auroc": selected["auroc"],
                "weights": config.selection.weights,
                "warnings": list(run.plan.warnings),
            }
            if improved:
                save_checkpoint(rundir.best_checkpoint(run.run_dir), _checkpoint(run, metrics))
            rundir.write_epochs(run.run_dir, history)
            save_train_state(rundir.train_state_path(run.run_dir), _train_state(run, rng))  # before last.pt: never older than it
            save_checkpoint(rundir.last_checkpoint(run.run_dir), _checkpoint(run, metrics))
            plot_curves(history, rundir.curves_path(run.run_dir))
            if writer is not None:
                for key in ("train_loss", "raw_val_loss", "raw_val_mean_auroc", "ema_val_loss", "ema_val_mean_auroc", "lr"):
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
    if info.main:
        _fit_guards(run, progress)
    if info.main and run.plan.warnings:  # repeated at the end, where the results are read
        print("\n".join(f"warning: {w}" for w in run.plan.warnings), file=sys.stderr, flush=True)
    if info.enabled:
        dist.barrier()


def _fit_guards(run: Run, progress: bool) -> None:
    """Fit the input guard (cxrdx.ood) of best.pt and last.pt on the training split and store it in them."""
    from cxrdx import ood

    fitted: dict[int, ood.OodGuard] = {}
    for path in (rundir.best_checkpoint(run.run_dir), rundir.last_checkpoint(run.run_dir)):
        if not path.is_file():
            continue
        ckpt = load_checkpoint(path)
        if ckpt.epoch not in fitted:
            data = run.data
            fitted[ckpt.epoch] = ood.fit_on_cache(
                ckpt.build_model(run.device),
                data.cache,
                data.train_rows,
                data.val_rows,
                ckpt.input_size,
                ckpt.mean,
                ckpt.std,
                run.device,
                seed=run.config.seed,
            )
        ckpt.guard = fitted[ckpt.epoch]
        save_checkpoint(path, ckpt)
        if progress:
            print(f"input guard of {path.name}: {ckpt.guard.describe()}", file=sys.stderr, flush=True)


def _prefixed(prefix: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """loss, mean_auroc and per-finding auroc of one set of weights as metrics.jsonl columns (None: not validated)."""
    metrics = metrics or {}
    return {f"{prefix}{key}": metrics.get(key) for key in ("loss", "mean_auroc", "auroc")}


def _summary(row: dict[str, Any]) -> str:
    parts = [
        f"epoch {row['epoch']}",
        f"train_loss {row['train_loss']:.4f}",
        f"raw_val_loss {row['raw_val_loss']:.4f}",
        f"raw_val_auroc {row['raw_val_mean_auroc']:.4f}",
    ]
    if row["ema_val_loss"] is not None:
        parts += [f"ema_val_loss {row['ema_val_loss']:.4f}", f"ema_val_auroc {row['ema_val_mean_auroc']:.4f}"]
    parts.append(f"{row['images_per_s']:.1f} img/s" + (f" *best* ({row['weights']})" if row["best"] else ""))
    return " | ".join(parts)
