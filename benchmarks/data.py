"""Images per second through the training input pipeline: the prepared cache vs the paper's code path.

Both paths run in this one process, pinned to one core, with one torch thread, on the same real
ChestX-ray14 images, in alternating rounds. Rates are per CPU second of this process (the per-core
figure, robust to other programs sharing the machine) and per wall second:

  cache  CacheDataset(cache at --cache-size) + train_transform(--input-size): flip, resize, AutoAugment,
         normalise, random erasing on a small uint8 tensor read from the memory map
  paper  decode the 1024 x 1024 PNG with PIL every time, then (torchvision, on the PIL image) flip,
         AutoAugment at full resolution, resize to --input-size, to tensor, normalise, random erasing

    python benchmarks/data.py [--data ../shared/data/nih_sample] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from cxrdx.data.cache import open_cache, prepare_cache
from cxrdx.data.dataset import CacheDataset, train_transform

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = 0.5, 0.25


def paper_transform(input_size: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.AutoAugment(T.AutoAugmentPolicy.IMAGENET),
            T.Resize((input_size, input_size)),
            T.ToTensor(),
            T.Normalize([MEAN], [STD]),
            T.RandomErasing(p=0.25),
        ]
    )


def rate(step, items: list, min_seconds: float) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of `step` over `items`, repeated for min_seconds."""
    count, cpu, wall = 0, time.process_time(), time.perf_counter()
    while time.process_time() - cpu < min_seconds:
        for item in items:
            step(item)
        count += len(items)
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def paper_step(transform: T.Compose):
    def step(path: Path) -> None:
        with Image.open(path) as image:
            transform(image.convert("L"))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "nih_sample")
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per path per round")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = prepare_cache(args.data, Path(tmp) / "cache", size=args.cache_size, progress=False)
        prepare_s = time.perf_counter() - start
        cache = open_cache(result.path)
        dataset = CacheDataset(cache, transform=train_transform(args.input_size, MEAN, STD))
        paths = [Path(p) for p in cache.index["path"]]
        cache_step, paper = dataset.__getitem__, paper_step(paper_transform(args.input_size))
        rows = list(range(len(dataset)))
        rate(cache_step, rows, 0.3), rate(paper, paths[:3], 0.3)  # warm-up

        rates: dict[str, list[tuple[float, float]]] = {"cache": [], "paper": []}
        for round_ in range(args.rounds):
            rates["cache"].append(rate(cache_step, rows, args.seconds))
            rates["paper"].append(rate(paper, paths, args.seconds))
            print(f"round {round_ + 1}: cache {rates['cache'][-1][0]:7.1f} img/CPU-s   paper {rates['paper'][-1][0]:5.1f} img/CPU-s")

    (fast_cpu, fast_wall), (slow_cpu, slow_wall) = (
        tuple(statistics.median(r[k] for r in rates[name]) for k in (0, 1)) for name in ("cache", "paper")
    )
    print(f"\n{len(paths)} images of {args.data}; 1 core, 1 thread; input {args.input_size} px; median of {args.rounds} rounds")
    print(f"{'path':<58}{'img/CPU-s':>10}{'img/wall-s':>11}")
    print(f"{'paper: PIL decode 1024^2, AutoAugment full size, resize':<58}{slow_cpu:>10.1f}{slow_wall:>11.1f}")
    print(f"{f'cache: memmap {args.cache_size}^2, resize, AutoAugment':<58}{fast_cpu:>10.1f}{fast_wall:>11.1f}")
    print(
        f"ratio cache / paper per core: {fast_cpu / slow_cpu:.1f}x (wall: {fast_wall / slow_wall:.1f}x); "
        f"one-time prepare {len(paths) / prepare_s:.0f} img/s, paid once for all epochs"
    )


if __name__ == "__main__":
    main()
