"""Service load test on loopback, PyTorch vs ONNX Runtime side by side, and single-image CPU latency per backbone.

    .venv/bin/python benchmarks/serve.py [--model resnet50] [--size 224] [--clients 8] [--requests 400]

Random weights (speed does not depend on them). The load generator runs on the same machine as the
service, so on a small machine it takes part of the CPU the service would otherwise have.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from cxrdx.checkpoint import Checkpoint, save_checkpoint
from cxrdx.export import OnnxPredictor, export_onnx
from cxrdx.findings import FINDINGS
from cxrdx.models import PAPER_MODELS, create_model
from cxrdx.predict import BasePredictor, Predictor
from cxrdx.serve import create_app

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/nih_sample/images/00000013_004.png"


def make_models(name: str, size: int, folder: Path) -> tuple[Predictor, OnnxPredictor]:
    torch.manual_seed(0)
    kwargs = {"img_size": size} if name.startswith("coatnet") else {}
    model = create_model(name, num_findings=len(FINDINGS), **kwargs)
    ckpt = Checkpoint(
        model_name=name, state_dict=model.state_dict(), input_size=size, mean=[0.5], std=[0.25], cache_size=256, model_kwargs=kwargs
    )
    save_checkpoint(folder / f"{name}.pt", ckpt)
    result = export_onnx(ckpt, folder / f"{name}.onnx")
    print(f"  {name}: exported, ONNX Runtime vs PyTorch max abs probability difference {result.max_abs_diff:.1e}")
    return Predictor(ckpt, device="cpu"), OnnxPredictor.from_file(result.path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(predictor: BasePredictor, image: bytes, clients: int, requests: int) -> dict[str, float]:
    """`clients` threads send `requests` uploads in all, each waiting for its answer before the next."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(predictor, queue_size=clients), host="127.0.0.1", port=free_port(), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}/v1/predict"
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                start = time.perf_counter()
                try:
                    ok = http.post(url, files={"file": ("x.png", image, "image/png")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors += not ok

    with httpx.Client() as http:  # warm-up, not counted
        for _ in range(3):
            http.post(url, files={"file": ("x.png", image, "image/png")})
    workers = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join()
    ms = np.array(latencies) * 1e3
    return {
        "throughput": len(ms) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": errors,
        "wall": wall,
    }


def single_image_ms(predictor: BasePredictor, size: int, repeats: int) -> float:
    """Median time of one prepared image through transform + network + sigmoid (no decoding)."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, predictor.info.image_size, predictor.info.image_size), dtype=np.uint8)
    predictor.predict_proba(pixels)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_proba(pixels)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="backbone of the load test (default resnet50)")
    parser.add_argument("--size", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=10, help="single-image runs per backbone (median reported)")
    parser.add_argument("--image", type=Path, default=SAMPLE if SAMPLE.is_file() else None, help="upload (default: a ChestX-ray14 PNG)")
    parser.add_argument("--skip-latency", action="store_true", help="only the load test")
    args = parser.parse_args()

    if args.image is None:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)).save(buffer, format="PNG")
        image, label = buffer.getvalue(), "synthetic 1024 x 1024 PNG"
    else:
        image, label = args.image.read_bytes(), args.image.name
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; random weights")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(
            f"\nLoad test: {args.model} at {args.size} px, {args.clients} clients, {args.requests} requests "
            f"of {label} ({len(image) / 1e6:.2f} MB) to POST /v1/predict on 127.0.0.1"
        )
        torch_predictor, onnx_predictor = make_models(args.model, args.size, folder)
        rows = {p.backend: load_test(p, image, args.clients, args.requests) for p in (torch_predictor, onnx_predictor)}
        print(f"  {'backend':<12} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'wall s':>7}")
        for backend, r in rows.items():
            print(f"  {backend:<12} {r['throughput']:>7.2f} {r['p50']:>8.0f} {r['p99']:>8.0f} {r['errors']:>7d} {r['wall']:>7.1f}")
        t, o = rows["pytorch"], rows["onnxruntime"]
        print(
            f"  onnxruntime / pytorch: throughput x{o['throughput'] / t['throughput']:.2f}, p50 x{o['p50'] / t['p50']:.2f}, "
            f"p99 x{o['p99'] / t['p99']:.2f}"
        )
        if any(r["errors"] for r in rows.values()):
            raise SystemExit("errors in the load test: expected 0")

        if args.skip_latency:
            return
        print(f"\nSingle-image CPU latency at {args.size} px (transform + network, median of {args.repeats}):")
        latency = {}
        for name in PAPER_MODELS:
            pair = (torch_predictor, onnx_predictor) if name == args.model else make_models(name, args.size, folder)
            latency[name] = [single_image_ms(p, args.size, args.repeats) for p in pair]
        print(f"  {'backbone':<18} {'pytorch ms':>11} {'onnxruntime ms':>15} {'ratio':>6}")
        for name, (t_ms, o_ms) in latency.items():
            print(f"  {name:<18} {t_ms:>11.1f} {o_ms:>15.1f} {o_ms / t_ms:>6.2f}")


if __name__ == "__main__":
    main()
