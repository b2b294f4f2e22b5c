"""Networks through timm: the factory, local or hub weights, CAM target layers, parameter and FLOP counts.

The paper's three backbones are `resnet50`, `efficientnet_b5` and `coatnet_0_rw_224`; any other timm
name works the same way. Every model takes `in_chans` (1 for radiographs) and ends with dropout
(`drop_rate`, 0.5 in the paper) and one logit per finding.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

PAPER_MODELS: tuple[str, ...] = ("resnet50", "efficientnet_b5", "coatnet_0_rw_224")
WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")


def create_model(
    name: str,
    pretrained: str | Path = "none",
    num_findings: int = len(FINDINGS),
    in_chans: int = 1,
    drop_rate: float = 0.5,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm network with `num_findings` logits and dropout before the classifier.

    `pretrained`: "none" (random init), "imagenet" (timm's hub weights; needs the internet or a
    filled cache) or a path to a local weights file (timm or torchvision state dict), whose first
    convolution is adapted to `in_chans` the way timm does and whose classifier is dropped when
    its shape differs.
    """
    _check_name(name)
    kwargs = dict(num_classes=num_findings, in_chans=in_chans, drop_rate=drop_rate, **timm_kwargs)
    choice = str(pretrained)
    if choice == "imagenet":
        return _create_imagenet(name, kwargs)
    path = None if choice == "none" else _weights_path(choice)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:  # an option this architecture does not take, e.g. img_size for a CNN
        raise CxrdxError(f"model {name!r}: {exc}") from None
    if path is not None:
        report = load_weights(model, path)
        if report.missing or report.unexpected or report.mismatched:
            warnings.warn(f"{name} from {path}: {report.summary()}", stacklevel=2)
    return model


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
    raise CxrdxError(f"unknown model {name!r}{hint}")


