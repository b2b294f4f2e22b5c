"""Networks through timm: the factory, local or hub weights, CAM target layers, parameter and FLOP counts.

The paper's three backbones are `resnet50`, `efficientnet_b5` and `coatnet_0_rw_224`; any other timm
name works the same way. Every model takes `in_chans` (1 for radiographs) and ends with dropout
(`drop_rate`, 0.5 in the paper) and one logit per finding.

Pretrained weights come from timm's hub ("imagenet": timm's default tag, or the tag in the name,
e.g. `resnet50.tv_in1k`), from torchvision ("torchvision": its IMAGENET1K_V1 weights of resnet50 or
efficientnet_b5, converted exactly into timm's module names), or from a local file. The released code
of the paper loaded torchvision's ResNet50 and EfficientNet-b5 and timm's CoAtNet-0-rw: `PAPER_WEIGHTS`.
"""

from __future__ import annotations

import difflib
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

PAPER_MODELS: tuple[str, ...] = ("resnet50", "efficientnet_b5", "coatnet_0_rw_224")
PAPER_WEIGHTS: dict[str, str] = {"resnet50": "torchvision", "efficientnet_b5": "torchvision", "coatnet_0_rw_224": "imagenet"}
# The released code gave ResNet50 and EfficientNet-b5 a new 1-channel stem; CoAtNet's came from timm (summed RGB).
PAPER_FIRST_CONV: dict[str, str] = {"resnet50": "new", "efficientnet_b5": "new", "coatnet_0_rw_224": "summed"}
# torchvision's weights for a timm architecture; timm options that make the architecture torchvision's:
# its EfficientNet-b5 uses batch-norm eps 1e-3, momentum 0.01 and stochastic depth 0.2 (timm: 1e-5, 0.1, 0).
TORCHVISION_WEIGHTS: dict[str, str] = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "efficientnet_b5": "EfficientNet_B5_Weights.IMAGENET1K_V1",
}
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {"efficientnet_b5": {"bn_eps": 1e-3, "bn_momentum": 0.01, "drop_path_rate": 0.2}}
WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")
FIRST_CONV: tuple[str, ...] = ("summed", "new")


