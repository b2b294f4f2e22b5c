"""Predictor: a checkpoint → per-finding probabilities and positive findings for files, bytes, arrays, PIL images.

Preprocessing is the prepared-cache path exactly: `read_image` → `resize_square(cache_size)` →
`eval_transform(input_size, mean, std)`, so a raw file and its cached copy give the same numbers.
`cxrdx.export.OnnxPredictor` shares everything here but the forward pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.special import expit
from tqdm import tqdm

from cxrdx import __version__
from cxrdx.checkpoint import Checkpoint, load_checkpoint
from cxrdx.errors import CxrdxError

ImageSource = str | os.PathLike | bytes | np.ndarray | Image.Image
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs besides the weights; the same for a checkpoint and an ONNX file."""

    model_name: str
    findings: list[str]
    thresholds: list[float]
    input_size: int
    mean: list[float]
    std: list[float]
    cache_size: int | None = None
    temperature: list[float] | None = None
    val_metrics: dict[str, Any] = field(default_factory=dict)
    cxrdx_version: str = __version__

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> ModelInfo:
        return cls(
            model_name=ckpt.model_name,
            findings=list(ckpt.findings),
            thresholds=[float(t) for t in ckpt.thresholds],
            input_size=int(ckpt.input_size),
            mean=[float(m) for m in ckpt.mean],
            std=[float(s) for s in ckpt.std],
            cache_size=None if ckpt.cache_size is None else int(ckpt.cache_size),
            temperature=None if ckpt.temperature is None else [float(t) for t in ckpt.temperature],
            val_metrics=dict(ckpt.val_metrics or {}),
            cxrdx_version=ckpt.cxrdx_version,
        )

    @property
    def image_size(self) -> int:
        """Side of the square uint8 image the transform starts from (the cache size)."""
        return self.cache_size or self.input_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """One image's result; `error` is set (and the rest empty) when it could not be read."""

    name: str
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    positives: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BasePredictor:
    """Decoding, batching, temperature and thresholds; subclasses supply `_logits`."""

    backend = "none"

    def __init__(self, info: ModelInfo, batch_size: int = 32):
        from cxrdx.data.dataset import eval_transform

        if batch_size < 1:
            raise CxrdxError(f"batch_size must be at least 1, got {batch_size}")
        self.info = info
        self.batch_size = batch_size
        self.transform = eval_transform(info.input_size, info.mean, info.std)

    @property
    def findings(self) -> list[str]:
        return self.info.findings

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(zip(self.info.findings, self.info.thresholds, strict=True))

    def load(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        """Decode one image and resize it to the cache size: uint8 (S, S), exactly as `prepare` stores it."""
        from cxrdx.data.cache import resize_square
        from cxrdx.data.imageio import read_image

        return resize_square(read_image(source, name=name), self.info.image_size)

    def to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S) → the model's float32 input (N, 1, H, W)."""
        return torch.stack([self.transform(torch.from_numpy(np.array(p))[None]) for p in pixels])

    def predict_proba(self, images: ImageSource | Sequence[ImageSource], progress: bool = False) -> np.ndarray:
        """Probabilities (N, 14) float64. A uint8 (N, S, S) array at the cache size is taken as
        already-prepared pixels; anything else is one image or a sequence of images."""
        size = self.info.image_size
        if isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == np.uint8 and images.shape[1:] == (size, size):
            return self._proba_pixels(images, progress)
        items = _as_list(images)
        out = [np.zeros((0, len(self.findings)))]
        for start in tqdm(range(0, len(items), self.batch_size), desc="predict", unit="batch", disable=not progress):
            chunk = items[start : start + self.batch_size]  # decoded one batch at a time: memory stays flat
            out.append(self._proba_pixels(np.stack([self.load(x, name=_name(x, start + i)) for i, x in enumerate(chunk)]), False))
        return np.concatenate(out)

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        names: Sequence[str] | None = None,
        errors: Literal["raise", "report"] = "raise",
        progress: bool = False,
    ) -> list[Prediction]:
        """One Prediction per image. errors="report" turns an unreadable image into a Prediction
        with `error` set instead of raising, so the others are still predicted."""
        items = _as_list(images)
        names = [_name(item, i) for i, item in enumerate(items)] if names is None else list(names)
        if len(names) != len(items):
            raise CxrdxError(f"{len(names)} names for {len(items)} images")
        results: list[Prediction] = []
        with tqdm(total=len(items), desc="predict", unit="img", disable=not progress) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = range(start, min(start + self.batch_size, len(items)))
                pixels, ok, failed = [], [], {}
                for i in chunk:
                    try:
                        pixels.append(self.load(items[i], name=names[i]))
                        ok.append(i)
                    except Exception as exc:  # any decoder failure is this file's problem, not the run's
                        if errors == "raise":
                            raise
                        failed[i] = getattr(exc, "reason", None) or f"{exc.__class__.__name__}: {exc}"
                probs = self._proba_pixels(np.stack(pixels), False) if pixels else []
                row = dict(zip(ok, probs, strict=True))
                for i in chunk:
                    results.append(self.prediction(names[i], row.get(i), failed.get(i)))
                bar.update(len(chunk))
        return results

    def prediction(self, name: str, probs: np.ndarray | None, error: str | None = None) -> Prediction:
        """The Prediction for one image's probabilities at the checkpoint's thresholds (or its error)."""
        if probs is None:
            return Prediction(name=name, error=error)
        probabilities = {f: float(p) for f, p in zip(self.findings, probs, strict=True)}
        thresholds = self.thresholds
        positives = [f for f in self.findings if probabilities[f] >= thresholds[f]]
        return Prediction(name=name, probabilities=probabilities, thresholds=thresholds, positives=positives)

    def _proba_pixels(self, pixels: np.ndarray, progress: bool) -> np.ndarray:
        out = []
        for start in tqdm(range(0, len(pixels), self.batch_size), desc="predict", unit="batch", disable=not progress):
            out.append(self.probabilities(self._logits(self.to_tensor(pixels[start : start + self.batch_size]))))
        return np.concatenate(out) if out else np.zeros((0, len(self.findings)))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Logits → probabilities, dividing by the checkpoint's per-finding temperature when it has one."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.info.temperature is not None:
            logits = logits / np.asarray(self.info.temperature, dtype=np.float64)
        return expit(logits)

    def _logits(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class Predictor(BasePredictor):
    """A PyTorch model from a cxrdx checkpoint. `.model` (eval mode) and `.checkpoint` are public."""

    backend = "pytorch"

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "auto", batch_size: int = 32):
        from cxrdx.engine import resolve_device

        super().__init__(ModelInfo.from_checkpoint(checkpoint), batch_size)
        self.checkpoint = checkpoint
        self.device = resolve_device(str(device))
        self.model = checkpoint.build_model(self.device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", batch_size: int = 32, trust_pickle: bool = False
    ) -> Predictor:
        """`trust_pickle`: also load an old pickle checkpoint (it can run code; see cxrdx.checkpoint)."""
        return cls(load_checkpoint(path, trust_pickle=trust_pickle), device=device, batch_size=batch_size)

    def _logits(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu().numpy()


def collect_images(paths: Iterable[str | Path], recursive: bool = False) -> list[tuple[Path, str]]:
    """Expand files and folders into (path, display name). A file given by name is taken whatever its
    suffix; a folder contributes its PNG, JPEG and DICOM files, named relative to the folder."""
    found: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found.extend((p, p.relative_to(path).as_posix()) for p in files)
        else:
            found.append((path, path.name))  # a missing file is reported by the decoder, with the others predicted
    return found


def _as_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4))):
        return [images]  # one grey, RGB or RGBA image
    return list(images)


