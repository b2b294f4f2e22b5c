"""`cxrdx evaluate / compare / calibrate`: checkpoint -> predictions on a split -> metrics, tables, figures.

An evaluation folder holds predictions.csv (Image Index + one probability column per finding,
DESIGN.md), labels.csv (Image Index, Patient ID + the 14 labels of the same images, 1 / 0 / blank
= not labelled, and the sex, age, view and dataset columns where known, so the folder is
self-contained for `compare`), metrics.json, report.md, roc.png, reliability.png and, where the
images have sex, age, view or dataset, the subgroup tables (subgroups.*, subgroup_gaps.*).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from cxrdx import metrics, ood, report, subgroups
from cxrdx.atomic import write_text
from cxrdx.card import add_evaluation
from cxrdx.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cxrdx.errors import CxrdxError, CxrdxWarning, MissingImagesWarning
from cxrdx.findings import FINDINGS
from cxrdx.preprocess import XRV
from cxrdx.rundir import EVAL_REPORT as REPORT
from cxrdx.rundir import (  # the evaluation folder's files; compare and the tests read them through here too
    LABELS,
    PREDICTIONS,
    EvalMetrics,
    read_eval_metrics,
    read_labels,
    read_predictions,
    run_dir_of,
    split_path,
    write_eval_metrics,
    write_labels,
    write_predictions,
)


@dataclass
class SplitPredictions:
    """Probabilities and labels of one split, rows in dataset order."""

    names: list[str]
    probs: np.ndarray  # (N, K) float64
    labels: np.ndarray  # (N, K) float: 1, 0, NaN = not labelled
    patients: np.ndarray | None  # (N,) patient ids when known
    meta: pd.DataFrame | None = None  # N rows: the subgroups.COLUMNS the images have
    ood_scores: np.ndarray | None = None  # (N,) the input guard's content-check scores, when it ran


@dataclass
class PredictedSplit:
    """What `predict_split` gives: the checkpoint it loaded, its predictions, and notes for the user."""

    checkpoint: Checkpoint
    predictions: SplitPredictions
    notes: list[str]


@dataclass
class AlignedRuns:
    """Prediction files of the same images (`load_runs`), rows in the first file's order."""

    names: list[str]  # image names
    probs: dict[str, np.ndarray]  # model -> (N, K) probabilities
    labels: np.ndarray  # (N, K) float: 1, 0, NaN = not labelled
    patients: np.ndarray | None  # (N,) patient ids when the labels have them


# --- files ---------------------------------------------------------------------------------------


def find_predictions(path: str | Path) -> Path:
    """A predictions file, an evaluation folder holding one, or a folder with exactly one */predictions.csv."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CxrdxError(f"{path}: no such file or folder")
    if (path / PREDICTIONS).is_file():
        return path / PREDICTIONS
    found = sorted(path.glob(f"*/{PREDICTIONS}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CxrdxError(f"{path}: no {PREDICTIONS} here or one folder below; run `cxrdx evaluate --out DIR` first")
    raise CxrdxError(f"{path}: several prediction files ({', '.join(str(f) for f in found)}); name one")


# --- inference -----------------------------------------------------------------------------------


class _Progress:
    """A loader seen through a tqdm bar on stderr; everything else is the loader's (sampler, dataset)."""

    def __init__(self, loader: Any, desc: str, enabled: bool):
        self._loader, self._desc, self._enabled = loader, desc, enabled

    def __iter__(self) -> Iterator[Any]:
        from tqdm import tqdm

        yield from tqdm(self._loader, desc=self._desc, unit="batch", disable=not self._enabled, leave=False)

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _split_series(checkpoint: Path, split_file: str | Path | None, split: str) -> pd.Series | None:
    if split == "all":
        return None
    from cxrdx.data.splits import read_split, resolve_split_file

    path = resolve_split_file(split_file) if split_file else split_path(run_dir_of(checkpoint))
    if not path.exists():
        raise CxrdxError(f"{path}: split file not found; pass --split-file FILE, or --split all for every image")
    return read_split(path)


