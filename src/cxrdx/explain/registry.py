"""One registry for the saliency methods: Group-CAM (ours) and the grad-cam package's CAM family.

Every method maps (model, image (1, C, H, W), finding index, target layers) to an (H, W) float32
map in [0, 1]. The grad-cam methods score the raw logit of the finding (ClassifierOutputTarget on
the logits, no softmax: the findings are independent sigmoids).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_grad_cam as gc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cxrdx.errors import CxrdxError
from cxrdx.explain.groupcam import explaining, group_cam

Method = Callable[..., np.ndarray]
FLAT_TOL = 1e-6


class FlatSaliencyWarning(UserWarning):
    """A saliency map without structure (e.g. no Group-CAM group raised the probability)."""


def _groupcam(
    model: nn.Module,
    image: torch.Tensor,
    finding_index: int,
    target_layers: Sequence[nn.Module],
    groups: int = 32,
    batch_size: int = 32,
) -> np.ndarray:
    return group_cam(model, image, finding_index, target_layers[-1], groups=groups, batch_size=batch_size).saliency


def _grad_cam_family(cam_class: type[gc.GradCAM], quiet: bool = False) -> Method:
    def run(
        model: nn.Module,
        image: torch.Tensor,
        finding_index: int,
        target_layers: Sequence[nn.Module],
        batch_size: int = 32,
        **_: object,
    ) -> np.ndarray:
        device = next(model.parameters()).device
        # A leaf that needs a gradient: the backward reaches the target layer with frozen parameters.
        x = image.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
        with explaining(model):
            _check_finding(model, finding_index)
            cam = cam_class(model=model, target_layers=list(target_layers))
            cam.batch_size = batch_size  # read by Score-CAM only
            try:
                with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                    maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(finding_index)])
            finally:
                cam.activations_and_grads.release()
        return maps[0].astype(np.float32)

    run.__doc__ = f"{cam_class.__name__} from the grad-cam package, on the finding's raw logit."
    return run


METHODS: dict[str, Method] = {
    "groupcam": _groupcam,
    "gradcam": _grad_cam_family(gc.GradCAM),
    "gradcam++": _grad_cam_family(gc.GradCAMPlusPlus),
    "xgradcam": _grad_cam_family(gc.XGradCAM),
    "scorecam": _grad_cam_family(gc.ScoreCAM, quiet=True),  # silences its per-batch tqdm bar
    "eigencam": _grad_cam_family(gc.EigenCAM),
    "layercam": _grad_cam_family(gc.LayerCAM),
    "hirescam": _grad_cam_family(gc.HiResCAM),
}


def explain(
    model: nn.Module,
    image: torch.Tensor,
    finding_index: int,
    method: str = "groupcam",
    target_layers: Sequence[nn.Module] | None = None,
    **options: object,
) -> np.ndarray:
    """Saliency map (H, W) in [0, 1] of one finding for one image (1, C, H, W).

    `target_layers` default to `cxrdx.models.cam_target_layers(model)`. A flat map (no structure)
    comes back as zeros with a FlatSaliencyWarning. `options` go to the method (groups,
    batch_size).
    """
    if method not in METHODS:
        raise CxrdxError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}")
    if image.ndim != 4 or image.shape[0] != 1:
        raise CxrdxError(f"explain takes one image shaped (1, C, H, W); got {tuple(image.shape)}")
    layers = list(target_layers) if target_layers is not None else default_target_layers(model, image)
    saliency = METHODS[method](model, image, finding_index, layers, **options)
    if float(saliency.max() - saliency.min()) <= FLAT_TOL:
        warnings.warn(f"{method} map of finding {finding_index} is flat (no structure)", FlatSaliencyWarning, stacklevel=2)
        return np.zeros(saliency.shape, np.float32)
    return np.clip(saliency, 0.0, 1.0)


def default_target_layers(model: nn.Module, image: torch.Tensor) -> list[nn.Module]:
    """cxrdx.models.cam_target_layers: the last spatial feature map (probed at the image's size when needed)."""
    from cxrdx.models import cam_target_layers

    return list(cam_target_layers(model, input_size=int(image.shape[-1])))


def _check_finding(model: nn.Module, finding_index: int) -> None:
    outputs = getattr(model, "num_classes", None)
    if isinstance(outputs, int) and not 0 <= finding_index < outputs:
        raise CxrdxError(f"finding index {finding_index} is out of range for a model with {outputs} outputs")
