"""The checkpoint file: everything `Predictor.from_checkpoint(path)` needs, written atomically."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cxrdx import __version__
from cxrdx.atomic import atomic_path
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

FORMAT = "cxrdx-checkpoint/1"


@dataclass
class Checkpoint:
    """One saved model. `state_dict` holds the EMA weights when EMA was on."""

    model_name: str
    state_dict: dict[str, torch.Tensor]
    input_size: int
    mean: list[float]
    std: list[float]
    cache_size: int | None = None  # side of the prepared cache the model was trained on
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    findings: list[str] = field(default_factory=lambda: list(FINDINGS))
    thresholds: list[float] = field(default_factory=lambda: [0.5] * len(FINDINGS))
    temperature: list[float] | None = None  # per-finding logit temperature, fitted on validation
    config: dict[str, Any] = field(default_factory=dict)
    val_metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    train_state: dict[str, Any] | None = None  # optimizer, scheduler, EMA, RNG...: last.pt only
    cxrdx_version: str = __version__
    format: str = FORMAT

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Create the network and load the weights, in eval mode."""
        from cxrdx.models import create_model

        model = create_model(self.model_name, pretrained="none", num_findings=len(self.findings), **self.model_kwargs)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    payload = {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}  # asdict() would deep-copy every tensor
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CxrdxError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CxrdxError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CxrdxError(f"{path}: not a cxrdx checkpoint (expected format {FORMAT!r})")
    known = Checkpoint.__dataclass_fields__.keys()
    try:
        return Checkpoint(**{k: v for k, v in payload.items() if k in known})
    except TypeError as exc:  # a required field is missing
        raise CxrdxError(f"{path}: incomplete cxrdx checkpoint ({exc})") from None
