"""The content check of the input guard: is an image like the ones the model was trained on?

Method: the Mahalanobis distance of an image's pooled penultimate features to the training features
(Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks"). The labels are multi-label, so one Gaussian models the whole training
distribution (Lee et al. fit one per class with a shared covariance). The covariance is the
Ledoit-Wolf shrinkage estimate, invertible even with fewer images than feature dimensions; wide
feature vectors are first projected on their leading principal components (`max_dim`).
The threshold is a percentile of the validation scores (99: 1 % of validation images refused).

The guard is stored in the checkpoint (see cxrdx.checkpoint): its mean, projection and precision as
tensors `guard.*`, the rest in the JSON header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

METHOD = "mahalanobis-ledoit-wolf"
PERCENTILE = 99.0
MAX_TRAIN_IMAGES = 5000
MAX_DIM = 512
TENSOR_PREFIX = "guard."


@dataclass(frozen=True)
class OodGuard:
    """A fitted content check: `score(features) > threshold` means the image is refused."""

    mean: np.ndarray  # (D,) float64: mean of the training features
    projection: np.ndarray  # (D, K): onto the leading principal components (the identity when D <= max_dim)
    precision: np.ndarray  # (K, K): inverse of the shrunk covariance of the projected training features
    threshold: float
    percentile: float  # of the validation scores the threshold sits at
    val_acceptance: float  # share of validation images with score <= threshold
    train_images: int
    val_images: int
    shrinkage: float
    method: str = METHOD

    def header(self) -> dict[str, Any]:
        """The JSON-header part of the guard (the arrays are tensors, see `tensors`)."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "percentile": self.percentile,
            "val_acceptance": self.val_acceptance,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "shrinkage": self.shrinkage,
            "features": int(self.mean.shape[0]),
            "components": int(self.precision.shape[0]),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            TENSOR_PREFIX + name: torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.float64))
            for name in ("mean", "projection", "precision")
        }

    def describe(self) -> str:
        """One line for people: method, threshold and what it keeps of the validation images."""
        return (
            f"on: Mahalanobis distance of the penultimate features ({self.mean.shape[0]} → {self.precision.shape[0]} dims, "
            f"Ledoit-Wolf shrinkage {self.shrinkage:.3f}, {self.train_images} training images); refuses above "
            f"{self.threshold:.4g}, the {self.percentile:g}th percentile of validation scores "
            f"({self.val_acceptance:.1%} of {self.val_images} validation images accepted)"
        )


GUARD_OFF = "off: the checkpoint has no content guard (refit with `cxrdx calibrate --ood`)"


def guard_from_parts(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> OodGuard:
    """The inverse of `OodGuard.header` + `OodGuard.tensors`; raises ValueError on inconsistent parts."""
    arrays = {name: tensors[TENSOR_PREFIX + name].double().numpy() for name in ("mean", "projection", "precision")}
    dim, comps = arrays["mean"].shape[0], arrays["precision"].shape[0]
    if arrays["mean"].ndim != 1 or arrays["projection"].shape != (dim, comps) or arrays["precision"].shape != (comps, comps):
        raise ValueError(f"guard tensors of inconsistent shapes {[tuple(a.shape) for a in arrays.values()]}")
    return OodGuard(
        **arrays,
        threshold=float(header["threshold"]),
        percentile=float(header["percentile"]),
        val_acceptance=float(header["val_acceptance"]),
        train_images=int(header["train_images"]),
        val_images=int(header["val_images"]),
        shrinkage=float(header["shrinkage"]),
        method=str(header.get("method", METHOD)),
    )


# --- features ----------------------------------------------------------------------------------------


def supports_guard(model: nn.Module) -> bool:
    """A timm-style network whose pooled penultimate features can be read (forward_features + forward_head)."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def logits_and_features(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pooled penultimate features of one batch from a single pass through the backbone."""
    net: Any = model  # a timm model: forward_features / forward_head, checked by supports_guard
    maps = net.forward_features(batch)
    return net.forward_head(maps), net.forward_head(maps, pre_logits=True).flatten(1)


@torch.no_grad()
def loader_features(model: nn.Module, loader: Any, device: torch.device | str) -> np.ndarray:
    """Penultimate features (N, D) float64 of every image of a loader yielding (images, labels, names)."""
    was_training = model.training
    model.eval()
    out = [logits_and_features(model, images.to(device))[1].double().cpu().numpy() for images, *_ in loader]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0))


