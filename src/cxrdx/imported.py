"""Pretrained chest X-ray models from other projects as cxrdx checkpoints (`cxrdx import`).

Sources:
- `xrv:TAG`: torchxrayvision's weights, TAG one of `XRV_TAGS`. Its DenseNet-121 and ResNet-50 are
  torchvision's layouts with a 1-channel stem, which timm's `densenet121` / `resnet50` build under the same
  tensor names; so the checkpoint is an ordinary cxrdx checkpoint of a timm network, and every command works
  on it. The file comes through torchxrayvision's own loader (`xrv.models.get_weights`, which downloads it
  into its cache) or from `weights=FILE`; reading its labels and thresholds needs the `torchxrayvision`
  package (`pip install 'cxrdx[xrv]'`), inference does not.
- `chexnet`: the state dict of the common CheXNet reproductions (e.g. arnoweng/CheXNet): torchvision's
  densenet121 on 3-channel ImageNet-normalised 224 px input, `classifier = Sequential(Linear(1024, 14),
  Sigmoid())`, keys possibly prefixed `module.densenet121.` and with old-style `norm.1` / `conv.1` names.

Outputs: the upstream classifier's rows for the cxrdx findings it predicts, in cxrdx's order, as logits;
cxrdx's sigmoid then gives the upstream probabilities (torchxrayvision's with `apply_sigmoid=True`). The
checkpoint's `findings` lists only those findings; the others are n/a for this model. Its thresholds are
torchxrayvision's `op_threshs` (on the probability scale): a finding is positive exactly when
torchxrayvision's operating-point-normalised output (`op_norm`) is at least 0.5.

Files are read with torch's restricted unpickler (`weights_only=True`), allowing only the module classes a
torchxrayvision DenseNet file holds; anything else is refused unless `trust_pickle`. torchxrayvision
publishes no file hashes, so the file's SHA-256 is recorded in `provenance`, not verified.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import warnings
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrdx import __version__
from cxrdx.checkpoint import Checkpoint
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.preprocess import CXRDX, XRV, XRV_MEAN, XRV_STD

XRV_PREFIX = "xrv:"
XRV_TAGS: tuple[str, ...] = (
    "densenet121-res224-all",
    "densenet121-res224-nih",
    "densenet121-res224-chex",
    "densenet121-res224-mimic_nb",
    "densenet121-res224-mimic_ch",
    "densenet121-res224-pc",
    "densenet121-res224-rsna",
    "resnet50-res512-all",
)
CHEXNET = "chexnet"
SOURCES: tuple[str, ...] = (*(XRV_PREFIX + t for t in XRV_TAGS), CHEXNET)
# CheXNet's outputs, in the order of ChestX-ray14's label list that its reproductions train on
CHEXNET_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True)
class Upstream:
    """What cxrdx needs to know about one upstream model besides its weights."""

    source: str  # as given to `cxrdx import`
    architecture: str  # the timm name of the same network
    labels: list[str]  # the upstream outputs in order; "" for an output that has no name
    thresholds: list[float]  # per output, probability scale (NaN: none published)
    input_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    preprocess: str
    url: str | None = None  # where the upstream loader downloads the file


@dataclass(frozen=True)
class ImportResult:
    checkpoint: Checkpoint
    missing: list[str]  # cxrdx findings the model does not predict (n/a)


def import_model(source: str, weights: str | Path | None = None, trust_pickle: bool = False) -> ImportResult:
    """The cxrdx checkpoint of `source` (one of SOURCES), from `weights` or, for torchxrayvision, its loader."""
    upstream = describe(source)
    if weights is None:
        if upstream.url is None:
            raise CxrdxError(f"{source}: pass its weights file with --weights FILE (cxrdx does not know where to download it)")
        path = _xrv_download(source.removeprefix(XRV_PREFIX))
    else:
        path = Path(weights)
        if not path.is_file():
            raise CxrdxError(f"{path}: weights file not found")
    state = upstream_state(path, source, trust_pickle)
    checkpoint = to_checkpoint(upstream, state, _provenance(upstream, path))
    return ImportResult(checkpoint, [f for f in FINDINGS if f not in checkpoint.findings])


def describe(source: str) -> Upstream:
    """The Upstream of a source name; torchxrayvision's labels and thresholds come from its package."""
    if source == CHEXNET:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return Upstream(
            source,
            "densenet121",
            list(CHEXNET_LABELS),
            [0.5] * len(CHEXNET_LABELS),
            224,
            3,
            list(IMAGENET_DEFAULT_MEAN),
            list(IMAGENET_DEFAULT_STD),
            CXRDX,
        )
    tag = source.removeprefix(XRV_PREFIX)
    if not source.startswith(XRV_PREFIX) or tag not in XRV_TAGS:
        raise CxrdxError(f"unknown model source {source!r}; choose from {', '.join(SOURCES)}")
    entry = _xrv().models.model_urls[tag]
    return Upstream(
        source,
        tag.split("-", 1)[0],
        list(entry["labels"]),
        [float(t) for t in entry["op_threshs"]],
        int(entry["input_resolution"]),
        1,
        list(XRV_MEAN),
        list(XRV_STD),
        XRV,
        entry["weights_url"],
    )


