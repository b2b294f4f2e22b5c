"""One registry for the saliency methods: Group-CAM (ours) and the grad-cam package's CAM family.

Every method maps (model, image (1, C, H, W), finding index, target layers) to an (H, W) float32
map in [0, 1]. The grad-cam methods score the raw logit of the finding (ClassifierOutputTarget on
the logits, no softmax: the findings are independent sigmoids).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cxrdx.errors import CxrdxError, ParameterError

if TYPE_CHECKING:  # imported when a map is made: naming and checking methods stays light (the CLI, the report)
    import torch
    from torch import nn

Method = Callable[..., np.ndarray]
FLAT_TOL = 1e-6
TITLES = {
    "groupcam": "Group-CAM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM",
    "layercam": "Layer-CAM",
    "hirescam": "HiRes-CAM",
}


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
    from cxrdx.explain.groupcam import group_cam

    return group_cam(model, image, finding_index, target_layers[-1], groups=groups, batch_size=batch_size).saliency


def _grad_cam_family(cam_class: str, quiet: bool = False) -> Method:
    """The grad-cam package's class `cam_class` (imported on first use) as a method."""

    def run(
        model: nn.Module,
        image: torch.Tensor,
        finding_index: int,
        target_layers: Sequence[nn.Module],
        batch_size: int = 32,
        **_: object,
    ) -> np.ndarray:
        import pytorch_grad_cam
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from cxrdx.explain.groupcam import explaining

        device = next(model.parameters()).device
        # A leaf that needs a gradient: the backward reaches the target layer with frozen parameters.
        x = image.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
        with explaining(model):
            _check_finding(model, finding_index)
            cam = getattr(pytorch_grad_cam, cam_class)(model=model, target_layers=list(target_layers))
            cam.batch_size = batch_size  # read by Score-CAM only
            try:
                with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                    maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(finding_index)])
            finally:
                cam.activations_and_grads.release()
        return maps[0].astype(np.float32)

    run.__doc__ = f"{cam_class} from the grad-cam package, on the finding's raw logit."
    return run


METHODS: dict[str, Method] = {
    "groupcam": _groupcam,
    "gradcam": _grad_cam_family("GradCAM"),
    "gradcam++": _grad_cam_family("GradCAMPlusPlus"),
    "xgradcam": _grad_cam_family("XGradCAM"),
    "scorecam": _grad_cam_family("ScoreCAM", quiet=True),  # silences its per-batch tqdm bar
    "eigencam": _grad_cam_family("EigenCAM"),
    "layercam": _grad_cam_family("LayerCAM"),
    "hirescam": _grad_cam_family("HiResCAM"),
}


def check_methods(names: Sequence[str], parameter: str = "method") -> None:
    """ParameterError naming `parameter`, the unknown names and close matches, unless every name is a method."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        close = {c for name in unknown for c in difflib.get_close_matches(name.lower(), list(METHODS), n=2)}
        hint = f"did you mean {' or '.join(sorted(close))}? " if close else ""
        raise ParameterError(parameter, " ".join(unknown), f"unknown method; {hint}choose from {', '.join(METHODS)}")


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
    check_methods([method])
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
