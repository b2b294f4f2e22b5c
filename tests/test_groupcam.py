"""Group-CAM against a plain transcription of the authors' published code (one blend at a time)."""

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
from cxrdx.explain.groupcam import blur_parameters, denoise, expected_forwards

SIZE, FINDING, GROUPS, LAYER = 224, 1, 32, "layer3"  # 224 px: the published blur (kernel 51, sigma 50)


def published(
    model: nn.Module, x: torch.Tensor, target: int, layer: str, groups: int, probability: str
) -> tuple[np.ndarray | None, list[float | None]]:
    """The authors' Group-CAM written out plainly; `probability` "softmax" is theirs, "sigmoid" our score.

    Returns the saliency (None where they return None) and each group's score (None: group skipped).
    """
    model = copy.deepcopy(model).eval()
    prob = (lambda z: torch.softmax(z, dim=-1)) if probability == "softmax" else torch.sigmoid
    saved = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda module, inputs, output: saved.update(a=output))
    logits = model(x)
    handle.remove()
    activations = saved["a"]
    activations.retain_grad()
    logits[0, target].backward()

    weights = activations.grad.mean(dim=(2, 3))  # Grad-CAM: mean gradient per channel
    weighted = weights[:, :, None, None] * activations.detach()
    blurred = gaussian_blur(x, kernel_size=[51, 51], sigma=[50.0, 50.0])
    h, w = x.shape[-2:]
    saliency = torch.zeros(1, 1, h, w, dtype=x.dtype)
    scores: list[float | None] = []
    with torch.no_grad():
        baseline = prob(model(blurred))[0, target]
        for chunk in weighted.chunk(groups, dim=1):
            m = F.relu(chunk.sum(dim=1, keepdim=True))
            threshold = np.percentile(m.numpy(), 70)  # de-noising on the low-resolution map
            m = torch.where(m > threshold, m, torch.zeros_like(m))
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            if m.max() == m.min():
                scores.append(None)
                continue
            m = (m - m.min()) / (m.max() - m.min())
            blend = x * m + blurred * (1 - m)
            score = prob(model(blend))[0, target] - baseline  # signed
            scores.append(float(score))
            saliency += score * m
    saliency = F.relu(saliency)
    if saliency.min() == saliency.max():
        return None, scores
    saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    return saliency[0, 0].numpy(), scores


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth random fields with noise on the left half: groups that raise and groups that lower p."""
    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.randn(3, 1, 7, 7, generator=g) * 2, size=(SIZE, SIZE), mode="bilinear")
    noise = torch.randn(3, 1, SIZE, SIZE, generator=g)
    noise[..., SIZE // 2 :] = 0
    return smooth + noise


@pytest.fixture(scope="module")
def softmax_model() -> nn.Module:
    """A small single-label classifier in float64: 5 classes, read through a softmax as in the published code."""
    torch.manual_seed(1)
    features = nn.Sequential(nn.Conv2d(1, 64, 8, stride=8), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    return nn.Sequential(features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5)).double().eval()


@pytest.fixture(scope="module")
def reference(cam_model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray | None, list[float | None]]:
    return published(cam_model, images[:1], FINDING, LAYER, GROUPS, "sigmoid")


def _compare(model, images, targets, probability, layer=LAYER):
    """(correlation, max |difference|) of each map against the published transcription.

    Where the published code returns None (no group raised p) ours must report a flat map.
    """
    out, mixed = [], 0
    for x in images:
        for target in targets:
            expected, scores = published(model, x[None], target, layer, GROUPS, probability)
            result = group_cam(model, x[None], target, model.get_submodule(layer), groups=GROUPS, batch_size=5, probability=probability)
            np.testing.assert_allclose(result.scores, [0.0 if s is None else s for s in scores], atol=1e-6)
            assert result.flat == (expected is None)
            if expected is not None:
                mixed += any(s is not None and s > 0 for s in scores) and any(s is not None and s < 0 for s in scores)
                out.append((np.corrcoef(result.saliency.ravel(), expected.ravel())[0, 1], np.abs(result.saliency - expected).max()))
    assert len(out) >= len(images) * len(targets) // 2 and mixed >= 2  # real maps with signed scores to sum
    return out


def test_equals_the_published_code_with_the_sigmoid_score(cam_model, images):
    for correlation, difference in _compare(cam_model, images[:2], [1, 3], "sigmoid"):
        assert correlation >= 0.999
        assert difference < 1e-3  # float32 rounding, amplified where signed scores cancel


def test_equals_the_published_code_on_a_softmax_model(softmax_model, images):
    """The same algorithm: in float64 the batched, vectorised maps equal the plain ones to rounding."""
    for correlation, difference in _compare(softmax_model, images[:1].double(), [0, 1, 2], "softmax", "0.2"):
        assert correlation == pytest.approx(1.0, abs=1e-12)
        assert difference < 1e-6  # the map comes back as float32


def test_denoise_zeroes_each_map_at_or_below_its_70th_percentile():
    maps = torch.stack([torch.arange(10.0).view(2, 5), torch.arange(10.0).flip(0).view(2, 5) * 2])
    # numpy's linear 70th percentile of 0..9 is 6.3: 7, 8 and 9 stay; 0, 2, ..., 18 gives 12.6
    expected = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 7, 8, 9]], dtype=torch.float32)
    np.testing.assert_array_equal(denoise(maps)[0], expected)
    np.testing.assert_array_equal(denoise(maps)[1], torch.tensor([[18, 16, 14, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32))
    assert float(np.percentile(np.arange(10.0), 70)) == pytest.approx(6.3)


def test_negative_scores_count_before_the_final_relu(cam_model, images, reference):
    """The published map sums the signed scores; ReLU'ing each score instead changes the map."""
    _, scores = reference
    assert any(s is not None and s < 0 for s in scores)
    result = group_cam(cam_model, images[:1], FINDING, cam_model.get_submodule(LAYER), groups=GROUPS)
    assert (result.scores < 0).any()


