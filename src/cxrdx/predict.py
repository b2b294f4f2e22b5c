"""Predictor: a checkpoint → per-finding probabilities and positive findings for files, bytes, arrays, PIL images.

Preprocessing is the prepared-cache path exactly: `read_image` → `resize_square(cache_size)` →
`eval_transform(input_size, mean, std)`, so a raw file and its cached copy give the same numbers.
A checkpoint imported from torchxrayvision names its own pipeline instead (`preprocess="xrv"`,
see `cxrdx.preprocess`).
`cxrdx.export.OnnxPredictor` shares everything here but the forward pass.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from cxrdx import __version__
from cxrdx.checkpoint import Checkpoint, load_checkpoint
from cxrdx.data.dicom_rules import Verdict, dicom_verdict
from cxrdx.errors import CxrdxError
from cxrdx.inference import probabilities
from cxrdx.ood import GUARD_OFF, OodGuard, logits_and_features, refusal, score, supports_guard
from cxrdx.preprocess import CXRDX, XRV, xrv_input

ImageSource = str | os.PathLike | bytes | np.ndarray | Image.Image
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet evaluates a CSV cell starting so (OWASP CSV injection)


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
    preprocess: str = CXRDX

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
            preprocess=ckpt.preprocess,
        )

    @property
    def image_size(self) -> int:
        """Side of the square uint8 image the transform starts from (the cache size)."""
        return self.cache_size or self.input_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """One image's result; `error` is set (and the rest empty) when it could not be read.

    `accepted`, `reason` and `flags` are the input guard's verdict: the DICOM header rules
    (`cxrdx.data.dicom_rules`), then the content check (`cxrdx.ood`) whose `ood_score` (None: guard off)
    refuses an image above the checkpoint's threshold. A refused image has `accepted` False, the `reason`,
    and no probabilities unless predicted with `allow_ood`.
    """

    name: str
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    positives: list[str] = field(default_factory=list)
    error: str | None = None
    accepted: bool = True
    reason: str | None = None
    flags: list[str] = field(default_factory=list)
    ood_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BasePredictor:
    """Decoding, batching, temperature and thresholds; subclasses supply `_logits`."""

    backend = "none"
    guard: OodGuard | None = None  # the content check; subclasses that compute features set it
    guard_status = GUARD_OFF  # one line for people: what the content check does

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
        """Decode one image and resize it to the cache size: uint8 (S, S), exactly as `prepare` stores it.
        With the "xrv" preprocess: the float32 (S, S) model input of `cxrdx.preprocess.xrv_input`."""
        from cxrdx.data.cache import resize_square
        from cxrdx.data.imageio import read_image

        image = read_image(source, name=name)
        if self.info.preprocess == XRV:
            return xrv_input(image, self.info.input_size, self.info.mean, self.info.std)
        return resize_square(image, self.info.image_size, name or _name(source, 0))

    def to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """`load`'s pixels (N, S, S) → the model's float32 input (N, C, H, W)."""
        if self.info.preprocess == XRV:
            return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[:, None]
        return torch.stack([self.transform(torch.from_numpy(np.array(p))[None]) for p in pixels])

    def model_view(self, pixels: np.ndarray) -> np.ndarray:
        """The network's input for `load`'s (S, S) `pixels`, un-normalized to [0, 1] (H, W) float64: what the model
        and a heatmap see."""
        x = self.to_tensor(pixels[None])[0, 0].numpy().astype(np.float64)
        return np.clip(x * self.info.std[0] + self.info.mean[0], 0.0, 1.0)

    def _prepared(self, images: object) -> bool:
        """Whether `images` is already a batch of `load`'s pixels: (N, S, S), uint8 (float32 for "xrv")."""
        size = self.info.image_size
        dtype = np.float32 if self.info.preprocess == XRV else np.uint8
        return isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == dtype and images.shape[1:] == (size, size)

    def predict_proba(self, images: ImageSource | Sequence[ImageSource], progress: bool = False) -> np.ndarray:
        """Probabilities (N, 14) float64. A batch of `load`'s pixels (uint8 (N, S, S) at the cache size)
        is taken as already prepared; anything else is one image or a sequence of images."""
        if isinstance(images, np.ndarray) and self._prepared(images):
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
        allow_ood: bool = False,
    ) -> list[Prediction]:
        """One Prediction per image. errors="report" turns an unreadable image into a Prediction
        with `error` set instead of raising, so the others are still predicted. DICOM inputs pass the
        header rules first: a refused one is not decoded and gets no probabilities unless `allow_ood`
        (it stays marked refused either way)."""
        items = _as_list(images)
        names = [_name(item, i) for i, item in enumerate(items)] if names is None else list(names)
        if len(names) != len(items):
            raise CxrdxError(f"{len(names)} names for {len(items)} images")
        results: list[Prediction] = []
        with tqdm(total=len(items), desc="predict", unit="img", disable=not progress) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = range(start, min(start + self.batch_size, len(items)))
                pixels, ok, failed = [], [], {}
                verdicts = {i: dicom_verdict(items[i]) for i in chunk}
                for i in chunk:
                    verdict = verdicts[i]
                    if not (allow_ood or verdict is None or verdict.accepted):
                        continue
                    try:
                        pixels.append(self.load(items[i], name=names[i]))
                        ok.append(i)
                    except Exception as exc:  # any decoder failure is this file's problem, not the run's
                        if errors == "raise":
                            raise
                        failed[i] = getattr(exc, "reason", None) or f"{exc.__class__.__name__}: {exc}"
                probs, scores = self._scored_pixels(np.stack(pixels)) if pixels else (np.zeros((0, len(self.findings))), [])
                row, ood = dict(zip(ok, probs, strict=True)), dict(zip(ok, scores, strict=True))
                for i in chunk:
                    results.append(self._judged(names[i], row.get(i), ood.get(i), failed.get(i), verdicts[i], allow_ood))
                bar.update(len(chunk))
        return results

    def prediction(self, name: str, probs: np.ndarray | None, error: str | None = None, verdict: Verdict | None = None) -> Prediction:
        """The Prediction for one image's probabilities at the checkpoint's thresholds (or its error),
        carrying the header rules' verdict (None: no header to check, accepted)."""
        verdict = verdict or Verdict(accepted=True)
        checked = Prediction(name=name, error=error, accepted=verdict.accepted, reason=verdict.reason, flags=list(verdict.flags))
        if probs is None:
            return checked
        probabilities = {f: float(p) for f, p in zip(self.findings, probs, strict=True)}
        thresholds = self.thresholds
        positives = [f for f in self.findings if probabilities[f] >= thresholds[f]]
        return replace(checked, probabilities=probabilities, thresholds=thresholds, positives=positives)

    def predict_pixels(self, pixels: np.ndarray, name: str, allow_ood: bool = False) -> Prediction:
        """The Prediction of one image already decoded to uint8 (S, S) by `load`, through the content check."""
        probs, scores = self._scored_pixels(pixels[None])
        return self._judged(name, probs[0], scores[0], None, None, allow_ood)

    def _judged(
        self, name: str, probs: np.ndarray | None, ood_score: float | None, error: str | None, verdict: Verdict | None, allow_ood: bool
    ) -> Prediction:
        """The Prediction after the content check: a score over the guard's threshold refuses the image
        (after any header-rule reason), and a refused image keeps its probabilities only with `allow_ood`."""
        reason = None if ood_score is None or self.guard is None else refusal(self.guard, ood_score)
        if reason is not None:
            verdict = verdict or Verdict(accepted=True)
            verdict = Verdict(accepted=False, reason=verdict.reason or reason, flags=[*verdict.flags, "out-of-distribution"])
        kept = probs if allow_ood or verdict is None or verdict.accepted else None
        return replace(self.prediction(name, kept, error, verdict), ood_score=ood_score)

    def _scored_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, list[float | None]]:
        """Probabilities (N, 14) and content-check scores (None each when the guard is off) of prepared pixels."""
        probs: list[np.ndarray] = []
        scores: list[float | None] = []
        for start in range(0, len(pixels), self.batch_size):
            logits, features = self._logits_features(self.to_tensor(pixels[start : start + self.batch_size]))
            probs.append(self.probabilities(logits))
            scores += [None] * len(logits) if features is None or self.guard is None else [float(v) for v in score(self.guard, features)]
        return np.concatenate(probs), scores

    def _logits_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and penultimate features (None: this backend gives none) of one batch."""
        return self._logits(batch), None

    def _proba_pixels(self, pixels: np.ndarray, progress: bool) -> np.ndarray:
        out = []
        for start in tqdm(range(0, len(pixels), self.batch_size), desc="predict", unit="batch", disable=not progress):
            out.append(self.probabilities(self._logits(self.to_tensor(pixels[start : start + self.batch_size]))))
        return np.concatenate(out) if out else np.zeros((0, len(self.findings)))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Logits → probabilities, dividing by the checkpoint's per-finding temperature when it has one."""
        return probabilities(logits, self.info.temperature)

    def _logits(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class Predictor(BasePredictor):
    """A PyTorch model from a cxrdx checkpoint. `.model` (eval mode) and `.checkpoint` are public.

    It decodes PNG, JPEG and DICOM files (or bytes, arrays, PIL images) as `cxrdx prepare` does,
    applies the DICOM header rules and, when the checkpoint has one, the input guard, and returns
    probabilities at the checkpoint's temperature with its decision thresholds.

    Args:
        checkpoint: a loaded `cxrdx.checkpoint.Checkpoint`.
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        batch_size: images per forward pass.

    Example:
        >>> predictor = Predictor.from_checkpoint("runs/resnet50_ours/checkpoints/best.pt")  # doctest: +SKIP
        >>> [p.positives for p in predictor.predict(["a.png", "b.dcm"])]  # doctest: +SKIP
        [['Effusion'], []]
        >>> predictor.predict_proba("a.png").shape  # doctest: +SKIP
        (1, 14)
    """

    backend = "pytorch"

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "auto", batch_size: int = 32):
        from cxrdx.runtime import resolve_device

        super().__init__(ModelInfo.from_checkpoint(checkpoint), batch_size)
        self.checkpoint = checkpoint
        self.device = resolve_device(str(device))
        self.model = checkpoint.build_model(self.device)
        if checkpoint.guard is not None and supports_guard(self.model):
            width = getattr(self.model, "num_features", checkpoint.guard.mean.shape[0])
            if width != checkpoint.guard.mean.shape[0]:
                raise CxrdxError(
                    f"the checkpoint's input guard was fitted on {checkpoint.guard.mean.shape[0]} features, "
                    f"but {checkpoint.model_name} gives {width}; refit it with `cxrdx calibrate --ood`"
                )
            self.guard, self.guard_status = checkpoint.guard, checkpoint.guard.describe()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", batch_size: int = 32, trust_pickle: bool = False
    ) -> Predictor:
        """The Predictor of a checkpoint file.

        Args:
            path: a cxrdx checkpoint (safetensors; `cxrdx convert` turns an old pickle file into one).
            device: as for the constructor.
            batch_size: images per forward pass.
            trust_pickle: also load an old pickle checkpoint (it can run code; see cxrdx.checkpoint).

        Returns:
            The Predictor, its model in eval mode on `device`.
        """
        return cls(load_checkpoint(path, trust_pickle=trust_pickle), device=device, batch_size=batch_size)

    def _logits(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu().numpy()

    def _logits_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if self.guard is None:
            return self._logits(batch), None
        with torch.inference_mode():
            logits, features = logits_and_features(self.model, batch.to(self.device))
        return logits.float().cpu().numpy(), features.double().cpu().numpy()


@dataclass(frozen=True)
class ImageScan:
    """What `scan_images` found: images as (path, display name), files passed over as (name, reason),
    and the sub-folders not looked into (without `recursive`)."""

    files: list[tuple[Path, str]]
    skipped: list[tuple[str, str]]
    subfolders: list[str]


def scan_images(paths: Iterable[str | Path], recursive: bool = False) -> ImageScan:
    """Expand files and folders. A file given by name is taken whatever its suffix; a folder contributes
    its image files (IMAGE_SUFFIXES), named relative to the folder, and every other entry is listed
    as skipped with the reason (another extension, a broken link)."""
    found: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    subfolders: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            found.append((path, path.name))  # a missing file is reported by the decoder, with the others predicted
            continue
        for entry in sorted(path.glob("**/*" if recursive else "*")):
            name = entry.relative_to(path).as_posix()
            if entry.is_dir():
                if not recursive:
                    subfolders.append(name)
            elif not entry.exists():
                skipped.append((name, "broken link"))
            elif entry.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((name, f"not an image extension ({', '.join(IMAGE_SUFFIXES)})"))
            else:
                found.append((entry, name))
    return ImageScan(found, skipped, subfolders)


def collect_images(paths: Iterable[str | Path], recursive: bool = False) -> list[tuple[Path, str]]:
    """The (path, display name) pairs of `scan_images`."""
    return scan_images(paths, recursive).files


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
    columns (`Image Index` + one probability per finding) plus `positives`, `error` and the input guard's
    `accepted`, `reason`, `flags` and `ood_score` (empty: guard off)."""
    if fmt == "json":
        return json.dumps([p.to_dict() for p in predictions], indent=2) + "\n"
    findings = next((list(p.probabilities) for p in predictions if p.probabilities), [])
    if fmt == "csv":
        rows = [
            {
                "Image Index": csv_safe(p.name),
                **p.probabilities,
                "positives": "|".join(p.positives),
                "error": csv_safe(p.error or ""),
                "accepted": p.accepted,
                "reason": csv_safe(p.reason or ""),
                "flags": "|".join(p.flags),
                "ood_score": p.ood_score,
            }
            for p in predictions
        ]
        columns = ["Image Index", *findings, "positives", "error", "accepted", "reason", "flags", "ood_score"]
        return pd.DataFrame(rows, columns=columns).to_csv(index=False, float_format="%.8g")
    if fmt != "table":
        raise CxrdxError(f"unknown format {fmt!r}; choose table, json or csv")
    names = [printable(p.name) for p in predictions]
    width = max([len("image"), *map(len, names)])
    lines = [f"{'image':<{width}}  positive findings (probability ≥ threshold)"]
    for name, p in zip(names, predictions):
        if p.error:
            found = f"ERROR: {printable(p.error)}"
        elif not p.probabilities:
            found = f"REFUSED: {printable(p.reason or '')}"
        else:
            found = ", ".join(f"{f} {p.probabilities[f]:.2f}" for f in p.positives) or "none"
            found += "" if p.accepted else f"  [refused: {printable(p.reason or '')}]"
        lines.append(f"{name:<{width}}  {found}" + "".join(f"  [{flag}]" for flag in p.flags))
    return "\n".join(lines) + "\n"


def csv_safe(text: str) -> str:
    """`text` with a leading ' when a spreadsheet would read it as a formula (=, +, -, @, tab, CR)."""
    return "'" + text if text.startswith(FORMULA_LEADS) else text


def printable(text: str) -> str:
    """`text` with control characters (newline, tab, escape...) written as Python escapes, one line on a terminal."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c).startswith("C") else c for c in text)
