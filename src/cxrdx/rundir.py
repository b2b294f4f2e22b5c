"""The run folder and the evaluation folder: their file names and one typed reader and writer per file.

    RUN/config.yaml            the training config (TrainConfig)
    RUN/split.csv              the split the run used: Image Index,split
    RUN/metrics.jsonl          one EpochRow per line
    RUN/curves.png             loss and validation AUROC per epoch
    RUN/card.md, RUN/card.json the model card (cxrdx.card): written by training, enriched by evaluate
    RUN/checkpoints/best.pt    the selected weights; last.pt the resumable state
    RUN/eval/                  an evaluation folder: predictions.csv, labels.csv, metrics.json (EvalMetrics),
                               report.md, roc.png, reliability.png
    RUN/explain/               FINDING/IMAGE.METHOD.png (+ .npy) and explanations.csv
    RUN/localize/              localization.json (Localization), localization.md, localization_records.csv

Training, evaluation and the explain commands write these files through the write_* functions here;
the report, the demo and `compare` read them through the read_* functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrdx.atomic import write_text
from cxrdx.config import TrainConfig, config_from_dict, save_config
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

CONFIG, SPLIT, EPOCHS, CURVES = "config.yaml", "split.csv", "metrics.jsonl", "curves.png"
CHECKPOINTS, BEST, LAST, TRAIN_STATE = "checkpoints", "best.pt", "last.pt", "train_state.pt"
EVAL, EXPLAIN, LOCALIZE = "eval", "explain", "localize"
PREDICTIONS, LABELS, METRICS, EVAL_REPORT = "predictions.csv", "labels.csv", "metrics.json", "report.md"
ROC, RELIABILITY = "roc.png", "reliability.png"
EXPLANATIONS = "explanations.csv"
CARD_MD, CARD_JSON = "card.md", "card.json"
LOCALIZATION, LOCALIZATION_MD, LOCALIZATION_RECORDS = "localization.json", "localization.md", "localization_records.csv"
EXPLANATION_COLUMNS = ["Image Index", "Finding", "probability", "flat", "png", "npy", "error"]


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def split_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SPLIT


def epochs_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EPOCHS


def curves_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CURVES


def best_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / BEST


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST


def external_eval_dir(run_dir: str | Path, name: str) -> Path:
    """RUN/eval-NAME: `cxrdx evaluate` of the run's model on another dataset (an external set)."""
    return Path(run_dir) / f"{EVAL}-{name}"


def external_evals(run_dir: str | Path) -> list[tuple[str, Path]]:
    """(name, folder) of every external evaluation of a run that holds predictions, sorted by name."""
    found = sorted(Path(run_dir).glob(f"{EVAL}-*"))
    return [(p.name.removeprefix(f"{EVAL}-"), p) for p in found if (p / PREDICTIONS).is_file()]


def train_state_path(run_dir: str | Path) -> Path:
    """The resume state beside last.pt (written by the engine through cxrdx.checkpoint.save_train_state)."""
    return Path(run_dir) / CHECKPOINTS / TRAIN_STATE


def run_dir_of(checkpoint: str | Path) -> Path:
    """RUN for RUN/checkpoints/best.pt, else the checkpoint's folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


# --- config.yaml ---------------------------------------------------------------------------------


def write_config(run_dir: str | Path, config: TrainConfig, plan: dict[str, Any] | None = None) -> Path:
    return save_config(config, config_path(run_dir), plan)


def read_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was trained with (RUN/config.yaml)."""
    import yaml

    path = config_path(run_dir)
    if not path.is_file():
        raise CxrdxError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CxrdxError(f"{path}: not readable YAML ({exc})") from None
    if not isinstance(values, dict):
        raise CxrdxError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(values)
    except CxrdxError as exc:
        raise CxrdxError(f"{path}: {exc}") from None


# --- metrics.jsonl -------------------------------------------------------------------------------