@pytest.mark.parametrize("batch_size", [4, 64])
def test_forward_passes_are_as_claimed(cam_model, images, reference, monkeypatch, batch_size):
    kept = sum(s is not None for s in reference[1])
    calls = {"forward": 0, "grad": 0}
    handle = cam_model.register_forward_hook(lambda *args: calls.__setitem__("forward", calls["forward"] + 1))
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        result = group_cam(cam_model, images[:1], FINDING, cam_model.get_submodule(LAYER), groups=GROUPS, batch_size=batch_size)
    finally:
        handle.remove()
    assert calls == {"forward": expected_forwards(kept, batch_size), "grad": 1}
    assert result.forwards == 1 + math.ceil((kept + 1) / batch_size)
    np.testing.assert_allclose(result.saliency, reference[0], atol=1e-5)  # any batch size, same map


def test_probability_is_the_chosen_one(cam_model, images):
    x = images[:1]
    with torch.no_grad():
        logits = cam_model(x)
    layer = cam_model.get_submodule(LAYER)
    assert group_cam(cam_model, x, 3, layer).probability == pytest.approx(float(torch.sigmoid(logits[0, 3])), abs=1e-6)
    softmax = group_cam(cam_model, x, 3, layer, probability="softmax").probability
    assert softmax == pytest.approx(float(torch.softmax(logits, -1)[0, 3]), abs=1e-6)


def test_map_has_input_size_and_lies_in_unit_range(cam_model):
    x = torch.randn(1, 1, 48, 80, generator=torch.Generator().manual_seed(2))
    result = group_cam(cam_model, x, 0, cam_model.layer3, groups=8, batch_size=16)
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
    assert saliency.shape == cam_image.shape[-2:] and not saliency.any()


def test_unknown_probability_is_a_user_error(cam_model, cam_image):
    from cxrdx.errors import CxrdxError

    with pytest.raises(CxrdxError, match="probability"):
        group_cam(cam_model, cam_image, FINDING, cam_model.layer4, probability="logit")


def test_blur_scales_with_the_input():
    assert blur_parameters(224, 224) == ([51, 51], [50.0, 50.0])
    kernels, sigmas = blur_parameters(64, 448)
    assert kernels == [101, 15] and sigmas == pytest.approx([100.0, 50 * 64 / 224])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_map_on_cuda(cam_model, images, reference):
    gpu = copy.deepcopy(cam_model).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = group_cam(gpu, images[:1], FINDING, gpu.get_submodule(LAYER), groups=GROUPS, batch_size=7)
    np.testing.assert_allclose(result.saliency, reference[0], atol=1e-3)
