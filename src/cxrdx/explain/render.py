"""Side-by-side panels like the paper's Figs. 4-5 (the X-ray, then the X-ray under the heatmap), raw maps, and the batch writer."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from tqdm import tqdm

from cxrdx import rundir
from cxrdx.atomic import atomic_path
from cxrdx.errors import CxrdxError, ImageReadError

if TYPE_CHECKING:
    from cxrdx.predict import ImageSource, Predictor

HEATMAP = "jet"
OVERLAY_ALPHA = 0.45


def caption(finding: str, probability: float, method: str, flat: bool = False) -> str:
    text = f"{finding}: p = {probability:.3f} · {method}"
    return text + " · flat map (nothing highlighted)" if flat else text


def render_panel(image: np.ndarray, saliency: np.ndarray, title: str, path: str | Path, dpi: int = 100) -> Path:
    """Write a PNG: `image` (2-D, any size) on the left; on the right the same image with
    `saliency` (values in [0, 1], any size; stretched over the image) as a heatmap."""
    height, width = image.shape
    extent = (0, width, height, 0)
    side = max(3.0, min(6.0, width / dpi))
    figure = Figure(figsize=(2 * side, side + 0.5), dpi=dpi, layout="constrained")
    left, right = figure.subplots(1, 2)
    for axes in (left, right):
        axes.imshow(image, cmap="gray", extent=extent, interpolation="bilinear")
        axes.set_axis_off()
    heat = right.imshow(saliency, cmap=HEATMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    figure.colorbar(heat, ax=right, fraction=0.046, pad=0.02)
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def overlay(gray: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1]: `gray` (H, W, in [0, 1]) under `saliency` (H, W, in [0, 1]) in the panels' colour map,
    blended with their heatmap opacity."""
    colour = matplotlib.colormaps[HEATMAP](saliency)[..., :3]
    return np.clip((1 - OVERLAY_ALPHA) * gray[..., None] + OVERLAY_ALPHA * colour, 0, 1)


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of `image`, gray (H, W) or RGB (H, W, 3), values in [0, 1]."""
    out = io.BytesIO()
    Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def heatmap_png(predictor: Predictor, pixels: np.ndarray, finding_index: int, method: str = "groupcam") -> bytes:
    """The model's view of uint8 (S, S) `pixels` under the heatmap of one finding, as PNG bytes; a flat map gives
    the plain image."""
    import torch

    from cxrdx.explain.registry import explain

    tensor = predictor.to_tensor(pixels[None]).to(predictor.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a flat map is returned as zeros: a plain image, not an error
        with torch.enable_grad():
            heat = explain(predictor.model, tensor, finding_index, method=method)
    return png_bytes(overlay(predictor.model_view(pixels), heat))


def save_map(saliency: np.ndarray, path: str | Path) -> Path:
    """The raw map as .npy (float32, the model input's size)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(saliency, dtype=np.float32))
    return Path(path)


def choose_findings(probabilities: np.ndarray, predictor: Predictor, how: str | Sequence[str]) -> list[str]:
    """Findings to explain for one image: "all", "predicted" (at or above the checkpoint's threshold;
    the most probable one when none is), or the given names."""
    findings = predictor.findings
    if how == "all":
        return list(findings)
    if how == "predicted":
        thresholds = predictor.thresholds
        chosen = [f for f, p in zip(findings, probabilities) if p >= thresholds[f]]
        return chosen or [findings[int(np.argmax(probabilities))]]
    unknown = [name for name in how if name not in findings]
    if unknown:
        raise CxrdxError(f"unknown finding(s) {', '.join(unknown)}; the model predicts {', '.join(findings)}")
    return list(how)


def write_explanations(
    predictor: Predictor,
    images: Iterable[tuple[str, ImageSource]],
    out: str | Path,
    how: str | Sequence[str] = "predicted",
    method: str = "groupcam",
    target_layers: Sequence[nn.Module] | None = None,
    progress: bool = True,
    total: int | None = None,
    **options: object,
) -> pd.DataFrame:
    """For each (name, image) and chosen finding: out/FINDING/STEM.METHOD.png (panel) and .npy (map).

    Images are prepared as the predictor does (read, resize to the cache size, eval transform).
    Returns one row per map (Image Index, Finding, probability, flat, png, npy, error), also written to
    out/explanations.csv. An unreadable image does not stop the others: it gets one row with only
    Image Index and `error` (the reason) filled in.
    """
    from cxrdx.explain.registry import FlatSaliencyWarning, explain

    out = Path(out)
    rows = []
    with tqdm(total=total, desc=f"explain ({method})", unit="img", disable=not progress) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", FlatSaliencyWarning)  # reported in the table and the caption
        for name, source in images:
            try:
                pixels = predictor.load(source, name=name)
            except ImageReadError as exc:
                rows.append(
                    {"Image Index": name, "Finding": "", "probability": np.nan, "flat": False, "png": "", "npy": "", "error": exc.reason}
                )
                bar.update(1)
                continue
            probabilities = predictor.predict_proba(pixels[None])[0]
            image = predictor.to_tensor(pixels[None])
            stem = str(Path(name).with_suffix(""))
            for finding in choose_findings(probabilities, predictor, how):
                index = predictor.findings.index(finding)
                saliency = explain(predictor.model, image, index, method=method, target_layers=target_layers, **options)
                flat = bool(saliency.max() <= saliency.min())
                base = out / finding / f"{stem}.{method}"
                title = f"{name} · {caption(finding, float(probabilities[index]), method, flat)}"
                png = render_panel(pixels, saliency, title, base.with_name(base.name + ".png"))
                npy = save_map(saliency, base.with_name(base.name + ".npy"))
                rows.append(
                    {
                        "Image Index": name,
                        "Finding": finding,
                        "probability": float(probabilities[index]),
                        "flat": flat,
                        "png": str(png),
                        "npy": str(npy),
                        "error": "",
                    }
                )
            bar.update(1)
    table = pd.DataFrame(rows, columns=rundir.EXPLANATION_COLUMNS)
    rundir.write_explanations(out, table)
    return table
