"""Multi-label losses on logits: BCE, the paper's WBCE and L_ours, focal loss and ASL.

Every loss is an `nn.Module` called as `loss(logits, targets)` with (N, C) logits and (N, C) 0/1
targets, returning a scalar. A NaN target (a finding the image's dataset does not label) is masked:
it adds nothing to the loss or its gradient. The paper sums over findings and images (Eq. 5, 9, 10);
that is the default `reduction="sum"`, and `reduction="mean"` divides by the number of labelled
entries (N*C when every entry is labelled). Computation runs in float32 with
autocast off, from log-sigmoids, so logits of any dtype and size (|z| = 100 in float16) give finite
values and gradients.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

REDUCTIONS = ("sum", "mean")


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per column of an (N, C) 0/1 label matrix; NaN (not labelled) counts as neither."""
    labels = np.asarray(labels, dtype=np.float64)
    return (labels == 1).sum(axis=0), (labels == 0).sum(axis=0)


def class_weights(positives: Sequence[float] | np.ndarray, negatives: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-finding weights w_c = negatives / positives (the paper's Eq. 11) from training-split counts.

    A finding with neither positives nor negatives (not labelled in the training data) gets weight 1:
    its targets are all NaN, so the loss masks it anyway.
    """
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    if pos.shape != neg.shape:
        raise CxrdxError(f"positive and negative counts differ in length: {pos.size} vs {neg.size}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()) or (pos < 0).any() or (neg < 0).any():
        raise CxrdxError("positive and negative counts must be finite and non-negative")
    unlabelled = (pos == 0) & (neg == 0)
    empty = np.flatnonzero((pos == 0) & ~unlabelled)
    if empty.size:
        names = FINDINGS if pos.size == len(FINDINGS) else [f"finding {i}" for i in range(pos.size)]
        raise CxrdxError(
            f"no positive training image for {', '.join(names[i] for i in empty)}: its weight "
            "negatives/positives would be infinite; use a split whose train part contains every finding"
        )
    return np.where(unlabelled, 1.0, neg / np.where(unlabelled, 1.0, pos))


class _MultiLabelLoss(nn.Module):
    """Casts to float32 outside autocast, checks shapes, masks NaN targets, reduces the per-element loss."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise CxrdxError(f"reduction must be one of {', '.join(REDUCTIONS)}, not {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise CxrdxError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(logits.device.type, enabled=False):
            y = targets.to(dtype)
            labelled = ~torch.isnan(y)
            per_element = self.elementwise(logits.to(dtype), torch.where(labelled, y, torch.zeros_like(y)))
            total = torch.where(labelled, per_element, torch.zeros_like(per_element)).sum()
            return total if self.reduction == "sum" else total / labelled.sum().clamp(min=1)

    def elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class _Weighted(_MultiLabelLoss):
    weights: torch.Tensor  # a buffer: moves with the module, not a parameter

    def __init__(self, weights: Sequence[float] | np.ndarray, reduction: str = "sum"):
        super().__init__(reduction)
        self.register_buffer("weights", torch.as_tensor(np.asarray(weights, dtype=np.float64)), persistent=False)

    def _w(self, z: torch.Tensor) -> torch.Tensor:
        if self.weights.numel() != z.shape[-1]:
            raise CxrdxError(f"{self.weights.numel()} class weights for {z.shape[-1]} outputs")
        return self.weights.to(z.dtype)


class BCELoss(_MultiLabelLoss):
    """Plain binary cross-entropy: -[y log p + (1-y) log(1-p)], p = sigmoid(z)."""

    def elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")


class WeightedBCELoss(_Weighted):
    """The paper's L_WBCE, Eq. (5)-(7): -[w_c y log p + (1-y) log(1-p)].

    w_c = negatives / positives of finding c. The paper's Eq. (6) text says positive over negative
    count, but its code and Eq. (11) use negative over positive, which up-weights rare findings as
    the paper intends; we use negative / positive. Eq. (5) also prints a minus sign before the
    negative term; both terms are negative log-likelihoods here.
    """

    def elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(self._w(z) * y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))


def _log1m_shifted(z: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_m, log(1 - p_m)) for p_m = max(sigmoid(z) - shift, 0), stable for any z.

    Where p > shift, 1 - p_m = sigmoid(-z) + shift, so log(1 - p_m) = logaddexp(logsigmoid(-z),
    log shift): never log(0), also for shift = 0 and z = 100.
    """
    p_m = (torch.sigmoid(z) - shift).clamp(min=0)
    log_shift = torch.tensor(math.log(shift) if shift > 0 else -math.inf, dtype=z.dtype, device=z.device)
    log1m = torch.logaddexp(F.logsigmoid(-z), log_shift)
    return p_m, torch.where(p_m > 0, log1m, torch.zeros_like(z))


class OursLoss(_Weighted):
    """The paper's L_ours, Eq. (8)-(12): L+ + L-.

    L+ = -alpha w_c (1-p)^gamma_pos log p on positives; L- = -p_m^gamma_neg log(1-p_m) on negatives,
    p_m = max(p - p_shift, 0), w_c = negatives / positives. Paper: alpha 0.2, gamma_pos 1 (Eq. 9 has
    no exponent), gamma_neg 4, p_shift 0.05. It is ASL (Ridnik et al. 2021) with the positive term
    weighted by alpha w_c.
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        alpha: float = 0.2,
        gamma_pos: float = 1.0,
        gamma_neg: float = 4.0,
        p_shift: float = 0.05,
        reduction: str = "sum",
    ):
        super().__init__(weights, reduction)
        if not 0 <= p_shift < 1:
            raise CxrdxError(f"p_shift must be in [0, 1), not {p_shift}")
        self.alpha, self.gamma_pos, self.gamma_neg, self.p_shift = alpha, gamma_pos, gamma_neg, p_shift

    def elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        positive = -self.alpha * self._w(z) * torch.exp(self.gamma_pos * F.logsigmoid(-z)) * F.logsigmoid(z)
        p_m, log1m = _log1m_shifted(z, self.p_shift)
        negative = -p_m.pow(self.gamma_neg) * log1m
        return y * positive + (1 - y) * negative

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, p_shift={self.p_shift}, {super().extra_repr()}"


class FocalLoss(_MultiLabelLoss):
    """Focal loss (Lin et al. 2017): -alpha_t (1-p_t)^gamma log p_t; alpha < 0 disables alpha_t.

    torchvision's `sigmoid_focal_loss`, run in float32.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"):
        super().__init__(reduction)
        self.alpha, self.gamma = alpha, gamma

    def elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(z, y, alpha=self.alpha, gamma=self.gamma, reduction="none")

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, {super().extra_repr()}"


class AsymmetricLoss(_MultiLabelLoss):
    """ASL (Ridnik et al. 2021): -(1-p)^gamma_pos log p on positives, -p_m^gamma_neg log(1-p_m) on negatives.

    p_m = max(p - clip, 0). As in the authors' code, each log is floored at log(eps) (eps = 0 turns
    the floor off); defaults gamma_neg 4, gamma_pos 1, clip 0.05, eps 1e-8.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        reduction: str = "sum",
    ):
        super().__init__(reduction)
        if not 0 <= clip < 1:
            raise CxrdxError(f"clip must be in [0, 1), not {clip}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        floor = math.log(self.eps) if self.eps > 0 else -math.inf
        log_p = F.logsigmoid(z).clamp(min=floor)
        p_m, log1m = _log1m_shifted(z, self.clip)
        positive = -torch.exp(self.gamma_pos * F.logsigmoid(-z)) * log_p
        negative = -p_m.pow(self.gamma_neg) * log1m.clamp(min=floor)
        return y * positive + (1 - y) * negative

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, {super().extra_repr()}"


LOSSES: dict[str, type[_MultiLabelLoss]] = {
    "bce": BCELoss,
    "wbce": WeightedBCELoss,
    "ours": OursLoss,
    "focal": FocalLoss,
    "asl": AsymmetricLoss,
}


def check_loss_name(name: str) -> None:
    """CxrdxError with close matches unless `name` is one of LOSSES."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise CxrdxError(f"unknown loss {name!r}; {hint}choose one of {', '.join(LOSSES)}")


def create_loss(
    name: str,
    positives: Sequence[float] | np.ndarray | None = None,
    negatives: Sequence[float] | np.ndarray | None = None,
    **hyper: float | str,
) -> nn.Module:
    """The loss called `name` (see LOSSES); `wbce` and `ours` weight findings by the training counts.

    Args:
        name: "bce", "wbce", "ours" (the paper's Eq. 8-12), "focal" or "asl".
        positives: positive training images per finding (`label_counts`); needed by wbce and ours.
        negatives: negative training images per finding; needed by wbce and ours.
        **hyper: the loss's own settings, e.g. `alpha`, `gamma_pos`, `gamma_neg`, `p_shift`, `reduction`.

    Returns:
        A module called as `loss(logits, targets)` on (N, K) tensors; NaN targets (unlabelled) are left out.

    Example:
        >>> import torch
        >>> loss = create_loss("ours", positives=[10.0, 200.0], negatives=[990.0, 800.0])
        >>> value = loss(torch.zeros(4, 2), torch.tensor([[1.0, 0.0]] * 4))
        >>> bool(value > 0)
        True
    """
    check_loss_name(name)
    cls = LOSSES[name]
    options: dict[str, Any] = dict(hyper)
    if issubclass(cls, _Weighted):
        if positives is None or negatives is None:
            raise CxrdxError(f"loss {name!r} needs the training split's positive and negative counts per finding")
        options = {"weights": class_weights(positives, negatives), **options}
    try:
        return cls(**options)
    except TypeError as exc:
        raise CxrdxError(f"loss {name!r}: {exc}") from None