def _name(item: ImageSource, i: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image {i}"


def format_predictions(predictions: Sequence[Prediction], fmt: Literal["table", "json", "csv"] = "table") -> str:
    """table: one line per image with its positive findings; json: everything; csv: the predictions-file
    columns (`Image Index` + one probability per finding) plus `positives` and `error`."""
    if fmt == "json":
        return json.dumps([p.to_dict() for p in predictions], indent=2) + "\n"
    findings = next((list(p.probabilities) for p in predictions if not p.error), [])
    if fmt == "csv":
        rows = [
            {"Image Index": p.name, **p.probabilities, "positives": "|".join(p.positives), "error": p.error or ""}
            for p in predictions
        ]
        return pd.DataFrame(rows, columns=["Image Index", *findings, "positives", "error"]).to_csv(index=False, float_format="%.8g")
    if fmt != "table":
        raise CxrdxError(f"unknown format {fmt!r}; choose table, json or csv")
    width = max([len("image"), *(len(p.name) for p in predictions)])
    lines = [f"{'image':<{width}}  positive findings (probability ≥ threshold)"]
    for p in predictions:
        if p.error:
            found = f"ERROR: {p.error}"
        else:
            found = ", ".join(f"{f} {p.probabilities[f]:.2f}" for f in p.positives) or "none"
        lines.append(f"{p.name:<{width}}  {found}")
    return "\n".join(lines) + "\n"
