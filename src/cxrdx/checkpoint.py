"""The checkpoint file: everything `Predictor.from_checkpoint(path)` needs, written atomically.

Format `cxrdx-checkpoint/2` is a safetensors file: the weights are its tensors and its string map
`__metadata__` holds two entries, `format` ("cxrdx-checkpoint/2") and `checkpoint`, one JSON object
with every other `Checkpoint` field. The input guard (`cxrdx.ood`), when fitted, adds the tensors
`guard.mean`, `guard.projection` and `guard.precision` and the header field `guard`; a file
without them loads with the guard off. Loading it never unpickles. The resume state of a run
(optimizer, scheduler, RNG...) is a separate file that only `train --resume` reads, with
`torch.load(weights_only=True)`: see `save_train_state`.

Format `cxrdx-checkpoint/1` (earlier versions) was a `torch.save` pickle: unpickling a file can run any
code in it, so it loads only with `trust_pickle=True` (`--trust-pickle`), with a warning.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cxrdx import __version__
from cxrdx.atomic import atomic_path
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.jsonsafe import to_json_safe
from cxrdx.ood import TENSOR_PREFIX, OodGuard, guard_from_parts
from cxrdx.preprocess import PREPROCESS

FORMAT = "cxrdx-checkpoint/2"
PICKLE_FORMAT = "cxrdx-checkpoint/1"
TRAIN_STATE_FORMAT = "cxrdx-train-state/1"


class PickleCheckpointWarning(UserWarning):
    """An old pickle checkpoint was unpickled because the caller trusts it."""


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
    cxrdx_version: str = __version__
    preprocess: str = "cxrdx"  # the input pipeline, one of cxrdx.preprocess.PREPROCESS
    provenance: dict[str, Any] = field(default_factory=dict)  # where imported weights came from (cxrdx.imported)
    guard: OodGuard | None = None  # the input guard's content check (cxrdx.ood); None: guard off

    def training_caches(self) -> list[str]:
        """The prepared cache(s) the model was trained on (its config's data.caches, else data.cache); [] for none."""
        data = self.config.get("data") if isinstance(self.config, dict) else None
        if not isinstance(data, dict):
            return []
        return [str(c) for c in (data.get("caches") or ([data["cache"]] if data.get("cache") else []))]

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Create the network and load the weights, in eval mode."""
        from cxrdx.models import create_model

        model = create_model(self.model_name, pretrained="none", num_findings=len(self.findings), **self.model_kwargs)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


# --- the JSON header: every field but the weights, with the JSON type it must have ----------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


_GUARD_NUMBERS = ("threshold", "percentile", "val_acceptance", "train_images", "val_images", "shrinkage")
_HEADER: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_name": (lambda v: isinstance(v, str), "a string"),
    "input_size": (_is_int, "an integer"),
    "mean": (_is_numbers, "a list of numbers"),
    "std": (_is_numbers, "a list of numbers"),
    "cache_size": (lambda v: v is None or _is_int(v), "an integer or null"),
    "model_kwargs": (lambda v: isinstance(v, dict), "an object"),
    "findings": (lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v), "a list of strings"),
    "thresholds": (_is_numbers, "a list of numbers"),
    "temperature": (lambda v: v is None or _is_numbers(v), "a list of numbers or null"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "val_metrics": (lambda v: isinstance(v, dict), "an object"),
    "epoch": (_is_int, "an integer"),
    "cxrdx_version": (lambda v: isinstance(v, str), "a string"),
    "preprocess": (lambda v: v in PREPROCESS, f"one of {', '.join(PREPROCESS)}"),
    "provenance": (lambda v: isinstance(v, dict), "an object"),
    "guard": (
        lambda v: v is None or (isinstance(v, dict) and all(_is_number(v.get(k)) for k in _GUARD_NUMBERS)),
        f"null or an object with the numbers {', '.join(_GUARD_NUMBERS)}",
    ),
}
_REQUIRED = ("model_name", "input_size", "mean", "std")


def _check_header(header: Any, path: Path) -> dict[str, Any]:
    """The header's fields after checking their types; unknown keys (a newer minor writer) are ignored."""
    if not isinstance(header, dict):
        raise CxrdxError(f"{path}: the checkpoint header is not a JSON object")
    missing = [name for name in _REQUIRED if name not in header]
    if missing:
        raise CxrdxError(f"{path}: incomplete cxrdx checkpoint (no {', '.join(missing)} in its header)")
    values = {name: header[name] for name in _HEADER if name in header}
    for name, value in values.items():
        valid, expected = _HEADER[name]
        if not valid(value):
            raise CxrdxError(f"{path}: checkpoint header field {name!r} must be {expected}, not {json.dumps(value)[:60]}")
    findings = values.get("findings", FINDINGS)
    for name in ("thresholds", "temperature"):
        if values.get(name) is not None and len(values[name]) != len(findings):
            raise CxrdxError(f"{path}: checkpoint header field {name!r} has {len(values[name])} values for {len(findings)} findings")
    return values


# --- save / load -----------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write format cxrdx-checkpoint/2 atomically: a crash mid-write leaves the previous file intact."""
    from safetensors.torch import save_file

    path = Path(path)
    guard = checkpoint.guard
    fields_ = {name: getattr(checkpoint, name) for name in _HEADER if name != "guard"}
    header = to_json_safe({**fields_, "guard": guard and guard.header()}, nonfinite="keep")
    _check_header(header, path)  # never write a file that load_checkpoint would refuse
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint.state_dict.items()}
    if any(k.startswith(TENSOR_PREFIX) for k in tensors):
        raise CxrdxError(f"{path}: model weights named {TENSOR_PREFIX}* would clash with the input guard's tensors")
    tensors.update(guard.tensors() if guard is not None else {})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "checkpoint": json.dumps(header)})
    return path


