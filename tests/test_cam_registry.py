"""The CAM registry on tiny models: every method runs, target layers, errors, and `cxrdx explain`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxrdx.errors import CxrdxError
from cxrdx.explain import METHODS, TITLES, check_methods, default_target_layers, explain

SIZE = 64


def test_registry_holds_groupcam_and_the_grad_cam_family():
    assert set(METHODS) == {"groupcam", "gradcam", "gradcam++", "xgradcam", "scorecam", "eigencam", "layercam", "hirescam"}
    assert list(TITLES) == list(METHODS) and TITLES["gradcam++"] == "Grad-CAM++"


def test_method_names_are_checked_with_close_matches_and_the_parameter_named():
    check_methods(["groupcam", "hirescam"])
    with pytest.raises(
        CxrdxError, match=r"^methods gradcm rise: unknown method; did you mean gradcam or xgradcam\? choose from groupcam, "
    ):
        check_methods(["gradcm", "groupcam", "rise"], "methods")


def test_naming_the_methods_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, cxrdx.explain.registry, cxrdx.report.tables; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_an_input_sized_map_in_unit_range(cam_model, cam_image, method):
    saliency = explain(cam_model, cam_image, 0, method=method)
    assert saliency.shape == (SIZE, SIZE) and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    assert saliency.max() > 0.5  # a real map, not the flat fallback


def test_gradcam_targets_the_raw_logit_on_the_given_layer(cam_model, cam_image):
    reference_model = copy.deepcopy(cam_model)
    with GradCAM(model=reference_model, target_layers=[reference_model.layer3]) as cam:
        expected = cam(input_tensor=cam_image.clone(), targets=[ClassifierOutputTarget(0)])[0]
    got = explain(cam_model, cam_image, 0, method="gradcam", target_layers=[cam_model.layer3])
    assert got.max() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, explain(cam_model, cam_image, 0, method="gradcam"), atol=1e-2)  # the override matters


def test_default_target_layers_are_the_last_spatial_stage(cam_model, cam_image):
    assert default_target_layers(cam_model, cam_image) == [cam_model.layer4]
    efficientnet = timm.create_model("test_efficientnet", num_classes=14, in_chans=1, pretrained=False)
    assert default_target_layers(efficientnet, cam_image) == [efficientnet.bn2]


def test_no_gradient_or_hook_is_left_behind(cam_model, cam_image):
    trained = copy.deepcopy(cam_model).train()
    marker = [torch.full_like(p, 3.0) for p in trained.parameters()]
    for p, g in zip(trained.parameters(), marker):
        p.grad = g
    explain(trained, cam_image, 1, method="gradcam++")
    assert trained.training
    assert all(p.requires_grad and p.grad is g for p, g in zip(trained.parameters(), marker))
    assert all(not m._forward_hooks and not m._backward_hooks for m in trained.modules())


def test_bad_requests_are_user_errors(cam_model, cam_image):
    with pytest.raises(CxrdxError, match="unknown method"):
        explain(cam_model, cam_image, 0, method="rise")
    with pytest.raises(CxrdxError, match=r"\(1, C, H, W\)"):
        explain(cam_model, cam_image[0], 0)
    with pytest.raises(CxrdxError, match="out of range"):
        explain(cam_model, cam_image, 14, method="gradcam")
    with pytest.raises(CxrdxError, match="out of range"):
        explain(cam_model, cam_image, 14, method="groupcam")
