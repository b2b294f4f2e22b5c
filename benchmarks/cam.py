"""Seconds per explanation: Group-CAM, Grad-CAM and Score-CAM on the same model and image, side by side.

The methods run in alternating rounds (so load from other programs hits all alike), with one torch
thread by default; the table gives the median seconds of the rounds, the forward passes each method
spends (counted with a hook), and the ratio to Grad-CAM.

    python benchmarks/cam.py [--checkpoint RUN/checkpoints/best.pt | --model resnet18 --size 224]
                             [--rounds 3] [--groups 32] [--batch-size 32] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from cxrdx.explain import FlatSaliencyWarning, default_target_layers, explain
from cxrdx.runtime import resolve_device

METHODS = ("groupcam", "gradcam", "scorecam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a cxrdx checkpoint (default: a random --model)")
    parser.add_argument("--model", default="resnet18", help="timm name when no checkpoint (default resnet18)")
    parser.add_argument("--size", type=int, help="input side (default: the checkpoint's, else 224)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="Group-CAM and Score-CAM forward batch (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--finding", type=int, default=1, help="finding index to explain (default 1, Cardiomegaly)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint:
        from cxrdx.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        model, name, size = ckpt.build_model(device), ckpt.model_name, args.size or ckpt.input_size
    else:
        from cxrdx.models import create_model

        model, name, size = create_model(args.model).to(device).eval(), args.model, args.size or 224
    image = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    layers = default_target_layers(model, image)
    options = {"groups": args.groups, "batch_size": args.batch_size}

    forwards = dict.fromkeys(METHODS, 0)
    current = {"method": None}

    def count(*_: object) -> None:
        forwards[current["method"]] += 1

    handle = model.register_forward_hook(count)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlatSaliencyWarning)  # a random model's maps may be flat
        for method in METHODS:  # warm-up, also counts the forward passes of one explanation
            current["method"] = method
            explain(model, image, args.finding, method=method, target_layers=layers, **options)
        handle.remove()
        for _ in range(args.rounds):
            for method in METHODS:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                explain(model, image, args.finding, method=method, target_layers=layers, **options)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[method].append(time.perf_counter() - start)

    print(
        f"{name}, {size} x {size} px, {device}, {args.threads} thread(s), groups {args.groups}, batch {args.batch_size}, "
        f"{args.rounds} round(s)"
    )
    base = statistics.median(seconds["gradcam"])
    print(f"{'method':<10} {'s / explanation':>16} {'forward passes':>15} {'x Grad-CAM':>11}")
    for method in METHODS:
        median = statistics.median(seconds[method])
        print(f"{method:<10} {median:>16.3f} {forwards[method]:>15d} {median / base:>11.1f}")


if __name__ == "__main__":
    main()