def create_model(
    name: str,
    pretrained: str | Path = "none",
    num_findings: int = len(FINDINGS),
    in_chans: int = 1,
    drop_rate: float = 0.5,
    first_conv: str = "summed",
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm network with `num_findings` logits and dropout before the classifier.

    `pretrained`: "none" (random init), "imagenet" (timm's hub weights: the default tag, or the tag
    in `name`), "torchvision" (torchvision's ImageNet weights of resnet50 / efficientnet_b5) or a
    path to a local weights file (timm or torchvision state dict); the classifier is dropped when
    its shape differs. `first_conv` says what the first convolution gets from RGB weights:
    "summed" (the RGB kernels summed to `in_chans`, as timm does) or "new" (a freshly initialised
    convolution, and for EfficientNet its stem batch norm too: the released code for ResNet50 and
    EfficientNet-b5).

    Args:
        name: a timm model name, optionally with a weights tag (`resnet50.tv_in1k`).
        pretrained: "none", "imagenet", "torchvision" or the path of a local weights file.
        num_findings: outputs (logits, no sigmoid).
        in_chans: input channels (1 for grey radiographs).
        drop_rate: dropout before the classifier (the paper: 0.5).
        first_conv: "summed" or "new", see above.
        **timm_kwargs: passed to `timm.create_model` (e.g. `img_size` for fixed-size models).

    Returns:
        The network in training mode.

    Example:
        >>> import torch
        >>> model = create_model("resnet18", num_findings=14).eval()
        >>> model(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 14])
    """
    check_model_name(name)
    if first_conv not in FIRST_CONV:
        raise CxrdxError(f"first_conv={first_conv!r}: expected one of {', '.join(FIRST_CONV)}")
    kwargs = dict(num_classes=num_findings, in_chans=in_chans, drop_rate=drop_rate, **timm_kwargs)
    choice = str(pretrained)
    if choice == "imagenet":
        model = _create_imagenet(name, kwargs)
    else:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:  # an option this architecture does not take, e.g. img_size for a CNN
            raise CxrdxError(f"model {name!r}: {exc}") from None
        if choice == "torchvision":
            _check_torchvision_kwargs(name, timm_kwargs)
            report = load_state(model, _torchvision_state(name), f"torchvision {TORCHVISION_WEIGHTS[_base(name)]}")
        elif choice != "none":
            report = load_weights(model, _weights_path(choice))
        if choice != "none" and (report.missing or report.unexpected or report.mismatched):
            warnings.warn(f"{name} from {choice}: {report.summary()}", stacklevel=2)
    if choice != "none" and first_conv == "new":
        _new_stem(model)
    return model


def _base(name: str) -> str:
    return name.split(".", 1)[0]


def weights_source(name: str, pretrained: str) -> str:
    """Where `pretrained` weights of `name` come from, e.g. 'timm coatnet_0_rw_224.sw_in1k'."""
    if pretrained == "none":
        return "none (random init)"
    if pretrained == "torchvision":
        return f"torchvision {TORCHVISION_WEIGHTS.get(_base(name), '(none for this model)')}"
    if pretrained == "imagenet":
        cfg = timm.models.get_pretrained_cfg(name)
        tag = (cfg.hf_hub_id or "").removeprefix("timm/") if cfg is not None else ""
        return f"timm {tag or name}"
    return f"file {pretrained}"


def _check_torchvision_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    base = _base(name)
    if base not in TORCHVISION_WEIGHTS:
        raise CxrdxError(
            f"pretrained=torchvision: cxrdx converts torchvision's weights of {', '.join(TORCHVISION_WEIGHTS)}, "
            f"not {name}; use pretrained=imagenet (timm's) or a weights file"
        )
    for key, value in TORCHVISION_KWARGS.get(base, {}).items():
        if key == "bn_eps" and kwargs.get(key) != value:  # changes the outputs; drop_path_rate only training
            raise CxrdxError(
                f"{name} with torchvision's weights needs torchvision's batch norm: set model.kwargs.{key}={value} (timm's default differs)"
            )


def _torchvision_state(name: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_weight

    weights = get_weight(TORCHVISION_WEIGHTS[_base(name)])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        _require_network(weights.url, name)
    try:
        return weights.get_state_dict(progress=True)
    except Exception as exc:  # noqa: BLE001 - urllib and OSError surface here
        raise _offline_error(name, f"{exc.__class__.__name__}: {exc}") from None


def _new_stem(model: nn.Module) -> None:
    """Re-initialise the first convolution (PyTorch's default init, as a new nn.Conv2d) and, for
    EfficientNet, the stem's batch norm: what the released code did after loading the weights."""
    from timm.models.efficientnet import EfficientNet

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    for conv in _as_tuple(cfg.get("first_conv"))[:1]:
        stem: Any = model.get_submodule(conv)  # a Conv2d, found by name
        stem.reset_parameters()
    if isinstance(model, EfficientNet):
        model.bn1.reset_parameters()


def check_model_name(name: str) -> None:
    """CxrdxError with close matches unless timm knows the network `name` (a pretrained tag after a dot allowed);
    builds nothing."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
    raise CxrdxError(f"unknown model {name!r}{hint}")


def _create_imagenet(name: str, kwargs: dict[str, Any]) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id and not _in_hub_cache(hub_id):
        _require_network(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), name)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # offline: urllib, huggingface_hub and OSError all surface here
        raise _offline_error(name, f"{exc.__class__.__name__}: {exc}") from None


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def _require_network(url: str, name: str) -> None:
    """Fail at once, not after a downloader's retries, when the host of `url` cannot be reached."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=5).close()
    except OSError as exc:
        raise _offline_error(name, f"cannot reach {parsed.hostname}: {exc}") from None


def _offline_error(name: str, reason: str) -> CxrdxError:
    return CxrdxError(
        f"could not fetch the ImageNet weights of {name} ({reason}). Offline, train from scratch with "
        "--set model.pretrained=none, or pass a local weights file: --set model.pretrained=PATH "
        "(.pth, .pt, .bin or .safetensors; a timm or torchvision state dict of the same architecture)"
    )


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
    DDP "module." prefix). See `load_state` for the rest. Raises CxrdxError when the file is
    missing, unreadable or matches nothing.
    """
    path = _weights_path(path)
    try:
        source = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as exc:  # torch / safetensors raise many types for a damaged file
        raise CxrdxError(f"{path}: not a readable weights file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise CxrdxError(f"{path}: expected a state dict of tensors (possibly under 'state_dict' or 'model')")
    return load_state(model, source, str(path))


def load_state(model: nn.Module, source: dict[str, torch.Tensor], label: str) -> LoadReport:
    """Load the state dict `source` into a timm `model`, non-strictly. A torchvision EfficientNet state
    dict is first renamed to timm's modules (`torchvision_efficientnet_to_timm`). The first convolution
    is adapted to the model's input channels with timm's `adapt_input_conv` (RGB kernels summed for one
    channel); classifier tensors whose shape differs are dropped. `label` names the source in errors."""
    from timm.models.efficientnet import EfficientNet

    if isinstance(model, EfficientNet) and "features.0.0.weight" in source:
        source = torchvision_efficientnet_to_timm(source, model)
        if abs(model.bn1.eps - 1e-3) > 1e-12:
            warnings.warn(
                f"{label}: torchvision's EfficientNet uses batch-norm eps 1e-3, this model {model.bn1.eps:g}; "
                "set model.kwargs.bn_eps=0.001 for its exact outputs",
                stacklevel=3,
            )
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
            f"{label}: no tensor matches {type(model).__name__} ({len(source)} in the file, e.g. "
            f"{', '.join(list(source)[:3])}); is it a state dict of this architecture?"
        )
    model.load_state_dict(accepted, strict=False)
    report.loaded = list(accepted)
    dropped = set(report.dropped_classifier)
    report.missing = [k for k in target if k not in accepted and k not in dropped]
    return report


def torchvision_efficientnet_to_timm(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's EfficientNet state dict under timm's names. Both list the same tensors in the same
    order (stem conv + bn, each block's convs, batch norms and squeeze-excitation, head conv + bn,
    classifier), so the n-th tensor of one is the n-th of the other; shapes are checked, except the
    first convolution's input channels and the classifier, which `load_state` adapts or drops."""
    mine = [k for k in model.state_dict()]
    theirs = list(source)
    if len(mine) != len(theirs):
        raise CxrdxError(
            f"torchvision EfficientNet weights: {len(theirs)} tensors for the {len(mine)} of timm's "
            f"{getattr(model, 'default_cfg', {}).get('architecture', 'model')}; is it the same variant?"
        )
    target = model.state_dict()
    for index, (k_tv, k_timm) in enumerate(zip(theirs, mine)):
        a, b = source[k_tv].shape, target[k_timm].shape
        if a != b and index > 0 and not k_timm.startswith("classifier."):
            raise CxrdxError(f"torchvision EfficientNet weights: {k_tv} {tuple(a)} does not fit timm's {k_timm} {tuple(b)}")
    return {k_timm: source[k_tv] for k_tv, k_timm in zip(theirs, mine)}


def _weights_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CxrdxError(f"{path}: pretrained must be 'none', 'imagenet' or a weights file ending in {', '.join(WEIGHT_SUFFIXES)}")
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
        return [model.get_submodule("layer4")]
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
        return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1 and (channels is None or shape[1] == channels)

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
            conv: Any = model.get_submodule(name)
            return int(conv.in_channels)
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
    """The paper's Table 2 for `names`: parameters, MACs and FLOPs at `input_size`, resolution C*H*W, and
    the ImageNet weights and first layer the paper presets load (`weights`, `first_conv`).

    Models with a fixed input size (CoAtNet, ViT) are built for `input_size`; a model that cannot
    run at that size gets `macs`/`flops` None and the reason in `note`.
    """
    rows = []
    for name in names:
        model = create_model(name, num_findings=num_findings, in_chans=in_chans)
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})
        if cfg.get("fixed_input_size") and cfg["input_size"][-1] != input_size:
            try:
                model = create_model(name, num_findings=num_findings, in_chans=in_chans, img_size=input_size)
            except Exception:  # noqa: BLE001 - a model that rejects img_size is measured as built
                pass
        row: dict[str, Any] = {
            "model": name,
            "weights": weights_source(name, PAPER_WEIGHTS.get(name, "imagenet")),
            "first_conv": PAPER_FIRST_CONV.get(name, "summed"),
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