@dataclass
class EpochRow:
    """One line of RUN/metrics.jsonl. Losses are per image; the AUROCs are validation means over findings
    (`*_auroc`: per finding). `val_*` are the weights that `weights` names (raw or ema), which select
    and fill best.pt; `raw_val_*` and `ema_val_*` are each set of weights (None: not validated).

    `extra` keeps the keys this version does not know, so that rows written by a newer version survive
    a resume unchanged."""

    epoch: int
    step: int | None = None
    lr: float | None = None
    train_loss: float | None = None
    weights: str | None = None  # None in rows of earlier versions: val_* were the raw weights
    val_loss: float | None = None
    val_mean_auroc: float | None = None
    val_auroc: dict[str, float | None] | None = None
    raw_val_loss: float | None = None
    raw_val_mean_auroc: float | None = None
    raw_val_auroc: dict[str, float | None] | None = None
    ema_val_loss: float | None = None
    ema_val_mean_auroc: float | None = None
    ema_val_auroc: dict[str, float | None] | None = None
    best: bool = False
    images_per_s: float | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def selected_auroc(self) -> float | None:
        """The validation mean AUROC of the weights that selection looked at."""
        if self.weights is None and self.ema_val_mean_auroc is not None:  # rows of earlier versions selected on EMA
            return self.ema_val_mean_auroc
        return self.val_mean_auroc

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EpochRow:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in values.items() if k in known}, extra={k: v for k, v in values.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**values, **self.extra}


def write_epochs(run_dir: str | Path, rows: Sequence[EpochRow]) -> Path:
    return write_text(epochs_path(run_dir), "".join(json.dumps(row.to_dict()) + "\n" for row in rows))


def read_epochs(run_dir: str | Path) -> list[EpochRow]:
    """The epoch rows in file order; [] without metrics.jsonl. Lines without an epoch number are skipped."""
    path = epochs_path(run_dir)
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise CxrdxError(f"{path}: not JSON lines ({exc})") from None
    return [EpochRow.from_dict(r) for r in rows if isinstance(r, dict) and "epoch" in r]


# --- evaluation folder: predictions.csv, labels.csv ----------------------------------------------


def write_predictions(path: str | Path, names: Sequence[str], probs: np.ndarray, findings: Sequence[str] = FINDINGS) -> Path:
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(findings))
    frame.insert(0, "Image Index", list(names))
    return write_text(path, frame.to_csv(index=False))  # full precision: compare reproduces evaluate exactly