def _create_imagenet(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # offline: urllib, huggingface_hub and OSError all surface here
        raise CxrdxError(
            f"could not fetch the ImageNet weights of {name} ({exc.__class__.__name__}: {exc}). "
            "They are downloaded from the timm / Hugging Face hub and need the internet; offline, "
            "pass a local weights file instead: pretrained=PATH (.pth, .pt, .bin or .safetensors, "
            "a timm or torchvision state dict of the same architecture). Set HF_HUB_OFFLINE=1 to fail at once "
            "instead of after the hub's retries"
        ) from None


@dataclass
class LoadReport:
    """What `load_weights` did with each key of the file."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not loaded (dropped classifier aside)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # shapes differ (not the classifier)
    dropped_classifier: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first conv summed / repeated to in_chans

    def summary(self, limit: int = 5) -> str:
        def names(keys: list[str]) -> str:
            more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = [f"{len(self.loaded)} tensors loaded"]
        for label, keys in (
            ("adapted to the input channels", self.adapted),
            ("classifier dropped", self.dropped_classifier),
            ("missing from the file", self.missing),
            ("unexpected in the file", self.unexpected),
            ("shape mismatch, skipped", self.mismatched),
        ):
            if keys:
                parts.append(f"{label}: {names(keys)}")
        return "; ".join(parts)


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local timm / torchvision state dict into a timm `model`, non-strictly, and say what matched.

    The file may wrap the weights under "state_dict" or "model" (timm's loader unwraps them and a
    DDP "module." prefix). The first convolution is adapted to the model's input channels with
    timm's `adapt_input_conv` (RGB kernels summed for one channel); classifier tensors whose shape
    differs are dropped. Raises CxrdxError when the file is missing, unreadable or matches nothing.
    """
    path = _weights_path(path)
    try:
        source = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as exc:  # torch / safetensors raise many types for a damaged file
        raise CxrdxError(f"{path}: not a readable weights file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise CxrdxError(f"{path}: expected a state dict of tensors (possibly under 'state_dict' or 'model')")

    target = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first_convs = _as_tuple(cfg.get("first_conv"))
    classifiers = _as_tuple(cfg.get("classifier"))
    report, accepted = LoadReport(), {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape != want and value.ndim == 4 and key.rsplit(".", 1)[0] in first_convs:
            value = adapt_input_conv(want[1], value.float()).to(value.dtype)
            report.adapted.append(key)
        if value.shape == want:
            accepted[key] = value
        elif any(key.startswith(c + ".") for c in classifiers):
            report.dropped_classifier.append(key)
        else:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(want)}")
    if not any(not k.endswith("num_batches_tracked") for k in accepted):
        raise CxrdxError(
            f"{path}: no tensor matches {type(model).__name__} ({len(source)} in the file, e.g. "
            f"{', '.join(list(source)[:3])}); is it a state dict of this architecture?"
        )
    model.load_state_dict(accepted, strict=False)
    report.loaded = list(accepted)
    dropped = set(report.dropped_classifier)
    report.missing = [k for k in target if k not in accepted and k not in dropped]
    return report


def _weights_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CxrdxError(
            f"{path}: pretrained must be 'none', 'imagenet' or a weights file ending in {', '.join(WEIGHT_SUFFIXES)}"
        )
    if not path.is_file():
        raise CxrdxError(f"{path}: weights file not found")
    return path


def _as_tuple(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def cam_target_layers(model: nn.Module, input_size: int | None = None) -> list[nn.Module]:
    """The layer whose activations and gradients a CAM method reads: the last spatial feature map.

    ResNet: `layer4`. EfficientNet: `bn2`, i.e. `conv_head` followed by its batch norm and SiLU,
    the exact map the global pool averages (the raw `conv_head` output is pre-activation, the
    last block has 4x fewer channels before the head's expansion). CoAtNet / MaxViT: the last
    stage. Any other timm model: the last module of a probe forward pass (at `input_size`, or the
    model's default size) that outputs an N*C*H*W map with H*W > 1, preferring timm's
    `feature_info`. Token-only models (ViT) raise CxrdxError: they need a reshape transform.
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.maxxvit import MaxxVit
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        return [model.layer4]
    if isinstance(model, EfficientNet):
        return [model.bn2]
    if isinstance(model, MaxxVit):
        return [model.stages[-1]]
    return [_last_spatial_module(model, input_size)]


def _last_spatial_module(model: nn.Module, input_size: int | None) -> nn.Module:
    shapes: dict[str, torch.Size] = {}
    order: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = output.shape
                order.append(name)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        _probe(model, _input_shape(model, input_size))
    finally:
        for handle in handles:
            handle.remove()

    def spatial(name: str, channels: int | None = None) -> bool:
        shape = shapes.get(name)
        return (
            shape is not None
            and len(shape) == 4
            and shape[2] * shape[3] > 1
            and (channels is None or shape[1] == channels)
        )

    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        if spatial(last["module"], last.get("num_chs")):
            return model.get_submodule(last["module"])
        raise CxrdxError(
            f"{type(model).__name__}: its last features ({last['module']}, shape "
            f"{tuple(shapes.get(last['module'], ()))}) are not an N*C*H*W map; CAMs for token or "
            "channels-last models need a reshape transform, which cxrdx does not provide"
        )
    candidates = [n for n in order if spatial(n)]
    if not candidates:
        raise CxrdxError(f"{type(model).__name__}: no module outputs a spatial N*C*H*W feature map")
    return model.get_submodule(candidates[-1])


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: int | tuple[int, int, int]) -> int:
    """FLOPs of one forward pass on one image, by PyTorch's FlopCounterMode.

    FlopCounterMode counts matrix products and convolutions (incl. attention) at 2 FLOPs per
    multiply-accumulate; normalisations and activations are not counted. MACs = FLOPs / 2, the unit
    of most papers' "FLOPs" columns (the paper's Table 2 included). `input_size` is H (square, the
    model's input channels) or (C, H, W).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _probe(model, _input_shape(model, input_size))
    return int(counter.get_total_flops())


def _input_shape(model: nn.Module, input_size: int | tuple[int, int, int] | None) -> tuple[int, int, int]:
    if isinstance(input_size, (tuple, list)):
        return tuple(input_size)  # type: ignore[return-value]
    side = input_size or (getattr(model, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))[-1]
    return (_input_channels(model), side, side)


def _input_channels(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    for name in _as_tuple(cfg.get("first_conv")):
        try:
            return model.get_submodule(name).in_channels
        except AttributeError:
            continue
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise CxrdxError(f"{type(model).__name__}: cannot tell its input channels; pass input_size as (C, H, W)")
    return first.in_channels


def _probe(model: nn.Module, shape: tuple[int, int, int]) -> None:
    """One forward pass on a zero image in eval mode, without gradients; restores the mode."""
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)


def model_table(
    names: list[str] | tuple[str, ...] = PAPER_MODELS,
    input_size: int = 224,
    in_chans: int = 1,
    num_findings: int = len(FINDINGS),
) -> list[dict[str, Any]]:
    """The paper's Table 2 for `names`: parameters, MACs and FLOPs at `input_size`, resolution C*H*W.

    Models with a fixed input size (CoAtNet, ViT) are built for `input_size`; a model that cannot
    run at that size gets `macs`/`flops` None and the reason in `note`.
    """
    rows = []
    for name in names:
        model = create_model(name, num_findings=num_findings, in_chans=in_chans)
        if model.pretrained_cfg.get("fixed_input_size") and model.pretrained_cfg["input_size"][-1] != input_size:
            try:
                model = create_model(name, num_findings=num_findings, in_chans=in_chans, img_size=input_size)
            except Exception:  # noqa: BLE001 - a model that rejects img_size is measured as built
                pass
        row: dict[str, Any] = {
            "model": name,
            "params": count_params(model),
            "macs": None,
            "flops": None,
            "resolution": f"{in_chans}*{input_size}*{input_size}",
            "note": "",
        }
        try:
            flops = count_flops(model, (in_chans, input_size, input_size))
            row["macs"], row["flops"] = flops // 2, flops
        except Exception as exc:  # noqa: BLE001 - e.g. CoAtNet at a size not divisible by 32
            row["note"] = f"does not run at {input_size}x{input_size}: {exc.__class__.__name__}: {exc}"
        rows.append(row)
    return rows
