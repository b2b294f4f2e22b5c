"""Typed training configuration: dataclass defaults (the paper's recipe), YAML presets, `--set` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrdx.atomic import write_text
from cxrdx.errors import CxrdxError


@dataclass
class DataConfig:
    cache: str = "cache/chestxray14-256"  # made by `cxrdx prepare`
    caches: list[str] | None = None  # several caches trained on as one (in place of `cache`); NaN labels are masked
    split_file: str | None = None  # None: patient-wise 70/10/20 split of the cache index with `seed`
    input_size: int = 224
    workers: int = 4
    mean: list[float] | None = None  # None: computed on the training split
    std: list[float] | None = None
    autoaugment: bool = True
    hflip: bool = True
    random_erasing: float = 0.25


@dataclass
class ModelConfig:
    name: str = "resnet50"
    pretrained: str = "none"  # none | imagenet | path to a weights file
    drop_rate: float = 0.5
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm arguments


@dataclass
class LossConfig:
    name: str = "ours"  # bce | wbce | ours | focal | asl
    hyper: dict[str, Any] = field(default_factory=dict)  # e.g. alpha, gamma_neg, p_shift


@dataclass
class OptimConfig:
    name: str = "adam"  # adam (the paper: L2 added to the gradient) | adamw (decoupled)
    lr: float = 5e-5  # the OneCycle peak
    weight_decay: float = 0.01  # on weights only: biases and normalisation parameters are exempt
    batch_size: int = 150  # global: split over the DDP ranks
    epochs: int = 100
    pct_start: float = 0.2  # OneCycle warm-up fraction, cosine anneal after it
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    grad_clip: float | None = None  # max global gradient norm


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9997
    warmup: bool = False  # timm's decay warm-up, for short runs


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 or fp16 on CUDA, off on CPU) | off | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    threads: int | None = None  # CPU intra-op threads; None: PyTorch's default (one per core)


@dataclass
class SelectionConfig:
    monitor: str = "val_loss"  # val_loss (min, the paper's rule) | mean_auroc (max)
    patience: int | None = None  # early stopping after this many epochs without improvement


@dataclass
class TrainConfig:
    name: str = "run"
    out: str = "runs/run"  # the run directory
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("optim", "name"): ("adam", "adamw"),
    ("runtime", "amp"): ("auto", "off", "bf16", "fp16"),
    ("selection", "monitor"): ("val_loss", "mean_auroc"),
}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return `value` if it matches `hint` (ints accepted for floats), else raise CxrdxError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except CxrdxError:
                pass
        raise CxrdxError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise CxrdxError(f"{where}: expected {_type_name(hint)}, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CxrdxError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, bool):  # YAML 1.1 reads off / on as booleans
        return "on" if value else "off"
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise CxrdxError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise CxrdxError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise CxrdxError(f"unknown config key {path!r}; valid keys{' in ' + where if where else ''}: {', '.join(valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
            choices = _CHOICES.get(tuple(path.split(".")))
            if choices and kwargs[key] not in choices:
                raise CxrdxError(f"{path}: {kwargs[key]!r} is not one of {', '.join(choices)}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested dicts; missing keys keep their defaults."""
    return _build(TrainConfig, values or {}, "")


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise CxrdxError(f"--set {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `key.sub=value` items (values parsed as YAML) into a nested dict; types are checked later."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise CxrdxError(f"--set {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML preset (or start from the defaults) and apply `--set` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CxrdxError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise CxrdxError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise CxrdxError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(apply_overrides(values, list(overrides or [])))
    except CxrdxError as exc:
        raise CxrdxError(f"{path}: {exc}" if path is not None else str(exc)) from None


def save_config(config: TrainConfig, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
