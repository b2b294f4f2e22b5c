"""Losses against direct float64 transcriptions of their formulas; gradients; extreme logits; autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.losses import LOSSES, class_weights, create_loss, label_counts

POSITIVES = np.array([11559, 2776, 4667, 2303, 13317, 2516, 1686, 227, 19894, 5782, 6331, 3385, 1431, 5302])
NEGATIVES = 112120 - POSITIVES
W = NEGATIVES / POSITIVES


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# Per-element transcriptions of the equations, one (logit z, target y, finding c) at a time.
def ref_bce(z, y, c):
    p = _sigmoid(z)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def ref_wbce(z, y, c):  # Eq. (5)-(7) with w_c = negatives / positives
    p = _sigmoid(z)
    return -(W[c] * y * math.log(p) + (1 - y) * math.log(1 - p))


def ref_ours(z, y, c, alpha=0.2, gamma_pos=1.0, gamma_neg=4.0, p_shift=0.05):  # Eq. (8)-(12)
    p = _sigmoid(z)
    l_pos = -alpha * W[c] * (1 - p) ** gamma_pos * math.log(p)
    p_m = max(p - p_shift, 0.0)
    l_neg = -(p_m**gamma_neg) * math.log(1 - p_m)
    return l_pos if y == 1 else l_neg


def ref_focal(z, y, c, alpha=0.25, gamma=2.0):  # Lin et al. 2017, Eq. (5) with alpha_t
    p = _sigmoid(z)
    p_t = p if y == 1 else 1 - p
    alpha_t = alpha if y == 1 else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def ref_asl(z, y, c, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8):  # Ridnik et al. 2021, Eq. (4)
    p = _sigmoid(z)
    if y == 1:
        return -((1 - p) ** gamma_pos) * math.log(max(p, eps))
    p_m = max(p - clip, 0.0)
    return -(p_m**gamma_neg) * math.log(max(1 - p_m, eps))


REFERENCES = {"bce": ref_bce, "wbce": ref_wbce, "ours": ref_ours, "focal": ref_focal, "asl": ref_asl}
HYPER = {  # non-default settings, to check that every hyper-parameter reaches the formula
    "ours": {"alpha": 0.7, "gamma_pos": 2.0, "gamma_neg": 3.0, "p_shift": 0.1},
    "focal": {"alpha": 0.4, "gamma": 1.5},
    "asl": {"gamma_neg": 3.0, "gamma_pos": 0.0, "clip": 0.1, "eps": 1e-8},
}


def _batch(seed: int = 0, n: int = 6, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, len(FINDINGS), generator=g, dtype=torch.float64) * scale
    targets = (torch.rand(n, len(FINDINGS), generator=g) < 0.4).double()
    return logits, targets


def _reference(name: str, logits: torch.Tensor, targets: torch.Tensor, **hyper) -> np.ndarray:
    z, y = logits.numpy(), targets.numpy()
    ref = REFERENCES[name]
    return np.array([[ref(z[i, c], y[i, c], c, **hyper) for c in range(z.shape[1])] for i in range(z.shape[0])])


def test_registry_holds_the_five_losses():
    assert set(LOSSES) == {"bce", "wbce", "ours", "focal", "asl"}


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("custom", [False, True])
def test_loss_equals_formula(name, custom):
    hyper = HYPER.get(name, {}) if custom else {}
    logits, targets = _batch(seed=int(custom))
    expected = _reference(name, logits, targets, **hyper)
    total = create_loss(name, POSITIVES, NEGATIVES, **hyper)(logits, targets)
    mean = create_loss(name, POSITIVES, NEGATIVES, reduction="mean", **hyper)(logits, targets)
    assert total.item() == pytest.approx(expected.sum(), rel=1e-10)
    assert mean.item() == pytest.approx(expected.mean(), rel=1e-10)


def test_float32_close_to_float64_formula():
    logits, targets = _batch(seed=2)
    expected = _reference("ours", logits, targets).sum()
    got = create_loss("ours", POSITIVES, NEGATIVES)(logits.float(), targets.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_special_cases_agree():
    """ours with alpha*w = 1, no focusing and no shift is BCE; ASL without eps is ours with alpha*w = 1."""
    logits, targets = _batch(seed=3)
    ones = np.ones(len(FINDINGS))
    bce = create_loss("bce")(logits, targets)
    plain = create_loss("ours", ones, ones, alpha=1.0, gamma_pos=0.0, gamma_neg=0.0, p_shift=0.0)
    assert plain(logits, targets).item() == pytest.approx(bce.item(), rel=1e-12)
    assert create_loss("wbce", ones, ones)(logits, targets).item() == pytest.approx(bce.item(), rel=1e-12)
    asl = create_loss("asl", eps=0.0)(logits, targets)
    assert create_loss("ours", ones, ones, alpha=1.0)(logits, targets).item() == pytest.approx(asl.item(), rel=1e-12)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_gradients_pass_gradcheck(name):
    logits, targets = _batch(seed=4, n=3, scale=2.0)
    loss = create_loss(name, POSITIVES, NEGATIVES, **HYPER.get(name, {}))
    assert torch.autograd.gradcheck(lambda z: loss(z, targets), (logits.requires_grad_(),))
    ours_no_shift = create_loss("ours", POSITIVES, NEGATIVES, p_shift=0.0)
    assert torch.autograd.gradcheck(lambda z: ours_no_shift(z, targets), (logits,))


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p_shift", [0.05, 0.0])
def test_extreme_logits_are_finite(name, dtype, p_shift):
    hyper = {"ours": {"p_shift": p_shift}, "asl": {"clip": p_shift, "eps": 0.0}}.get(name, {})
    loss = create_loss(name, POSITIVES, NEGATIVES, **hyper)
    big = torch.tensor([100.0, -100.0]).repeat(7)
    logits = torch.stack([big, -big, torch.zeros(14)]).to(dtype).requires_grad_()
    targets = torch.tensor([[1.0, 0.0] * 7, [1.0, 0.0] * 7, [1.0, 0.0] * 7])
    value = loss(logits, targets)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(logits.grad.float()).all()
    assert value.item() > 0  # the wrong-sign row costs something


def test_confident_right_answers_cost_nothing_in_ours():
    loss = create_loss("ours", POSITIVES, NEGATIVES)
    targets = torch.tensor([[1.0, 0.0] * 7])
    logits = torch.tensor([[100.0, -100.0] * 7])
    assert loss(logits, targets).item() == 0.0
    # A negative below the shift (p = 0.04 < 0.05) costs exactly nothing either.
    assert loss(torch.full((1, 14), math.log(0.04 / 0.96)), torch.zeros(1, 14)).item() == 0.0


@pytest.mark.parametrize("name", list(REFERENCES))
def test_autocast_bf16_on_cpu_is_finite_and_close(name):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, len(FINDINGS))
    features = torch.randn(8, 32) * 3
    targets = (torch.rand(8, len(FINDINGS)) < 0.3).float()
    loss = create_loss(name, POSITIVES, NEGATIVES)
    reference = loss(head(features), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
        value = loss(logits, targets)
    assert logits.dtype == torch.bfloat16 and value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(head.weight.grad).all()
    assert value.item() == pytest.approx(reference.item(), rel=3e-2)


def test_class_weights_from_counts():
    np.testing.assert_allclose(class_weights([10, 5, 1], [90, 95, 99]), [9.0, 19.0, 99.0])
    np.testing.assert_allclose(class_weights(POSITIVES, NEGATIVES), W)
    loss = create_loss("wbce", POSITIVES, NEGATIVES)
    np.testing.assert_allclose(loss.weights.numpy(), W)


def test_zero_positive_finding_is_named():
    positives = POSITIVES.copy()
    positives[FINDINGS.index("Hernia")] = 0
    with pytest.raises(CxrdxError, match="Hernia"):
        create_loss("ours", positives, NEGATIVES)
    with pytest.raises(CxrdxError, match="Hernia"):
        class_weights(positives, NEGATIVES)


def test_bad_requests_raise_user_errors():
    with pytest.raises(CxrdxError, match="unknown loss 'wce'"):
        create_loss("wce", POSITIVES, NEGATIVES)
    with pytest.raises(CxrdxError, match="counts"):
        create_loss("wbce")
    with pytest.raises(CxrdxError, match="gamma"):
        create_loss("ours", POSITIVES, NEGATIVES, gamma=2.0)
    with pytest.raises(CxrdxError, match="reduction"):
        create_loss("bce", reduction="none")
    with pytest.raises(CxrdxError, match="length"):
        class_weights([1, 2], [3, 4, 5])
    with pytest.raises(CxrdxError, match="shape"):
        create_loss("bce")(torch.zeros(2, 14), torch.zeros(2, 13))


# --- NaN targets: findings a dataset does not label --------------------------------------------------


def _nan_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 14, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(6, 14, generator=g) < 0.3).double()
    labelled = torch.rand(6, 14, generator=g) < 0.6
    labelled[:, FINDINGS.index("Hernia")] = False  # a finding the dataset does not label at all
    return logits, targets, labelled


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_masked_loss_equals_unmasked_loss_on_fully_labelled_targets(name, reduction):
    loss = (
        create_loss(name, POSITIVES, NEGATIVES, reduction=reduction) if name in ("wbce", "ours") else create_loss(name, reduction=reduction)
    )
    logits, targets, _ = _nan_batch()
    per_element = loss.elementwise(logits, targets)
    unmasked = per_element.sum() if reduction == "sum" else per_element.mean()
    torch.testing.assert_close(loss(logits, targets), unmasked, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nan_targets_are_ignored_exactly(name, reduction):
    loss = (
        create_loss(name, POSITIVES, NEGATIVES, reduction=reduction) if name in ("wbce", "ours") else create_loss(name, reduction=reduction)
    )
    logits, targets, labelled = _nan_batch()
    with_nan = torch.where(labelled, targets, torch.full_like(targets, float("nan")))
    z = logits.clone().requires_grad_(True)
    value = loss(z, with_nan)
    value.backward()
    # the labelled entries alone, summed (or averaged over their count)
    kept = loss.elementwise(logits, targets)[labelled]
    torch.testing.assert_close(value.detach(), kept.sum() if reduction == "sum" else kept.sum() / labelled.sum())
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    assert (z.grad[~labelled] == 0).all() and (z.grad[labelled] != 0).any()
    # whatever the logits of unlabelled entries are, the loss is the same
    moved = torch.where(labelled, logits, logits + 50.0)
    assert loss(moved, with_nan).item() == value.item()


def test_a_batch_without_any_label_costs_nothing():
    z = torch.zeros(3, 14, requires_grad=True)
    value = create_loss("bce", reduction="mean")(z, torch.full((3, 14), float("nan")))
    value.backward()
    assert value.item() == 0.0 and (z.grad == 0).all()


def test_counts_and_weights_skip_unlabelled_entries():
    labels = np.array([[1, 0, np.nan], [0, np.nan, np.nan], [1, 1, np.nan], [np.nan, 0, np.nan]])
    positives, negatives = label_counts(labels)
    assert positives.tolist() == [2, 1, 0] and negatives.tolist() == [1, 2, 0]
    # a finding labelled nowhere in training gets weight 1 (its targets are masked); one without positives still fails
    np.testing.assert_allclose(class_weights(positives, negatives), [0.5, 2.0, 1.0])
    with pytest.raises(CxrdxError, match="finding 1"):
        class_weights([2, 0, 0], [1, 2, 0])
