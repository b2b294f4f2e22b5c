"""Typed training configuration: dataclass defaults, YAML presets (built-in or files), `--set` overrides.

The defaults are the released code's hyper-parameters on a randomly initialised ResNet50; the paper's
full recipe, ImageNet weights included, is the built-in preset `paper/resnet50_ours` and its siblings
(`cxrdx train --config paper/resnet50_ours`, listed by `preset_names()`).
"""

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
    allow_missing: bool = False  # True: leave out split images the cache lacks (with a warning) instead of stopping
    input_size: int = 224
    workers: int = 4
    mean: list[float] | None = None  # None: computed on the training split
    std: list[float] | None = None
    autoaugment: bool = True
    hflip: bool = True
    random_erasing: float = 0.5  # probability; the released code's RandomErasing() default
    augment_before_resize: bool = False  # AutoAugment on the cached image (True: the released order, before the resize)


@dataclass
class ModelConfig:
    name: str = "resnet50"
    pretrained: str = "none"  # none | imagenet (timm's tag) | torchvision | path to a weights file
    first_conv: str = "summed"  # summed: RGB kernels summed to one channel | new: a freshly initialised 1-channel conv
    drop_rate: float = 0.5
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm arguments


@dataclass
class LossConfig:
    name: str = "ours"  # bce | wbce | ours | focal | asl
    hyper: dict[str, Any] = field(default_factory=dict)  # e.g. alpha, gamma_neg, p_shift
    # Summed losses: the gradient is that of the sum over this many images (mean image gradient x N);
    # null: over the whole global batch. The released code summed over each process's 150 images and
    # DDP averaged the 4 processes: 150. With Adam's coupled weight decay this sets decay's relative weight.
    sum_over_images: int | None = None


@dataclass
class OptimConfig:
    name: str = "adam"  # adam (the paper: L2 added to the gradient) | adamw (decoupled)
    lr: float = 5e-5  # the OneCycle peak
    weight_decay: float = 0.01  # on weights only: biases and normalisation parameters are exempt
    # Set exactly one of the two. global_batch: images per optimiser step over all processes, spread
    # with the remainder (600 over 4: 150 each; 130 over 4: 33, 33, 32, 32). batch_per_process: images
    # per process per step (the released code's DataLoader batch_size); the global batch is that x processes.
    global_batch: int | None = 600
    batch_per_process: int | None = None
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
    weights: str = "ema"  # ema | raw: the weights selected on `monitor` and saved (both are validated); ema needs ema.enabled
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

    def to_yaml(self, plan: dict[str, Any] | None = None) -> str:
        """The config as RUN/config.yaml holds it, with the engine's `plan` under its own key."""
        values = self.to_dict()
        if plan is not None:
            values["plan"] = plan
        return yaml.safe_dump(values, sort_keys=False)


