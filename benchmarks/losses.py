"""bce vs wbce vs ours on long-tailed phantoms: test AUROC of the five rarest findings, mean ± sd
over training seeds. Same data, split, model, epochs and learning rate for every loss; only
`loss.name` and `seed` change. Prints the Markdown table that the README quotes.

    .venv/bin/python benchmarks/losses.py [--out /tmp/losses] [--n 3000] [--epochs 8] [--seeds 3]

Each run is resumable: an existing RUN/checkpoints/best.pt is evaluated, not retrained.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cxrdx.config import load_config
from cxrdx.data.cache import open_cache, prepare_cache
from cxrdx.data.phantoms import generate_phantoms
from cxrdx.data.splits import make_split, write_split
from cxrdx.engine import train
from cxrdx.evaluation import predict_split
from cxrdx.findings import FINDINGS
from cxrdx.stats import auroc_ci

LOSSES = ("bce", "wbce", "ours")


def data(out: Path, n: int, size: int) -> tuple[Path, Path]:
    """Phantoms with the paper's long tail (only Hernia's 0.2 % raised to 1 %), a cache and one split."""
    cache, split = out / "cache", out / "split.csv"
    if not (cache / "meta.json").is_file():
        generate_phantoms(out / "phantoms", n=n, size=size, seed=0, tail_floor=0.01, progress=False)
        prepare_cache(out / "phantoms", cache, size=size, progress=False)
    if not split.is_file():
        write_split(make_split(open_cache(cache).index, strategy="patient", seed=0), split)
    return cache, split


def run(out: Path, cache: Path, split: Path, loss: str, seed: int, epochs: int, input_size: int) -> np.ndarray:
    """Train one model (unless done) and return its per-finding test AUROC."""
    run_dir = out / f"{loss}_seed{seed}"
    if not (run_dir / "checkpoints" / "best.pt").is_file():
        started = time.perf_counter()
        train(
            load_config(
                Path(__file__).parents[1] / "src/cxrdx/presets/demo.yaml",
                [
                    f"data.cache={cache}",
                    f"data.split_file={split}",
                    f"out={run_dir}",
                    f"seed={seed}",
                    f"loss.name={loss}",
                    f"optim.epochs={epochs}",
                    f"data.input_size={input_size}",
                ],
            ),
            progress=False,
        )
        print(f"{run_dir.name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    preds = predict_split(run_dir / "checkpoints" / "best.pt", split="test", progress=False, workers=0).predictions
    return np.array([auroc_ci(preds.labels[:, k], preds.probs[:, k])[0] for k in range(len(FINDINGS))])


def cell(values: list[float]) -> str:
    """mean ± sd over seeds; "n/a" where the test split has no positive (AUROC undefined)."""
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/cxrdx-losses"))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one process per core would run two of these side by side
    cache, split = data(args.out, args.n, args.size)
    opened = open_cache(cache)
    series = make_split(opened.index, strategy="patient", seed=0).reindex(opened.index["Image Index"]).to_numpy()
    train_pos = opened.labels[series == "train"].sum(axis=0)
    test_pos = opened.labels[series == "test"].sum(axis=0)
    rarest = np.argsort(train_pos, kind="stable")[:5]
    auroc = {(loss, s): run(args.out, cache, split, loss, s, args.epochs, args.input_size) for s in range(args.seeds) for loss in LOSSES}
    lines = ["| finding (train / test positives) | " + " | ".join(LOSSES) + " |", "|---|" + "---|" * len(LOSSES)]
    for k in rarest:
        cells = [cell([auroc[(loss, s)][k] for s in range(args.seeds)]) for loss in LOSSES]
        lines.append(f"| {FINDINGS[k]} ({train_pos[k]} / {test_pos[k]}) | " + " | ".join(cells) + " |")
    for title, pick in (("mean of these five", rarest), ("mean of all 14", slice(None))):
        cells = [cell([float(np.nanmean(auroc[(loss, s)][pick])) for s in range(args.seeds)]) for loss in LOSSES]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