def predict_split(
    checkpoint: str | Path,
    split: str = "test",
    cache: str | Path | None = None,
    split_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    hflip: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
    apply_temperature: bool = True,
    allow_missing: bool = False,
    trust_pickle: bool = False,
    dataset: str | None = None,
) -> PredictedSplit:
    """Model probabilities (the checkpoint's temperature applied unless `apply_temperature` is off) for one split.

    Images come from the prepared cache (default: the one the model was trained on) or, with
    `data_dir`, from the raw image folder and its Data_Entry table, or the label files of `dataset`
    (a name of `cxrdx.data.datasets.list_datasets()`, frontal views). Images of the split that are not
    there are an error, or with `allow_missing` left out with a note. Returns notes for the user.
    Under torchrun each process predicts its shard and every process gets the whole split.
    `trust_pickle` also loads an old pickle checkpoint (see cxrdx.checkpoint).
    """
    from torch.utils.data import DataLoader, Dataset

    from cxrdx.data.dataset import CacheDataset, FileDataset, XrvFileDataset, eval_transform, make_loader, rows_for_split
    from cxrdx.inference import collect_logits, inference_sampler, probabilities
    from cxrdx.runtime import distributed

    ckpt = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    if ckpt.findings != list(FINDINGS):
        lacking = ", ".join(f for f in FINDINGS if f not in ckpt.findings)
        raise CxrdxError(f"{checkpoint}: the model does not predict {lacking}; evaluation needs all {len(FINDINGS)} findings")
    if ckpt.preprocess == XRV and data_dir is None:
        raise CxrdxError(
            f"{checkpoint}: a torchxrayvision model crops and resizes the original images (preprocess 'xrv'), "
            "not a prepared cache: pass --data-dir DIR"
        )
    data_cfg = ckpt.config.get("data", {}) if isinstance(ckpt.config, dict) else {}
    workers = int(data_cfg.get("workers", 0)) if workers is None else workers
    transform = eval_transform(ckpt.input_size, ckpt.mean, ckpt.std)
    series = _split_series(Path(checkpoint), split_file, split)
    notes: list[str] = []
    if data_dir is not None:
        located, missing = _read_images(data_dir, dataset, series, split)
        if located.empty:
            raise CxrdxError(f"{data_dir}: none of the {len(missing)} images of split '{split}' was found")
        if missing:
            text = f"{len(missing):,} image(s) of split '{split}' are not in {data_dir}: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
            if not allow_missing:
                raise CxrdxError(f"{text}; leave them out with --allow-missing")
            notes.append(f"{text} (left out)")
        labels = located[list(FINDINGS)].to_numpy(np.float32)
        images: Dataset
        if ckpt.preprocess == XRV:
            images = XrvFileDataset(
                located["path"].tolist(), labels, ckpt.input_size, ckpt.mean, ckpt.std, names=located["Image Index"].tolist()
            )
        else:
            images = FileDataset(
                located["path"].tolist(),
                labels,
                ckpt.cache_size or ckpt.input_size,
                transform,  # as Predictor
                names=located["Image Index"].tolist(),
            )
        table = located
    else:
        from cxrdx.data.cache import open_caches

        cache_path = [str(cache)] if cache else ckpt.training_caches()
        if not cache_path:
            raise CxrdxError(f"{checkpoint}: the checkpoint names no cache; pass --cache DIR or --data-dir DIR")
        opened = open_caches(cache_path)
        if ckpt.cache_size is not None and opened.size != ckpt.cache_size:
            raise CxrdxError(
                f"{cache_path}: a {opened.size}-px cache, but {checkpoint} was trained on {ckpt.cache_size}-px images; "
                f"prepare a {ckpt.cache_size}-px cache or use --data-dir (predict resizes files the same way)"
            )
        with warnings.catch_warnings(record=True) as left_out:  # into the report's notes
            warnings.simplefilter("always", MissingImagesWarning)
            rows = None if series is None else rows_for_split(opened, series, split, allow_missing)
        notes += [str(w.message) for w in left_out if issubclass(w.category, MissingImagesWarning)]
        images = CacheDataset(opened, rows, transform)
        table = opened.index
    for note in notes:  # shown now, and kept in the evaluation's notes
        warnings.warn(note, MissingImagesWarning, stacklevel=2)
    with distributed(device) as (info, torch_device):
        model = ckpt.build_model(torch_device)
        loader = make_loader(
            images,
            batch_size=batch_size,
            shuffle=False,
            workers=workers,
            sampler=inference_sampler(images),
            pin_memory=torch_device.type == "cuda",
        )
        shown = _Progress(loader, f"predict {split}", progress and info.main)
        # fp32 as Predictor: thresholds and temperatures fitted here must hold for what predict/serve output
        temperature = ckpt.temperature if apply_temperature else None
        # the guard's scores come from the same forward pass; measured on a prepared cache only
        guard = ckpt.guard if data_dir is None and ood.supports_guard(model) else None
        logits, targets, found, ood_scores = collect_logits(model, cast(DataLoader, shown), torch_device, None, hflip, guard)
    probs, names = probabilities(logits, temperature), found.tolist()
    rows_of = table.set_index(pd.Index(table["Image Index"].astype(str))).loc[[str(n) for n in names]]
    meta = rows_of[[c for c in subgroups.COLUMNS if c in rows_of.columns]].reset_index(drop=True)
    predictions = SplitPredictions(
        list(names), probs, targets, rows_of["Patient ID"].to_numpy(), meta if len(meta.columns) else None, ood_scores
    )
    return PredictedSplit(ckpt, predictions, notes)