def read_predictions(path: str | Path, findings: Sequence[str] = FINDINGS) -> pd.DataFrame:
    """A predictions CSV -> DataFrame indexed by Image Index with one float column per finding."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise CxrdxError(f"{path}: predictions file not found") from None
    except (ValueError, OSError) as exc:
        raise CxrdxError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in ("Image Index", *findings) if c not in frame.columns]
    if missing:
        raise CxrdxError(f"{path}: missing column(s) {', '.join(missing)}; expected 'Image Index' and one probability column per finding")
    if frame["Image Index"].duplicated().any():
        raise CxrdxError(f"{path}: image {frame['Image Index'][frame['Image Index'].duplicated()].iloc[0]!r} is listed twice")
    values = frame[list(findings)].apply(pd.to_numeric, errors="coerce")
    bad = ~(values.notna() & (values >= 0) & (values <= 1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CxrdxError(f"{path}: line {row + 2} ({frame['Image Index'].iloc[row]}): probabilities must be numbers in [0, 1]")
    return values.set_axis(frame["Image Index"].astype(str)).astype(np.float64)


META_COLUMNS = ("Patient Gender", "Patient Age", "View Position", "dataset")  # what subgroups are drawn from


def write_labels(
    path: str | Path, names: Sequence[str], labels: np.ndarray, patients: np.ndarray | None, meta: pd.DataFrame | None = None
) -> Path:
    """Labels as 1, 0 or blank (not labelled), with the patient and subgroup columns when given."""
    frame = pd.DataFrame(np.asarray(labels, dtype=np.float64), columns=list(FINDINGS)).astype("Int8")
    frame.insert(0, "Image Index", list(names))
    if patients is not None:
        frame.insert(1, "Patient ID", np.asarray(patients))
    if meta is not None:
        frame = pd.concat([frame, meta.reset_index(drop=True)], axis=1)
    return write_text(path, frame.to_csv(index=False))


def read_labels(path: str | Path) -> pd.DataFrame:
    """Labels from evaluate's labels.csv or from a Data_Entry table -> DataFrame indexed by Image Index:
    the 14 findings (float: 1, 0, NaN = not labelled), then 'Patient ID' and the subgroup columns
    (`META_COLUMNS`) the file has."""
    path = Path(path)
    if not path.is_file():
        raise CxrdxError(f"{path}: labels file not found")
    head = pd.read_csv(path, nrows=0).columns
    if "Finding Labels" in head:
        from cxrdx.data.metadata import read_metadata

        table = read_metadata(path)
    else:
        table = pd.read_csv(path, dtype={"Image Index": str})
        missing = [c for c in ("Image Index", *FINDINGS) if c not in table.columns]
        if missing:
            raise CxrdxError(f"{path}: missing column(s) {', '.join(missing)}; expected evaluate's labels.csv or a Data_Entry table")
        if not (table[list(FINDINGS)].isin((0, 1)) | table[list(FINDINGS)].isna()).all().all():
            raise CxrdxError(f"{path}: label columns must hold 0, 1 or blank (not labelled)")
    columns = list(FINDINGS) + [c for c in ("Patient ID", *META_COLUMNS) if c in table.columns]
    return table.set_index(table["Image Index"].astype(str))[columns]


# --- evaluation folder: metrics.json -------------------------------------------------------------


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass
class EvalMetrics:
    """An evaluation folder's metrics.json: the settings `cxrdx evaluate` ran with and one model's results
    (`metrics.Evaluation.to_dict()`); `expert_labels` with --expert-labels. Empty when there is none."""

    settings: dict[str, Any] = field(default_factory=dict)
    overall: dict[str, Any] = field(default_factory=dict)
    per_finding: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    expert_labels: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def thresholds(self) -> np.ndarray | None:
        """The per-finding decision thresholds; None when absent or unusable."""
        try:
            values = np.array([float(self.per_finding[f]["threshold"]) for f in FINDINGS])
        except (KeyError, TypeError, ValueError):
            return None
        return values if np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all() else None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalMetrics:
        """Tolerant: a part of the wrong type reads as missing."""
        notes = values.get("notes")
        expert = values.get("expert_labels")
        known = {"settings", "overall", "per_finding", "notes", "expert_labels"}
        return cls(
            settings=_mapping(values.get("settings")),
            overall=_mapping(values.get("overall")),
            per_finding={k: v for k, v in _mapping(values.get("per_finding")).items()},
            notes=[str(n) for n in notes] if isinstance(notes, list) else [],
            expert_labels=dict(expert) if isinstance(expert, Mapping) else None,
            extra={k: v for k, v in values.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        values = {"settings": self.settings, "overall": self.overall, "per_finding": self.per_finding, "notes": self.notes}
        if self.expert_labels is not None:
            values["expert_labels"] = self.expert_labels
        return {**values, **self.extra}


def write_eval_metrics(folder: str | Path, result: EvalMetrics) -> Path:
    return write_text(Path(folder) / METRICS, json.dumps(result.to_dict(), indent=1) + "\n")


def read_eval_metrics(folder: str | Path) -> EvalMetrics:
    """An evaluation folder's metrics.json; empty when missing or unreadable."""
    try:
        values = json.loads((Path(folder) / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return EvalMetrics()
    return EvalMetrics.from_dict(values) if isinstance(values, dict) else EvalMetrics()


# --- card.md, card.json ----------------------------------------------------------------------------


def card_paths(out: str | Path) -> tuple[Path, Path]:
    """(Markdown, JSON) of a model card: OUT/card.md and OUT/card.json for a folder, else FILE.md and FILE.json."""
    out = Path(out)
    if out.suffix.lower() not in (".md", ".json"):
        out = out / CARD_MD
    return out.with_suffix(".md"), out.with_suffix(".json")


def write_card(out: str | Path, markdown: str, values: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a model card's Markdown and JSON (each atomically, the JSON last)."""
    md, js = card_paths(out)
    write_text(md, markdown)
    write_text(js, json.dumps(values, indent=1, allow_nan=False) + "\n")
    return md, js


def read_card(out: str | Path) -> dict[str, Any] | None:
    """A model card's JSON (a folder such as RUN, or a card file), or None when there is none or it is unreadable."""
    try:
        values = json.loads(card_paths(out)[1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


# --- explain/explanations.csv --------------------------------------------------------------------


def write_explanations(folder: str | Path, table: pd.DataFrame) -> Path:
    """explanations.csv: one row per map (EXPLANATION_COLUMNS)."""
    return write_text(Path(folder) / EXPLANATIONS, table.to_csv(index=False))


def read_explanations(folder: str | Path) -> pd.DataFrame:
    """explanations.csv (Image Index, Finding, probability, png, ...), or, without a usable one, the panels
    found as FINDING/IMAGE.METHOD.png with an unknown probability."""
    folder = Path(folder)
    table = folder / EXPLANATIONS
    if table.is_file():
        try:
            frame = pd.read_csv(table)
        except (ValueError, OSError):
            frame = pd.DataFrame()
        if {"Image Index", "Finding", "probability", "png"} <= set(frame.columns):
            return frame
    rows = [
        {"Image Index": p.name.split(".")[0], "Finding": p.parent.name, "probability": np.nan, "png": str(p)}
        for p in sorted(folder.glob("*/*.png"))
        if p.parent.name in FINDINGS
    ]
    return pd.DataFrame(rows, columns=["Image Index", "Finding", "probability", "png"])


# --- localize/localization.json ------------------------------------------------------------------


@dataclass
class Localization:
    """localization.json: how `cxrdx localize` scored the maps and one summary row per (method, finding),
    the finding "all" pooling every box (columns method, Finding, n, pointing_game, iou, flat)."""

    summary: pd.DataFrame
    threshold: float = 0.5
    threshold_mode: str = "relative"
    tolerance: float = 0
    images: int | None = None
    split: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the rest: boxes, checkpoint, ...

    def pointing_game(self) -> dict[str, float]:
        """{method: pointing-game rate over all boxed findings}."""
        pooled = self.summary[self.summary["Finding"] == "all"]
        return dict(zip(pooled["method"], pooled["pointing_game"].astype(float)))


def write_localization(folder: str | Path, summary: pd.DataFrame, settings: Mapping[str, Any]) -> Path:
    return write_text(Path(folder) / LOCALIZATION, json.dumps({**settings, "summary": summary.to_dict(orient="records")}, indent=2))


def read_localization(folder: str | Path) -> Localization:
    path = Path(folder) / LOCALIZATION
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        summary = pd.DataFrame(values.pop("summary", None) or [])
        typed = {k: values.pop(k) for k in ("threshold", "threshold_mode", "tolerance", "images", "split") if k in values}
        result = Localization(summary, **typed, settings=values)
        result.threshold = float(result.threshold)
    except FileNotFoundError:
        raise CxrdxError(f"{path}: not found") from None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CxrdxError(f"{path}: not readable ({exc.__class__.__name__}: {exc})") from None
    if not summary.empty and not {"method", "Finding", "n", "pointing_game", "iou"} <= set(summary.columns):
        raise CxrdxError(f"{path}: the summary rows lack method, Finding, n, pointing_game or iou")
    return result
