"""Group-CAM (Zhang, Rao & Yang 2021) as published, scored on the sigmoid probability, with batched forwards.

The published algorithm (the authors' `cam/groupcam.py`), step by step:

1. One forward and one backward of the target finding's logit: Grad-CAM channel weights (the mean
   gradient) times the target layer's activations.
2. The weighted channels are split into G = 32 groups; each group is summed over its channels and
   ReLU'd, then de-noised on its own low-resolution map: values at or below the map's 70th percentile
   (linear interpolation, as numpy's) become 0. The map is upsampled bilinearly to the input size and
   min-max normalised to [0, 1]; a map without range is skipped.
3. Each group map m blends the input with its blurred copy, x·m + blur(x)·(1−m); the blur is a
   Gaussian of kernel 51 and sigma 50 (reflect padding) at 224 px. The group's score is the signed
   difference p(blend) − p(blur(x)) of the target's probability.
4. saliency = ReLU(Σ score_g · m_g), min-max normalised.

Differences kept from the authors' code, all documented here:
- The score p is the **sigmoid** probability of the target finding by default: the findings are
  independent multi-label outputs, and the published softmax over all outputs would couple them.
  `probability="softmax"` gives the published score for single-label (softmax) models.
- The blur's kernel and sigma scale with the input side (51 and 50 at 224 px, the published values).
- The groups are `torch.tensor_split`'s G groups (sizes differ by at most one); the authors'
  `torch.chunk` gives the same groups whenever G divides the channel count (2048 for ResNet50 and
  EfficientNet-b5, 768 for CoAtNet-0), and fewer, larger groups otherwise.
- A saliency whose range after the ReLU is below `flat_tol` (no group raised the probability) is
  reported as flat: zeros and `flat=True`, never noise stretched to [0, 1] (the authors return None).
  `cxrdx.explain.explain` turns the flag into a FlatSaliencyWarning.

The blurred baseline and the blends of the non-flat groups run in batches of `batch_size`, so one
explanation costs 1 + ceil((kept groups + 1) / batch_size) forward passes and one backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from cxrdx.errors import CxrdxError

BLUR_KERNEL_224 = 51
BLUR_SIGMA_224 = 50.0
DENOISE_PERCENTILE = 70.0
PROBABILITIES = ("sigmoid", "softmax")


@dataclass
class GroupCamResult:
    saliency: np.ndarray  # (H, W) float32 in [0, 1]; zeros when flat
    flat: bool
    probability: float  # probability of the target finding on the input (sigmoid or softmax)
    scores: np.ndarray  # (G,) signed score of each group; 0 for groups whose map was flat
    forwards: int  # forward passes of the model spent on this explanation


def blur_parameters(height: int, width: int) -> tuple[list[int], list[float]]:
    """Gaussian kernel sizes and sigmas, (x, y) order: 51 and 50 at 224 px, scaled with the input side."""
    kernels, sigmas = [], []
    for side in (width, height):
        scaled = BLUR_KERNEL_224 * side / 224
        kernels.append(max(3, 2 * round((scaled - 1) / 2) + 1))
        sigmas.append(BLUR_SIGMA_224 * side / 224)
    return kernels, sigmas


def blur(x: torch.Tensor) -> torch.Tensor:
    """The Group-CAM baseline: x blurred with the size-scaled Gaussian (reflect padding)."""
    kernels, sigmas = blur_parameters(x.shape[-2], x.shape[-1])
    return gaussian_blur(x, kernel_size=kernels, sigma=sigmas)


def denoise(maps: torch.Tensor, percentile: float = DENOISE_PERCENTILE) -> torch.Tensor:
    """Zero each (h, w) map of (..., h, w) at or below its own `percentile` (linear interpolation)."""
    threshold = torch.quantile(maps.flatten(-2), percentile / 100, dim=-1)[..., None, None]
    return torch.where(maps > threshold, maps, torch.zeros_like(maps))


def group_cam(
    model: nn.Module,
    image: torch.Tensor,
    finding_index: int,
    target_layer: nn.Module,
    groups: int = 32,
    batch_size: int = 32,
    flat_tol: float = 1e-6,
    probability: str = "sigmoid",
) -> GroupCamResult:
    """Group-CAM saliency of `finding_index` for one image (1, C, H, W), on the model's device.

    `probability`: "sigmoid" (multi-label findings, the default) or "softmax" (the published score,
    for single-label models).

    Args:
        model: the network, in eval mode.
        image: the model's input for one image, shaped (1, C, H, W).
        finding_index: the output to explain.
        target_layer: the module whose activations are grouped (e.g. the last stage).
        groups: channel groups (the paper's 32).
        batch_size: masked images per forward pass.
        flat_tol: a map whose range is below this is reported flat (zeros).
        probability: "sigmoid" or "softmax".

    Returns:
        A `GroupCamResult`: the (H, W) saliency in [0, 1], whether it is flat, the target's
        probability, each group's signed score and the number of forward passes.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", num_classes=14, in_chans=1).eval()
        >>> result = group_cam(model, torch.rand(1, 1, 64, 64), 4, model.layer3)
        >>> result.saliency.shape
        (64, 64)
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise CxrdxError(f"group_cam explains one image shaped (1, C, H, W); got {tuple(image.shape)}")
    if groups < 1 or batch_size < 1:
        raise CxrdxError(f"groups and batch_size must be at least 1; got {groups} and {batch_size}")
    if probability not in PROBABILITIES:
        raise CxrdxError(f"probability must be one of {', '.join(PROBABILITIES)}; got {probability!r}")
    to_probability = torch.sigmoid if probability == "sigmoid" else lambda z: torch.softmax(z, dim=-1)
    parameter = next(model.parameters())
    device = parameter.device
    x = image.detach().to(device=device, dtype=parameter.dtype if parameter.is_floating_point() else torch.float32)
    height, width = x.shape[-2:]

    with explaining(model), _capture(target_layer) as captured:
        forwards = 1
        x_grad = x.clone().requires_grad_(True)  # keeps the graph alive when parameters are frozen
        logits = model(x_grad)
        _check_logits(logits, finding_index)
        activations = captured["output"]
        (gradients,) = torch.autograd.grad(logits[0, finding_index], activations)
        input_probability = float(to_probability(logits.detach())[0, finding_index])

    weighted = gradients.mean(dim=(2, 3), keepdim=True) * activations.detach()
    group_sums = torch.cat([g.sum(1, keepdim=True) for g in torch.tensor_split(weighted, groups, dim=1)], dim=1)
    maps = F.interpolate(denoise(F.relu(group_sums)), size=(height, width), mode="bilinear", align_corners=False)[0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    kept = torch.nonzero(span.flatten() > 0).flatten()
    masks = ((maps[kept] - low[kept]) / span[kept]).unsqueeze(1)  # (K, 1, H, W)

    blurred = blur(x)
    probabilities = []
    with explaining(model), torch.no_grad():
        for start in range(0, len(kept) + 1, batch_size):  # item 0 is the blurred baseline
            stop = min(start + batch_size, len(kept) + 1)
            parts = [blurred] if start == 0 else []
            m = masks[max(start - 1, 0) : stop - 1]
            parts.append(x * m + blurred * (1 - m))
            probabilities.append(to_probability(model(torch.cat(parts)))[:, finding_index])
            forwards += 1
    probs = torch.cat(probabilities)
    kept_scores = probs[1:] - probs[0]

    saliency = (kept_scores.view(-1, 1, 1) * masks[:, 0]).sum(0) if len(kept) else torch.zeros_like(x[0, 0])
    saliency = F.relu(saliency)
    scores = torch.zeros(groups, device=device, dtype=kept_scores.dtype)
    scores[kept] = kept_scores
    low, high = saliency.min(), saliency.max()
    flat = bool(high - low <= flat_tol)
    saliency = torch.zeros_like(saliency) if flat else (saliency - low) / (high - low)
    return GroupCamResult(
        saliency=saliency.float().cpu().numpy(),
        flat=flat,
        probability=input_probability,
        scores=scores.float().cpu().numpy(),
        forwards=forwards,
    )


def expected_forwards(kept_groups: int, batch_size: int) -> int:
    """Forward passes of one explanation: the gradient pass, then baseline + blends in batches."""
    return 1 + math.ceil((kept_groups + 1) / batch_size)


def _check_logits(logits: torch.Tensor, finding_index: int) -> None:
    if logits.ndim != 2 or not 0 <= finding_index < logits.shape[1]:
        raise CxrdxError(f"finding index {finding_index} is out of range for model output {tuple(logits.shape)}")


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration; restores mode, flags and any .grad after."""
    training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(training)


@contextlib.contextmanager
def _capture(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record `layer`'s output; the model goes on with a copy, so in-place ops later can't alter it."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise CxrdxError(f"Group-CAM needs a target layer with (N, C, h, w) output; got {shape}")
        captured["output"] = output
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