def _read_images(data_dir: str | Path, dataset: str | None, series: pd.Series | None, split: str) -> tuple[pd.DataFrame, list[str]]:
    """The index rows of `split` (all with no series) found in `data_dir` (with `path`), and the names of those missing."""
    if dataset not in (None, "nih"):
        from cxrdx.data.datasets import read_dataset

        found = read_dataset(dataset, data_dir)
        if series is None:
            return found.table, found.missing
        keep = set(series.index[series.to_numpy() == split])
        return found.table[found.table["Image Index"].isin(keep)].reset_index(drop=True), [m for m in found.missing if m in keep]
    from cxrdx.data.metadata import find_metadata, locate_images, read_metadata

    index = read_metadata(find_metadata(data_dir))
    if series is not None:
        index = index[index["Image Index"].isin(series.index[series.to_numpy() == split])]
    return locate_images(index, data_dir)


def default_split(checkpoint: str | Path, cache: str | Path | None = None, dataset: str | None = None, trust_pickle: bool = False) -> str:
    """'all' for images the model was not trained on (another dataset's files, or a cache other than
    its training cache): they have no split of this run; else 'test'."""
    if dataset not in (None, "nih"):
        return "all"
    if cache is None:
        return "test"
    trained_on = load_checkpoint(checkpoint, trust_pickle=trust_pickle).training_caches()
    return "test" if Path(cache).resolve() in {Path(p).resolve() for p in trained_on} else "all"


# --- evaluate --------------------------------------------------------------------------------------


def resolve_thresholds(choice: str, ckpt: Checkpoint, validation: SplitPredictions | None = None) -> np.ndarray:
    """'0.5' or any number, 'checkpoint' (stored by calibrate), or 'youden' / 'f1' chosen on `validation`."""
    if choice == "checkpoint":
        return np.asarray(ckpt.thresholds, dtype=np.float64)
    if choice in metrics.THRESHOLD_METHODS:
        if validation is None:
            raise CxrdxError(f"--thresholds {choice} needs the validation split's predictions")
        return metrics.choose_thresholds(validation.labels, validation.probs, choice)
    try:
        value = float(choice)
    except ValueError:
        raise CxrdxError(f"--thresholds {choice!r}: expected a number, checkpoint, youden or f1") from None
    if not 0 <= value <= 1:
        raise CxrdxError(f"--thresholds {value}: must lie in [0, 1]")
    return np.full(len(FINDINGS), value)


