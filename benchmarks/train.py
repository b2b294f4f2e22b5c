"""Input-pipeline overhead of training: images/s of the engine's full step over images/s of the bare
forward/backward, same model, batch, precision and memory format.

full step: a batch from the cache loader (AutoAugment, flip, random erasing, normalisation) + forward +
loss + backward + optimizer + OneCycle + EMA update (cxrdx.engine.Run.step).
bare: forward + loss + backward on one batch already in memory (no loader, no optimizer, no EMA).

The two are measured alternately (`--repeats` rounds) and the medians compared; ratio >= 0.9 means
the pipeline costs at most 10%. Defaults: the paper's ResNet50 at 224 px, a 256-px phantom cache.

    .venv/bin/python benchmarks/train.py [--model resnet50 --input-size 224 --batch-size 8 --steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _make_cache(folder: Path, n: int, size: int) -> Path:
    from cxrdx.data.cache import prepare_cache
    from cxrdx.data.phantoms import generate_phantoms

    generate_phantoms(folder / "phantoms", n=n, size=size, seed=0, tail_floor=0.05, progress=False)
    prepare_cache(folder / "phantoms", folder / "cache", size=size, progress=False)
    return folder / "cache"


def _batches(run):
    """Endless (images, targets) from the training loader, epoch after epoch."""
    epoch = 0
    while True:
        run.sampler.set_epoch(epoch)
        for images, targets, _ in run.train_loader:
            yield images, targets
        epoch += 1


def _time_full(run, batches, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        images, targets = next(batches)
        run.step(images, targets)
    return steps * run.plan.global_batch / (time.perf_counter() - start)


def _time_bare(run, images: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    from cxrdx.runtime import autocast

    model = run.model
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with autocast(run.device, run.amp):
            logits = model(images)
        run.criterion(logits.float(), targets).backward()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of bare and full")
    parser.add_argument("--workers", type=int, default=1, help="loader processes of the full step")
    parser.add_argument("--cache", help="an existing cache (default: phantoms made in a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="any config override")
    args = parser.parse_args()

    from cxrdx.config import load_config
    from cxrdx.engine import setup_run

    with tempfile.TemporaryDirectory() as tmp:
        images_needed = args.batch_size * (1 + args.steps * args.repeats)
        # enough images for every finding to have training positives (the loss weights need them)
        cache = args.cache or _make_cache(Path(tmp), n=max(300, int(images_needed / 0.6)), size=args.cache_size)
        config = load_config(
            None,
            [
                f"data.cache={cache}",
                f"out={tmp}/run",
                f"model.name={args.model}",
                f"data.input_size={args.input_size}",
                f"optim.global_batch={args.batch_size}",
                f"data.workers={args.workers}",
                *args.overrides,
            ],
        )
        run = setup_run(config)
        run.model.train()
        batches = _batches(run)
        images, targets = next(batches)
        run.step(images, targets)  # warm-up: allocations, loader start
        images = images.to(run.device)
        if config.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(run.device).float()
        _time_bare(run, images, targets, 1)
        bare, full = [], []
        for _ in range(args.repeats):
            bare.append(_time_bare(run, images, targets, args.steps))
            full.append(_time_full(run, batches, args.steps))

    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.amp]
    print(
        f"{args.model} {args.input_size}px batch {args.batch_size} on {run.device} ({torch.get_num_threads()} threads, "
        f"{args.workers} loader workers, amp {amp}, EMA {'on' if run.ema is not None else 'off'})"
    )
    print(f"{'':28}{'images/s (median)':>18}   rounds")
    print(f"{'bare forward/backward':28}{statistics.median(bare):18.2f}   {', '.join(f'{v:.2f}' for v in bare)}")
    print(f"{'full training step':28}{statistics.median(full):18.2f}   {', '.join(f'{v:.2f}' for v in full)}")
    print(f"ratio full / bare: {statistics.median(full) / statistics.median(bare):.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