# --- fit, score, threshold --------------------------------------------------------------------------------


def fit_gaussian(features: np.ndarray, max_dim: int = MAX_DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean, projection (D, K), precision (K, K) and Ledoit-Wolf shrinkage of training features (N, D)."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit the guard, got shape {features.shape}")
    mean = features.mean(axis=0)
    centred = features - mean
    dim = features.shape[1]
    if dim > max_dim:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = vt[:max_dim].T
    else:
        projection = np.eye(dim)
    estimator = LedoitWolf(assume_centered=True).fit(centred @ projection)
    return mean, projection, estimator.get_precision(), float(estimator.shrinkage_)


def score(guard: OodGuard, features: np.ndarray) -> np.ndarray:
    """Mahalanobis distance (N,) of features (N, D) to the training features: higher is less familiar."""
    z = (np.asarray(features, dtype=np.float64) - guard.mean) @ guard.projection
    return np.sqrt(np.maximum(np.einsum("nk,kl,nl->n", z, guard.precision, z), 0.0))


def choose_threshold(val_scores: np.ndarray, percentile: float = PERCENTILE) -> tuple[float, float]:
    """The threshold at `percentile` of the validation scores and the share of them it accepts."""
    val_scores = np.asarray(val_scores, dtype=np.float64)
    if not len(val_scores):
        raise ValueError("no validation scores to choose the guard's threshold on")
    threshold = float(np.percentile(val_scores, percentile))
    return threshold, float(np.mean(val_scores <= threshold))


def fit_guard(train_features: np.ndarray, val_features: np.ndarray, percentile: float = PERCENTILE, max_dim: int = MAX_DIM) -> OodGuard:
    """Fit on training features, set the threshold on validation features."""
    mean, projection, precision, shrinkage = fit_gaussian(train_features, max_dim)
    unthresholded = OodGuard(mean, projection, precision, np.inf, percentile, 1.0, len(train_features), len(val_features), shrinkage)
    threshold, acceptance = choose_threshold(score(unthresholded, val_features), percentile)
    return OodGuard(mean, projection, precision, threshold, percentile, acceptance, len(train_features), len(val_features), shrinkage)


def refusal(guard: OodGuard, value: float) -> str | None:
    """The refusal reason for one score, or None when it is accepted."""
    if value <= guard.threshold:
        return None
    return (
        f"not like the training images (out-of-distribution score {value:.4g} > threshold {guard.threshold:.4g}); "
        "is it a frontal chest radiograph?"
    )


def fit_on_cache(
    model: nn.Module,
    cache: Any,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    input_size: int,
    mean: list[float],
    std: list[float],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    max_train: int = MAX_TRAIN_IMAGES,
    percentile: float = PERCENTILE,
    seed: int = 0,
) -> OodGuard:
    """Fit the guard of `model` on (at most `max_train`, drawn at random) training images of a prepared cache
    and set its threshold on the validation rows, through the evaluation transform prediction uses."""
    train_rows = np.asarray(train_rows)
    if len(train_rows) > max_train:
        train_rows = np.sort(np.random.default_rng(seed).choice(train_rows, max_train, replace=False))
    train, val = (cache_features(model, cache, rows, input_size, mean, std, device, batch_size) for rows in (train_rows, val_rows))
    return fit_guard(train, val, percentile=percentile)


def cache_features(
    model: nn.Module,
    cache: Any,
    rows: np.ndarray | None,
    input_size: int,
    mean: list[float],
    std: list[float],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """Penultimate features (N, D) of cache rows (None: all) through the evaluation transform prediction uses."""
    from cxrdx.data.dataset import CacheDataset, eval_transform, make_loader

    dataset = CacheDataset(cache, None if rows is None else np.asarray(rows), eval_transform(input_size, mean, std))
    return loader_features(model, make_loader(dataset, batch_size, shuffle=False, workers=0), device)