def evaluate_predictions(
    preds: SplitPredictions,
    out: str | Path,
    name: str = "model",
    thresholds: np.ndarray | float = 0.5,
    n_bootstrap: int = 0,
    expert_labels: str | Path | None = None,
    notes: Sequence[str] = (),
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write predictions.csv, labels.csv, metrics.json, report.md, roc.png and reliability.png into `out`."""
    out = Path(out)
    write_predictions(out / PREDICTIONS, preds.names, preds.probs)
    write_labels(out / LABELS, preds.names, preds.labels, preds.patients, preds.meta)
    cmp = metrics.compare_models(preds.labels, {name: preds.probs}, thresholds=thresholds, groups=preds.patients, n_bootstrap=n_bootstrap)
    evaluation = cmp.evaluations[name]
    tables = report.comparison_tables(cmp)
    result = {"settings": settings or {}, **evaluation.to_dict()}
    result["notes"] = list(notes) + result["notes"]
    if expert_labels is not None:
        expert = metrics.expert_auroc(preds.names, preds.labels, preds.probs, metrics.read_expert_labels(expert_labels))
        tables.append(report.expert_table(expert))
        result["expert_labels"] = json.loads(expert.to_json(orient="index"))
    if preds.meta is not None and subgroups.groups_of(preds.meta):
        found = subgroups.subgroup_auroc(preds.labels, preds.probs, preds.meta)
        groups = subgroups.subgroup_tables(found)
        report.write_tables(groups, out)
        tables += groups
        # the largest gap per finding and attribute, for the model card; the full tables are in subgroups.*
        result["subgroups"] = {"largest_gaps": json.loads(found.gaps.reset_index().to_json(orient="records"))}
    write_eval_metrics(out, EvalMetrics.from_dict(result))
    write_text(out / REPORT, report.markdown_report(tables, f"Evaluation: {name}", result["notes"]))
    report.roc_figure(preds.labels, {name: preds.probs}, FINDINGS, out / "roc.png")
    report.reliability_figure(preds.labels, preds.probs, FINDINGS, out / "reliability.png")
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    split: str = "test",
    thresholds: str = "0.5",
    n_bootstrap: int = 0,
    expert_labels: str | Path | None = None,
    name: str | None = None,
    **predict_kwargs: Any,
) -> dict[str, Any] | None:
    """Predict `split` with the checkpoint and write the evaluation folder `out` (see module docstring).

    Under torchrun every process predicts its shard; rank 0 alone writes and gets the result, the others None.
    """
    from cxrdx.runtime import distributed

    with distributed(predict_kwargs.get("device", "auto")) as (info, _):  # one process group for both splits
        predicted = predict_split(checkpoint, split=split, **predict_kwargs)
        validation = None
        if thresholds in metrics.THRESHOLD_METHODS:
            validation = predict_split(checkpoint, split="val", **predict_kwargs).predictions
    if not info.main:
        return None
    ckpt, preds = predicted.checkpoint, predicted.predictions
    chosen = resolve_thresholds(thresholds, ckpt, validation)
    label = name or run_dir_of(checkpoint).name
    settings = {
        "name": label,
        "checkpoint": str(checkpoint),
        "model": ckpt.model_name,
        "split": split,
        "images": len(preds.names),
        "thresholds": thresholds if validation is None else f"{thresholds} on the val split",
        "temperature": ckpt.temperature,
        "tta_hflip": bool(predict_kwargs.get("hflip", False)),
        "bootstrap": n_bootstrap,
    }
    data = predict_kwargs.get("data_dir") or predict_kwargs.get("cache")
    settings["data"] = None if data is None else str(data)  # None: the training data; the model card tells external data by it
    notes = [*predicted.notes, guard_note(ckpt, preds)]
    result = evaluate_predictions(preds, out, label, chosen, n_bootstrap, expert_labels, notes, settings)
    add_evaluation(checkpoint, out)  # RUN/checkpoints/best.pt: the run's model card gains this evaluation
    return result


# --- compare ---------------------------------------------------------------------------------------


def run_thresholds(paths: Sequence[str | Path], models: Sequence[str]) -> dict[str, np.ndarray | float]:
    """{model: the thresholds stored beside its predictions, else 0.5}, for runs given as to `load_runs`."""
    stored = [read_eval_metrics(find_predictions(p).parent).thresholds for p in paths]
    lacking = [m for m, s in zip(models, stored) if s is None]
    if lacking and len(lacking) < len(models):  # mixed: say so, Table 4 is then not like for like
        warnings.warn(
            f"no thresholds in metrics.json for {', '.join(lacking)}: Table 4 uses 0.5 for them, "
            "each other run's own thresholds for the rest",
            stacklevel=2,
        )
    return {m: 0.5 if s is None else s for m, s in zip(models, stored)}


def run_name(predictions: Path) -> str:
    """The model name `cxrdx evaluate` recorded beside a predictions file, else its checkpoint's run
    folder, else the name of the folder holding the file."""
    settings = read_eval_metrics(predictions.parent).settings
    if isinstance(settings.get("name"), str) and settings["name"]:
        return settings["name"]
    if isinstance(settings.get("checkpoint"), str) and settings["checkpoint"]:
        return run_dir_of(settings["checkpoint"]).name
    return predictions.parent.name


def load_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None, labels: str | Path | None = None) -> AlignedRuns:
    """Prediction files of the same images, aligned on the first file's order, and their labels
    (`labels`: evaluate's labels.csv or the Data_Entry table; default: the labels.csv beside the first file)."""
    files = [find_predictions(p) for p in paths]
    if names is not None and len(names) != len(files):
        raise CxrdxError(f"{len(names)} names for {len(files)} prediction files")
    models = list(names) if names is not None else [run_name(f) for f in files]
    if len(set(models)) != len(models):
        models = [f"{m} ({f.parent.name})" for m, f in zip(models, files)]
    if len(set(models)) != len(models):
        models = [str(f.parent) for f in files]
    tables = [read_predictions(f) for f in files]
    order = tables[0].index
    for f, t in zip(files[1:], tables[1:]):
        if set(t.index) != set(order):
            extra, lacking = t.index.difference(order), order.difference(t.index)
            raise CxrdxError(
                f"{f}: not the same images as {files[0]} ({len(extra)} extra, {len(lacking)} missing; "
                f"first: {', '.join(list(extra[:2]) + list(lacking[:2]))})"
            )
    label_path = Path(labels) if labels else files[0].parent / LABELS
    if not label_path.is_file():
        raise CxrdxError(f"{label_path}: no labels; pass --labels with evaluate's labels.csv or the Data_Entry table")
    truth = read_labels(label_path)
    lacking = order.difference(truth.index)
    if len(lacking):
        raise CxrdxError(f"{label_path}: no labels for {len(lacking)} predicted image(s) (first: {', '.join(lacking[:3])})")
    truth = truth.loc[order]
    probs = {m: t.loc[order].to_numpy() for m, t in zip(models, tables)}
    patients = truth["Patient ID"].to_numpy() if "Patient ID" in truth.columns else None
    return AlignedRuns(list(order), probs, truth[list(FINDINGS)].to_numpy(np.float64), patients)


def compare_runs(
    paths: Sequence[str | Path],
    names: Sequence[str] | None = None,
    labels: str | Path | None = None,
    threshold: float | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] = report.FORMATS,
) -> tuple[metrics.Comparison, list[report.Table]]:
    """Tables 3-5 and the model-vs-model tests for prediction files; writes tables and roc.png into `out`.

    Table 4 applies `threshold` to every model when given; by default each run's own thresholds
    (its metrics.json, as `cxrdx evaluate` chose them), else 0.5.
    """
    runs = load_runs(paths, names, labels)
    probs, y = runs.probs, runs.labels
    thresholds = run_thresholds(paths, list(probs)) if threshold is None else threshold
    cmp = metrics.compare_models(y, probs, thresholds=thresholds)
    tables = report.comparison_tables(cmp)
    if out is not None:
        report.write_tables(tables, out, formats)
        report.roc_figure(y, probs, FINDINGS, Path(out) / "roc.png")
    return cmp, tables


# --- calibrate -------------------------------------------------------------------------------------


def calibrate_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    thresholds: str | None = None,
    temperature: bool = False,
    split: str = "val",
    ood: bool = False,
    **predict_kwargs: Any,
) -> tuple[Checkpoint, pd.DataFrame]:
    """Fit per-finding temperatures and/or thresholds on `split`, and/or (`ood`) refit the input guard's
    content check (training split, threshold on `split`); store them in the checkpoint (atomic write).

    Thresholds are chosen on the temperature-scaled probabilities, which is what prediction uses.
    Returns the new checkpoint and a per-finding summary (ECE before / after, temperature, threshold;
    empty when only the guard was refitted).
    """
    if thresholds is None and not temperature and not ood:
        raise CxrdxError("nothing to calibrate: pass --thresholds youden|f1, --temperature and/or --ood")
    if split in ("test", "all"):
        raise CxrdxError(f"calibrating on the '{split}' split would leak it into the test results; use 'val'")
    if predict_kwargs.get("hflip"):
        raise CxrdxError("--tta-hflip: predict, serve and export do not flip, so thresholds fitted on flipped averages would not hold")
    if thresholds is None and not temperature:
        ckpt = load_checkpoint(checkpoint, trust_pickle=predict_kwargs.get("trust_pickle", False))
        ckpt.guard = fit_checkpoint_guard(ckpt, checkpoint, split, **predict_kwargs)
        save_checkpoint(out or checkpoint, ckpt)
        return ckpt, pd.DataFrame(index=list(FINDINGS))
    predicted = predict_split(checkpoint, split=split, apply_temperature=False, **predict_kwargs)
    ckpt, preds = predicted.checkpoint, predicted.predictions
    raw = preds.probs
    probs = metrics.apply_temperature(raw, ckpt.temperature)
    summary = pd.DataFrame({"ece_before": metrics.expected_calibration_error(preds.labels, probs)}, index=list(FINDINGS))
    if temperature:
        ckpt.temperature = [float(t) for t in metrics.fit_temperature(preds.labels, raw)]
        probs = metrics.apply_temperature(raw, ckpt.temperature)
        _warn_stuck_temperatures(ckpt.temperature, split)
    if thresholds is not None:
        ckpt.thresholds = [float(t) for t in metrics.choose_thresholds(preds.labels, probs, thresholds)]
    summary["ece_after"] = metrics.expected_calibration_error(preds.labels, probs)
    summary["temperature"] = ckpt.temperature or [1.0] * len(FINDINGS)
    summary["threshold"] = ckpt.thresholds
    ckpt.val_metrics = {**(ckpt.val_metrics or {}), "calibration": {"split": split, "thresholds": thresholds, "temperature": temperature}}
    if ood:
        ckpt.guard = fit_checkpoint_guard(ckpt, checkpoint, split, **predict_kwargs)
    save_checkpoint(out or checkpoint, ckpt)
    return ckpt, summary


