"""ONNX export checked against PyTorch on the spot, and `OnnxPredictor`: the same interface on ONNX Runtime.

The exported graph maps the normalized input (N, 1, H, W) to logits (N, findings); the predictor
applies temperature and sigmoid outside it, as `Predictor` does. Everything inference needs besides
the weights (findings, thresholds, input size, mean / std, cache size) is stored in the model's
metadata_props under "cxrdx", so the .onnx file alone suffices.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrdx.atomic import write_bytes
from cxrdx.checkpoint import Checkpoint, load_checkpoint
from cxrdx.errors import CxrdxError
from cxrdx.jsonsafe import to_json_safe
from cxrdx.predict import BasePredictor, ModelInfo, Predictor
from cxrdx.preprocess import CXRDX, PREPROCESS

METADATA_KEY = "cxrdx"
FORMAT = "cxrdx-onnx/1"
OPSET = 17
TOLERANCE = 1e-4  # max abs difference of probabilities accepted between PyTorch and ONNX Runtime


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float  # probabilities, ONNX Runtime vs PyTorch, on the check batch
    batch: int  # images in the check batch


def export_onnx(
    checkpoint: Checkpoint | str | Path,
    path: str | Path,
    dynamic_batch: bool = True,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    trust_pickle: bool = False,
) -> ExportResult:
    """Export with the TorchScript exporter (opset 17), compare ONNX Runtime with PyTorch on a check
    batch and write the file only when the probabilities agree within `tolerance`."""
    import onnx

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    torch_predictor = Predictor(ckpt, device="cpu")
    size = ckpt.input_size
    buffer = io.BytesIO()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
            torch.onnx.export(
                torch_predictor.model,
                (torch.zeros(1, 1, size, size),),
                buffer,  # type: ignore[arg-type]  # torch writes to a file object too; its annotation names paths only
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types for unsupported operators
        raise CxrdxError(f"{ckpt.model_name}: ONNX export failed ({exc.__class__.__name__}: {exc})") from None
    model = onnx.load_from_string(buffer.getvalue())
    info = torch_predictor.info.to_dict() | {"format": FORMAT}
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(to_json_safe(info, nonfinite="keep"))
    model.producer_name = "cxrdx"
    data = model.SerializeToString()

    check = _check_batch(torch_predictor, batch=3 if dynamic_batch else 1)
    expected = torch_predictor.predict_proba(check)
    got = OnnxPredictor(data).predict_proba(check)
    diff = float(np.max(np.abs(expected - got)))
    if not diff <= tolerance:
        raise CxrdxError(
            f"{ckpt.model_name}: ONNX Runtime disagrees with PyTorch (max abs probability difference "
            f"{diff:.3g} > {tolerance:g}); {path} not written"
        )
    write_bytes(path, data)
    return ExportResult(path=Path(path), max_abs_diff=diff, batch=len(check))


def _check_batch(predictor: BasePredictor, batch: int) -> np.ndarray:
    """Smooth gradients plus noise at the cache size: pixels a radiograph could have, fixed seed."""
    size = predictor.info.image_size
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size)
    images = [np.add.outer(ramp * (i + 1) / batch, ramp[::-1]) / 2 + rng.normal(0, 20, (size, size)) for i in range(batch)]
    return np.clip(np.stack(images), 0, 255).astype(np.uint8)


def model_info(metadata: dict[str, str], name: str) -> ModelInfo:
    """The ModelInfo stored in an ONNX file's metadata by `export_onnx`, checked field by field."""
    from cxrdx.checks import check_positive, check_range

    try:
        info = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        raise CxrdxError(f"{name}: not exported by cxrdx (no readable {METADATA_KEY!r} metadata)") from None
    if not isinstance(info, dict):
        raise CxrdxError(f"{name}: the {METADATA_KEY!r} metadata is not a JSON object")
    if info.pop("format", None) != FORMAT:
        raise CxrdxError(f"{name}: unsupported cxrdx ONNX format (expected {FORMAT!r})")
    fields = {f.name: f for f in dataclasses.fields(ModelInfo)}
    unknown = sorted(set(info) - set(fields))
    lacking = sorted(
        k for k, f in fields.items() if k not in info and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if unknown or lacking:
        parts = ([f"unexpected {', '.join(unknown)}"] if unknown else []) + ([f"missing {', '.join(lacking)}"] if lacking else [])
        what = "; ".join(parts)
        raise CxrdxError(f"{name}: unexpected cxrdx metadata ({what})")
    try:
        findings = info["findings"]
        if not (isinstance(findings, list) and findings and all(isinstance(f, str) for f in findings)):
            raise CxrdxError(f"findings must be a list of names, got {findings!r}")
        if not isinstance(info["model_name"], str):
            raise CxrdxError(f"model_name must be a string, got {info['model_name']!r}")
        per_finding = {"thresholds": info["thresholds"]} | ({} if info.get("temperature") is None else {"temperature": info["temperature"]})
        for key, values in per_finding.items():
            if not isinstance(values, list) or len(values) != len(findings):
                raise CxrdxError(f"{key} must be a list of {len(findings)} numbers, got {values!r}")
        for i, value in enumerate(info["thresholds"]):
            check_range(value, f"thresholds[{i}]", 0.0, 1.0)
        for i, value in enumerate(info.get("temperature") or []):
            check_positive(value, f"temperature[{i}]")
        for key in ("input_size", "cache_size"):
            value = info.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CxrdxError(f"{key} must be a positive whole number, got {value!r}")
        for key in ("mean", "std"):
            if not isinstance(info[key], list) or not info[key]:
                raise CxrdxError(f"{key} must be a list of numbers, got {info[key]!r}")
        for i, value in enumerate(info["mean"]):
            check_range(value, f"mean[{i}]", 0.0, 1.0)
        for i, value in enumerate(info["std"]):
            check_positive(value, f"std[{i}]")
        if info.get("preprocess", CXRDX) not in PREPROCESS:
            raise CxrdxError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {info['preprocess']!r}")
    except CxrdxError as exc:
        raise CxrdxError(f"{name}: invalid cxrdx metadata: {exc}") from None
    return ModelInfo(**info)


class OnnxPredictor(BasePredictor):
    """A cxrdx .onnx file on ONNX Runtime, with `Predictor`'s interface (`.session` instead of `.model`)."""

    backend = "onnxruntime"
    guard_status = "off (ONNX): the exported graph gives no features; use the checkpoint for the content check"

    def __init__(self, model: bytes | str | Path, batch_size: int = 32, providers: list[str] | None = None):
        import onnxruntime as ort

        name = "ONNX model" if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise CxrdxError(f"{model}: ONNX model not found")
        options = ort.SessionOptions()
        # Idle threads sleep instead of spinning: in the service the same cores decode uploads and serve
        # HTTP (measured with benchmarks/serve.py: 1.7x the requests per second of the spinning default).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model),
                options,
                providers=providers or ["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise CxrdxError(f"{name}: not a readable ONNX model ({exc.__class__.__name__}: {exc})") from None
        super().__init__(model_info(self.session.get_modelmeta().custom_metadata_map, name), batch_size)
        outputs = self.session.get_outputs()[0].shape
        if len(outputs) != 2 or outputs[1] != len(self.findings):
            raise CxrdxError(f"{name}: the model outputs shape {outputs}, but its metadata names {len(self.findings)} findings")
        self.input_name = self.session.get_inputs()[0].name
        fixed = self.session.get_inputs()[0].shape[0]
        if isinstance(fixed, int):  # exported without --dynamic-batch: feed exactly that many
            self.batch_size = fixed

    @classmethod
    def from_file(cls, path: str | Path, batch_size: int = 32, providers: list[str] | None = None) -> OnnxPredictor:
        return cls(Path(path), batch_size=batch_size, providers=providers)

    def _logits(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.numpy().astype(np.float32, copy=False)})[0]