def to_checkpoint(upstream: Upstream, state: dict[str, torch.Tensor], provenance: dict[str, Any]) -> Checkpoint:
    """A checkpoint of `upstream.architecture` whose classifier keeps the rows of the cxrdx findings, in cxrdx order."""
    from cxrdx.models import create_model

    rows = [upstream.labels.index(f) for f in FINDINGS if f in upstream.labels]
    findings = [upstream.labels[r] for r in rows]
    model = create_model(upstream.architecture, num_findings=len(findings), in_chans=upstream.in_chans)
    head: str = (getattr(model, "pretrained_cfg", None) or {})["classifier"]  # "classifier" (DenseNet), "fc" (ResNet)
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise CxrdxError(
            f"{upstream.source}: the weights do not fit timm's {upstream.architecture} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); is it this model's file?"
        )
    state = {k: v[rows] if k.startswith(head + ".") else v for k, v in state.items()}
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise CxrdxError(
                f"{upstream.source}: {key} has shape {tuple(value.shape)}, timm's "
                f"{upstream.architecture} {tuple(target[key].shape)}; is it this model's file?"
            )
    model.load_state_dict(state, strict=False)
    # an output torchxrayvision publishes no threshold for keeps the plain 0.5
    thresholds = [0.5 if math.isnan(upstream.thresholds[r]) else upstream.thresholds[r] for r in rows]
    return Checkpoint(
        model_name=upstream.architecture,
        state_dict=model.state_dict(),
        input_size=upstream.input_size,
        mean=upstream.mean,
        std=upstream.std,
        cache_size=upstream.input_size if upstream.preprocess == CXRDX else None,
        model_kwargs={"in_chans": upstream.in_chans},
        findings=findings,
        thresholds=thresholds,
        preprocess=upstream.preprocess,
        provenance=provenance,
    )


# --- reading upstream files ----------------------------------------------------------------------


def upstream_state(path: Path, source: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an upstream weights file under timm's names: a whole pickled torchxrayvision
    DenseNet, a state dict, or a training checkpoint holding one under "state_dict"."""
    loaded = _load(path, trust_pickle)
    if isinstance(loaded, nn.Module):
        loaded = dict(chain(loaded.named_parameters(), loaded.named_buffers()))
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CxrdxError(f"{path}: expected a model, a state dict of tensors or a checkpoint with a 'state_dict'")
    loaded.pop("op_threshs", None)  # torchxrayvision's thresholds buffer: read from its package instead
    return chexnet_names(loaded) if source == CHEXNET else loaded


def chexnet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CheXNet reproduction's keys under torchvision's (and timm's) densenet121 names: without the
    `module.` (DataParallel) and `densenet121.` prefixes, `norm.1` → `norm1` (old torchvision names),
    `classifier.0` → `classifier` (the Linear before its Sigmoid)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("densenet121.")
        key = re.sub(r"\.(norm|relu|conv)\.(\d)\.", r".\1\2.", key)
        out[re.sub(r"^classifier\.0\.", "classifier.", key)] = value
    return out


def _load(path: Path, trust_pickle: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise CxrdxError(
                f"{path}: the file holds objects other than a torchxrayvision DenseNet's modules and tensors "
                f"({str(exc).splitlines()[-1][:160]}); unpickling it could run code. If you trust its source, "
                "pass --trust-pickle"
            ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CxrdxError(f"{path}: not a readable weights file ({exc.__class__.__name__}: {exc})") from None
    warnings.warn(f"{path}: unpickling with every class allowed because it is trusted; it can run code", stacklevel=3)
    return torch.load(path, map_location="cpu", weights_only=False)


def _allowed_classes() -> list[Any]:
    """The classes of a pickled torchxrayvision DenseNet (when torchxrayvision is installed)."""
    allowed: list[Any] = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Sequential, nn.Linear]
    try:
        from torchxrayvision import models
    except ImportError:
        return allowed
    return allowed + [models.DenseNet, models._DenseBlock, models._DenseLayer, models._Transition]


def _xrv() -> Any:
    try:
        import torchxrayvision
    except ImportError:
        raise CxrdxError(
            "importing torchxrayvision's models needs its package: pip install 'cxrdx[xrv]' "
            "(predicting with an imported checkpoint does not)"
        ) from None
    return torchxrayvision


def _xrv_download(tag: str) -> Path:
    xrv = _xrv()
    url = xrv.models.model_urls[tag]["weights_url"]
    try:
        return Path(xrv.models.get_weights(tag))
    except Exception as exc:  # noqa: BLE001 - requests and OSError surface here
        raise CxrdxError(
            f"could not download the weights of {tag} ({exc.__class__.__name__}: {exc}). "
            f"Offline, fetch {url} elsewhere and pass it with --weights FILE"
        ) from None


def _provenance(upstream: Upstream, path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    provenance: dict[str, Any] = {
        "source": upstream.source,
        "file": path.name,
        "sha256": digest,
        "hash_verified": False,  # neither torchxrayvision nor the CheXNet reproductions publish hashes
        "upstream_labels": upstream.labels,
        "imported_with": f"cxrdx {__version__}",
    }
    if upstream.url is not None:
        provenance |= {"url": upstream.url, "upstream_version": f"torchxrayvision {_xrv().__version__}"}
    return provenance