_CHOICES = {
    ("optim", "name"): ("adam", "adamw"),
    ("runtime", "amp"): ("auto", "off", "bf16", "fp16"),
    ("selection", "monitor"): ("val_loss", "mean_auroc"),
    ("selection", "weights"): ("ema", "raw"),
    ("model", "first_conv"): ("summed", "new"),
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
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
            section, _, name = path.rpartition(".")
            choices = _CHOICES.get((section, name))
            if choices and kwargs[key] not in choices:
                raise CxrdxError(f"{path}: {kwargs[key]!r} is not one of {', '.join(choices)}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested dicts; missing keys keep their defaults. The key `plan`
    (written by save_config beside the config) is ignored. Values are checked by `validate`."""
    values = {k: v for k, v in (values or {}).items() if k != "plan"}
    optim = values.get("optim")
    if isinstance(optim, dict) and "batch_size" in optim:
        raise CxrdxError(
            "optim.batch_size was ambiguous and is replaced: use optim.global_batch=N (images per step over all "
            "processes) or optim.batch_per_process=N (per process, as the released code's DataLoader)"
        )
    config = _build(TrainConfig, values, "")
    _check_consistency(config)
    return validate(config)


def _check_consistency(config: TrainConfig) -> None:
    optim = config.optim
    if (optim.global_batch is None) == (optim.batch_per_process is None):
        given = "both are set" if optim.global_batch is not None else "neither is set"
        raise CxrdxError(
            f"optim.global_batch and optim.batch_per_process: set exactly one ({given}); e.g. "
            "--set optim.batch_per_process=150 --set optim.global_batch=null"
        )
    if config.selection.weights == "ema" and not config.ema.enabled:
        raise CxrdxError("selection.weights=ema needs ema.enabled=true; set selection.weights=raw to select the raw weights")


PRESET_GROUPS: tuple[str, ...] = ("paper", "recommended")


def preset_names() -> list[str]:
    """The built-in presets, as `--config` accepts them: demo, paper/..., recommended/..."""
    root = _preset_root()
    names = [p.stem for p in root.glob("*.yaml")]
    names += [f"{group}/{p.stem}" for group in PRESET_GROUPS for p in (root / group).glob("*.yaml")]
    return sorted(names)


def _preset_root() -> Path:
    return Path(__file__).resolve().parent / "presets"


def resolve_config_path(name: str | Path) -> Path:
    """A YAML file path, or a built-in preset name (`paper/resnet50_ours`, with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    key = str(name).removesuffix(".yaml")
    if key in preset_names():
        return _preset_root() / f"{key}.yaml"
    raise CxrdxError(f"{name}: config file not found, and not a built-in preset ({', '.join(preset_names())})")


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
    """Read a YAML file or built-in preset (or start from the defaults) and apply `--set` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise CxrdxError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise CxrdxError(f"{path}: expected a mapping at the top level")
    try:
        return check_names(config_from_dict(apply_overrides(values, list(overrides or []))))
    except CxrdxError as exc:
        raise CxrdxError(f"{path}: {exc}" if path is not None else str(exc)) from None


def check_names(config: TrainConfig) -> TrainConfig:
    """Raise CxrdxError naming the key, with close matches, for a network timm does not know or a loss cxrdx
    does not have: before a run folder is made, without building either."""
    from cxrdx.losses import check_loss_name
    from cxrdx.models import check_model_name

    for key, check, name in (("model.name", check_model_name, config.model.name), ("loss.name", check_loss_name, config.loss.name)):
        try:
            check(name)
        except CxrdxError as exc:
            raise CxrdxError(f"{key}: {exc}") from None
    return config


def save_config(config: TrainConfig, path: str | Path, plan: dict[str, Any] | None = None) -> Path:
    """Write the config as YAML; `plan` (what the engine derived: processes, batches, steps, warnings)
    is appended under the key `plan`, which `config_from_dict` ignores."""
    return write_text(path, config.to_yaml(plan))


# --- value checks: counts positive, rates finite and in range ------------------------------------
_POSITIVE = (
    "data.input_size",
    "optim.global_batch",
    "optim.batch_per_process",
    "loss.sum_over_images",
    "optim.epochs",
    "optim.div_factor",
    "optim.final_div_factor",
    "optim.grad_clip",
    "runtime.threads",
    "selection.patience",
)
_NONNEGATIVE = ("seed", "data.workers", "optim.lr", "optim.weight_decay")  # lr 0 keeps the weights fixed
_RANGES = {"data.random_erasing": (0.0, 1.0), "model.drop_rate": (0.0, 1.0), "optim.pct_start": (0.0, 1.0), "ema.decay": (0.0, 1.0)}


def validate(config: TrainConfig) -> TrainConfig:
    """Raise CxrdxError naming the key for a value no run can use (zero epochs, lr=nan, global_batch=0...)."""
    from cxrdx.checks import check_nonnegative, check_positive, check_range

    def value(key: str) -> Any:
        node: Any = config
        for part in key.split("."):
            node = getattr(node, part)
        return node

    for key in _POSITIVE:
        if value(key) is not None:
            check_positive(value(key), key)
    for key in _NONNEGATIVE:
        check_nonnegative(value(key), key)
    for key, (low, high) in _RANGES.items():
        check_range(value(key), key, low, high)
    if not 0 < config.optim.pct_start < 1:
        raise CxrdxError(f"optim.pct_start must lie between 0 and 1 (exclusive), got {config.optim.pct_start}")
    for i, mean in enumerate(config.data.mean or []):
        check_range(mean, f"data.mean[{i}]", 0.0, 1.0)
    for i, std in enumerate(config.data.std or []):
        check_positive(std, f"data.std[{i}]")
    return config
