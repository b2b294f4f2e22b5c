"""Group-CAM against a plain, one-blend-at-a-time transcription of its four steps."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from cxrdx.explain import FlatSaliencyWarning, explain, group_cam
from cxrdx.explain.groupcam import blur_parameters, expected_forwards

SIZE, FINDING, GROUPS, LAYER = 64, 0, 32, "layer3"


def transcription(model: nn.Module, x: torch.Tensor, finding: int, layer: str, groups: int) -> tuple[np.ndarray, list[float]]:
    """Steps 1-4 of the issue, written out plainly: one blend and one forward at a time."""
    model = copy.deepcopy(model).eval()
    saved = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda module, inputs, output: saved.update(a=output))
    logits = model(x)
    handle.remove()
    activations = saved["a"]
    activations.retain_grad()
    logits[0, finding].backward()

    # 1. Grad-CAM weights (mean gradient per channel) times activations
    weights = activations.grad.mean(dim=(2, 3))
    weighted = weights[:, :, None, None] * activations.detach()
    # blur: kernel 51 and sigma 50 at 224 px, scaled to 64 px -> kernel 15 (odd), sigma 50 * 64 / 224
    sigma = 50 * SIZE / 224
    blurred = gaussian_blur(x, kernel_size=[15, 15], sigma=[sigma, sigma])
    saliency = torch.zeros(SIZE, SIZE)
    scores = []
    with torch.no_grad():
        baseline = torch.sigmoid(model(blurred))[0, finding]
        per_group = weighted.shape[1] // groups
        for g in range(groups):
            # 2. sum the group, ReLU, bilinear upsample, min-max normalise
            m = weighted[:, g * per_group : (g + 1) * per_group].sum(dim=1, keepdim=True)
            m = F.relu(m)
            m = F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            if m.max() == m.min():
                scores.append(0.0)
                continue
            m = (m - m.min()) / (m.max() - m.min())
            # 3. blend with the blurred image; score = ReLU(sigmoid p(blend) - p(blurred))
            blend = x * m + blurred * (1 - m)
            p = torch.sigmoid(model(blend))[0, finding]
            score = F.relu(p - baseline)
            scores.append(float(score))
            # 4. saliency = sum of score x map
            saliency += score * m[0, 0]
    saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    return saliency.numpy(), scores


@pytest.fixture(scope="module")
def reference(cam_model: nn.Module, cam_image: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    return transcription(cam_model, cam_image, FINDING, LAYER, GROUPS)


def test_equals_unbatched_transcription(cam_model, cam_image, reference):
    expected, scores = reference
    assert sum(s > 0 for s in scores) >= 3  # a real map, not a degenerate case
    result = group_cam(cam_model, cam_image, FINDING, cam_model.get_submodule(LAYER), groups=GROUPS, batch_size=5)
    assert not result.flat
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)
    np.testing.assert_allclose(result.saliency, expected, atol=1e-5)
    with torch.no_grad():
        probability = float(torch.sigmoid(cam_model(cam_image))[0, FINDING])
    assert result.probability == pytest.approx(probability, abs=1e-6)


@pytest.mark.parametrize("batch_size", [4, 64])
def test_forward_passes_are_as_claimed(cam_model, cam_image, reference, monkeypatch, batch_size):
    kept = sum(1 for s in transcription_kept(cam_model, cam_image))
    calls = {"forward": 0, "grad": 0}
    handle = cam_model.register_forward_hook(lambda *args: calls.__setitem__("forward", calls["forward"] + 1))
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        result = group_cam(cam_model, cam_image, FINDING, cam_model.get_submodule(LAYER), groups=GROUPS, batch_size=batch_size)
    finally:
        handle.remove()
    assert calls == {"forward": expected_forwards(kept, batch_size), "grad": 1}
    assert result.forwards == 1 + math.ceil((kept + 1) / batch_size)
    np.testing.assert_allclose(result.saliency, reference[0], atol=1e-5)  # any batch size, same map


def transcription_kept(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Groups whose map is not flat, counted the plain way."""
    model = copy.deepcopy(model).eval()
    saved = {}
    handle = model.get_submodule(LAYER).register_forward_hook(lambda module, inputs, output: saved.update(a=output))
    logits = model(x)
    handle.remove()
    (grads,) = torch.autograd.grad(logits[0, FINDING], saved["a"])
    weighted = grads.mean(dim=(2, 3), keepdim=True) * saved["a"].detach()
    per_group = weighted.shape[1] // GROUPS
    sums = [F.relu(weighted[:, g * per_group : (g + 1) * per_group].sum(1)) for g in range(GROUPS)]
    return [g for g, s in enumerate(sums) if s.max() > s.min()]


def test_map_has_input_size_and_lies_in_unit_range(cam_model):
    x = torch.randn(1, 1, 48, 80, generator=torch.Generator().manual_seed(2))
    result = group_cam(cam_model, x, FINDING, cam_model.layer4, groups=8, batch_size=16)
    assert result.saliency.shape == (48, 80) and result.saliency.dtype == np.float32
    assert result.saliency.min() == 0.0 and result.saliency.max() == pytest.approx(1.0)


def test_leaves_the_model_as_it_was(cam_model, cam_image):
    trained = copy.deepcopy(cam_model).train()
    marker = [torch.full_like(p, 7.0) for p in trained.parameters()]
    for p, g in zip(trained.parameters(), marker):
        p.grad = g
    result = group_cam(trained, cam_image, FINDING, trained.get_submodule(LAYER), groups=GROUPS, batch_size=64)
    assert trained.training
    assert all(p.requires_grad and p.grad is g for p, g in zip(trained.parameters(), marker))
    assert all(not m._forward_hooks for m in trained.modules())
    eval_result = group_cam(cam_model, cam_image, FINDING, cam_model.get_submodule(LAYER), groups=GROUPS, batch_size=64)
    np.testing.assert_allclose(result.saliency, eval_result.saliency, atol=1e-6)  # ran in eval mode


def test_flat_map_is_reported_not_stretched(cam_model, cam_image):
    silent = copy.deepcopy(cam_model)
    nn.init.zeros_(silent.fc.weight)  # the logit ignores the image: no gradient, no group
    result = group_cam(silent, cam_image, FINDING, silent.layer4, groups=8)
    assert result.flat and not result.saliency.any() and not result.scores.any()
    with pytest.warns(FlatSaliencyWarning):
        saliency = explain(silent, cam_image, FINDING, target_layers=[silent.layer4], groups=8)
    assert saliency.shape == (SIZE, SIZE) and not saliency.any()


def test_blur_scales_with_the_input():
    assert blur_parameters(224, 224) == ([51, 51], [50.0, 50.0])
    kernels, sigmas = blur_parameters(64, 448)
    assert kernels == [101, 15] and sigmas == pytest.approx([100.0, 50 * 64 / 224])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_map_on_cuda(cam_model, cam_image, reference):
    gpu = copy.deepcopy(cam_model).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = group_cam(gpu, cam_image, FINDING, gpu.get_submodule(LAYER), groups=GROUPS, batch_size=7)
    np.testing.assert_allclose(result.saliency, reference[0], atol=1e-3)