def fit_checkpoint_guard(
    ckpt: Checkpoint,
    checkpoint: str | Path,
    split: str = "val",
    cache: str | Path | None = None,
    split_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    allow_missing: bool = False,
    **_: Any,
) -> ood.OodGuard | None:
    """The input guard's content check of `ckpt`, fitted on the training split of its prepared cache
    (at most ood.MAX_TRAIN_IMAGES images), its threshold set on `split`; None (with a warning) for a
    model whose penultimate features cannot be read."""
    from cxrdx.data.cache import open_caches
    from cxrdx.data.dataset import rows_for_split
    from cxrdx.runtime import resolve_device

    if data_dir is not None:
        raise CxrdxError("--ood fits on the prepared cache (--cache), not on --data-dir")
    cache_path = [str(cache)] if cache else ckpt.training_caches()
    if not cache_path:
        raise CxrdxError(f"{checkpoint}: the checkpoint names no cache; pass --cache DIR to fit the input guard")
    series = _split_series(Path(checkpoint), split_file, split)
    if series is None:
        raise CxrdxError("--ood needs a training split: pass --split val (the threshold's split), not all")
    opened = open_caches(cache_path)
    train_rows, val_rows = (rows_for_split(opened, series, name, allow_missing) for name in ("train", split))
    torch_device = resolve_device(device)
    model = ckpt.build_model(torch_device)
    if not ood.supports_guard(model):
        warnings.warn(
            f"{checkpoint}: model {ckpt.model_name} gives no penultimate features; the input guard's content check stays off",
            CxrdxWarning,
            stacklevel=2,
        )
        return None
    seed = int(ckpt.config.get("seed", 0)) if isinstance(ckpt.config, dict) else 0
    return ood.fit_on_cache(
        model, opened, train_rows, val_rows, ckpt.input_size, ckpt.mean, ckpt.std, torch_device, batch_size=batch_size, seed=seed
    )