def _kind(path: Path) -> str:
    """'safetensors', 'pickle' (a torch.save file, zip or legacy) or 'unknown', from the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors first: its 8-byte little-endian header length may itself begin with 0x80, pickle's PROTO
    if len(head) == 9 and head[8:9] == b"{":  # neither a zip nor a legacy torch.save has "{" there
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CxrdxError(f"{path}: checkpoint not found")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", trust_pickle: bool = False) -> Checkpoint:
    """Read a cxrdx-checkpoint/2 file; an old pickle file (cxrdx-checkpoint/1) only with `trust_pickle`."""
    path = Path(path)
    _require_file(path)
    kind = _kind(path)
    if kind == "pickle":
        return _from_pickle(_unpickle(path, trust_pickle), path)
    if kind == "unknown":
        raise CxrdxError(f"{path}: not a cxrdx checkpoint (neither safetensors nor an old torch.save file)")
    return _from_safetensors(path, map_location)


def _from_safetensors(path: Path, device: str | torch.device) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CxrdxError(
                    f"{path}: a safetensors file but not a cxrdx checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})"
                )
            try:
                header = json.loads(metadata.get("checkpoint", ""))
            except json.JSONDecodeError as exc:
                raise CxrdxError(f"{path}: the checkpoint header is not valid JSON ({exc})") from None
            values = _check_header(header, path)
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except CxrdxError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError for a truncated or damaged file
        raise CxrdxError(f"{path}: damaged checkpoint file ({exc})") from None
    guard_tensors = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(TENSOR_PREFIX)]}
    values["guard"] = _guard(values.get("guard"), guard_tensors, path)
    return Checkpoint(state_dict=state_dict, **values)


def _guard(header: dict[str, Any] | None, tensors: dict[str, torch.Tensor], path: Path) -> OodGuard | None:
    """The input guard stored as header fields + `guard.*` tensors, None when the file has none."""
    if header is None:
        return None
    try:
        return guard_from_parts(header, tensors)
    except (KeyError, ValueError) as exc:
        raise CxrdxError(f"{path}: damaged input guard in the checkpoint ({exc.__class__.__name__}: {exc})") from None


def convert_checkpoint(source: str | Path, out: str | Path, trust_pickle: bool = False) -> Checkpoint:
    """Rewrite `source` (an old pickle checkpoint, or already the current format) as cxrdx-checkpoint/2 at `out`.
    An old last.pt's resume state is not carried over: resume such a run with `train --resume --trust-pickle`."""
    checkpoint = load_checkpoint(source, trust_pickle=trust_pickle)
    save_checkpoint(out, checkpoint)
    return checkpoint


def _unpickle(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """The payload of an old `torch.save` checkpoint, refused unless the caller trusts the file."""
    if not trust_pickle:
        raise CxrdxError(
            f"{path}: an old pickle checkpoint ({PICKLE_FORMAT}); unpickling can run code hidden in the file, so it is "
            f"refused. If you trust its source, convert it once with 'cxrdx convert {path} --out NEW.pt --trust-pickle' "
            "(or pass --trust-pickle to this command)"
        )
    warnings.warn(
        f"{path}: unpickling an old {PICKLE_FORMAT} checkpoint because it is trusted; it can run code. "
        "Convert it once with 'cxrdx convert'",
        PickleCheckpointWarning,
        stacklevel=3,
    )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CxrdxError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != PICKLE_FORMAT:
        raise CxrdxError(f"{path}: not a cxrdx checkpoint (expected format {PICKLE_FORMAT!r})")
    return payload


def _from_pickle(payload: dict[str, Any], path: Path) -> Checkpoint:
    known = {f.name for f in fields(Checkpoint)}
    try:
        return Checkpoint(**{k: v for k, v in payload.items() if k in known})
    except TypeError as exc:  # a required field is missing
        raise CxrdxError(f"{path}: incomplete cxrdx checkpoint ({exc})") from None


# --- resume state: only `train --resume` reads it ------------------------------------------------


def save_train_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a run's resume state atomically. `state` must hold only tensors and plain Python values
    (dict, list, tuple, str, int, float, bool, None), so that loading needs no unpickling of classes."""
    with atomic_path(path) as tmp:
        torch.save({"format": TRAIN_STATE_FORMAT, **state}, tmp)
    return Path(path)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """A file of `save_train_state`, read with weights_only=True: tensors and plain values, no classes."""
    path = Path(path)
    _require_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a class outside the plain types: not a file save_train_state wrote
        state = None
    except Exception as exc:
        raise CxrdxError(f"{path}: damaged resume state file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CxrdxError(f"{path}: not a cxrdx resume state file (expected format {TRAIN_STATE_FORMAT!r})")
    return state


def pickle_train_state(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The resume state inside an old pickle last.pt (cxrdx-checkpoint/1), only with `trust_pickle`."""
    path = Path(path)
    _require_file(path)
    if _kind(path) != "pickle":
        raise CxrdxError(f"{path}: holds no resume state, and the {TRAIN_STATE_FORMAT} file beside it is missing")
    state = _unpickle(path, trust_pickle).get("train_state")
    if not isinstance(state, dict):
        raise CxrdxError(f"{path}: holds no resume state (only a last.pt has one)")
    return state