def guard_note(ckpt: Checkpoint, predictions: SplitPredictions) -> str:
    """What the input guard's content check accepts of the evaluated images (all stay in the metrics), from the
    scores `predict_split` took in its forward pass."""
    if ckpt.guard is None:
        return f"input guard content check {ood.GUARD_OFF}"
    scores = predictions.ood_scores
    if scores is None:
        return "input guard: acceptance not measured on --data-dir images (it is measured on a prepared cache)"
    accepted = int(np.sum(scores <= ckpt.guard.threshold))
    return (
        f"input guard: {accepted:,} of {len(scores):,} images ({accepted / max(len(scores), 1):.1%}) accepted by the "
        f"content check (threshold {ckpt.guard.threshold:.4g}); the metrics include all of them"
    )


def _warn_stuck_temperatures(temperatures: Sequence[float], split: str) -> None:
    """A fitted temperature at the edge of its search range is no calibration: say which."""
    low, high = metrics.TEMPERATURE_BOUNDS
    stuck = [f"{f} ({t:.3g})" for f, t in zip(FINDINGS, temperatures) if not low * 1.01 < t < high / 1.01]
    if stuck:
        warnings.warn(
            f"temperature at the limit of [{low:g}, {high:g}] for {', '.join(stuck)}: the '{split}' split does not "
            "calibrate it (too few positives, or scores that do not separate them); treat its probabilities with care",
            CxrdxWarning,
            stacklevel=2,
        )
