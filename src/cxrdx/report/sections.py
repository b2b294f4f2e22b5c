"""The HTML report: one self-contained page (`report.html`) for one or more run folders (`cxrdx report`).

Run folder layout, as the commands write it; every part is optional and a missing one becomes a
short note in the page:

    RUN/config.yaml            the training config (cxrdx train)
    RUN/split.csv              the split the run used: Image Index,split
    RUN/metrics.jsonl          one JSON row per epoch (train/val loss, val mean AUROC, ...)
    RUN/curves.png             loss and validation AUROC per epoch
    RUN/checkpoints/best.pt    the selected weights
    RUN/eval/                  cxrdx evaluate --checkpoint RUN/checkpoints/best.pt --out RUN/eval:
                               predictions.csv, labels.csv, metrics.json, roc.png, reliability.png
    RUN/explain/               cxrdx explain --checkpoint RUN/checkpoints/best.pt --split test --out RUN/explain:
                               FINDING/IMAGE.METHOD.png (+ .npy) and explanations.csv
    RUN/localize/              cxrdx localize --checkpoint RUN/checkpoints/best.pt --out RUN/localize:
                               localization.json (+ .md, localization_records.csv)

Table 1 needs the prepared cache the config names (data.cache) for the labels of the split's images.
Runs evaluated on the same test images are compared (Tables 3-5, DeLong, ANOVA); otherwise each run
gets its own tables. The output folder receives report.html, summary.json (the headline numbers) and
table2.json (Table 2 rows, reused by later reports: counting FLOPs costs a forward pass per model).
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cxrdx import __version__, metrics, report
from cxrdx.atomic import write_text
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

EVAL, EXPLAIN, LOCALIZE = "eval", "explain", "localize"
REPORT, SUMMARY, TABLE2 = "report.html", "summary.json", "table2.json"
PANELS = 4  # Group-CAM panels per run and kind (correct, wrong)
METHOD_NAMES = {
    "groupcam": "Group-CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
    "scorecam": "Score-CAM", "eigencam": "Eigen-CAM", "layercam": "Layer-CAM", "hirescam": "HiRes-CAM",
}
SIGNIFICANCE = {"***": "s3", "**": "s2", "*": "s1", "n.s.": "ns"}


@dataclass
class Run:
    """A run folder and what the page needs to know about it up front."""

    name: str
    path: Path
    config: dict[str, Any]  # {} without config.yaml

    @property
    def model(self) -> str | None:
        return (self.config.get("model") or {}).get("name")

    @property
    def input_size(self) -> int | None:
        return (self.config.get("data") or {}).get("input_size")

    def has_eval(self) -> bool:
        return (self.path / EVAL / "predictions.csv").is_file()


@dataclass
class Scores:
    """Runs scored on the same test images: their comparison and the arrays behind it."""

    runs: list[Run]
    cmp: metrics.Comparison
    y: np.ndarray
    probs: dict[str, np.ndarray]


@dataclass
class Section:
    id: str
    title: str
    body: str


# --- small HTML pieces -------------------------------------------------------------------------------


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(png: bytes | Path, alt: str) -> str:
    data = png.read_bytes() if isinstance(png, Path) else png
    return f"<img src='{data_uri(data)}' alt='{escape(alt)}'>"


def figure(png: bytes | Path, caption: str) -> str:
    return f"<figure class='plot'>{image(png, caption)}<figcaption>{escape(caption)}</figcaption></figure>"


def note(text: str, kind: str = "missing") -> str:
    return f"<p class='{kind}'>{escape(text)}</p>"


def _code(text: str) -> str:
    return f"<code>{escape(text)}</code>"


def _draw(plot: Callable[..., Path], *args: Any) -> bytes:
    """A report figure function (which writes a PNG to a path) rendered to bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        return plot(*args, Path(tmp) / "figure.png").read_bytes()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


# --- reading run folders -----------------------------------------------------------------------------


def open_runs(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Run]:
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise CxrdxError("no run folders given")
    for path in paths:
        if not path.is_dir():
            raise CxrdxError(f"{path}: no such run folder")
    if names is not None and len(names) != len(paths):
        raise CxrdxError(f"{len(names)} names for {len(paths)} run folders")
    labels = list(names) if names is not None else [p.resolve().name for p in paths]
    if len(set(labels)) != len(labels):
        if names is not None:
            raise CxrdxError(f"--names must differ: {', '.join(labels)}")
        labels = [str(p) for p in paths]
    runs = []
    for name, path in zip(labels, paths):
        config: dict[str, Any] = {}
        if (path / "config.yaml").is_file():
            try:
                config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise CxrdxError(f"{path / 'config.yaml'}: not readable YAML ({exc})") from None
        runs.append(Run(name, path, config if isinstance(config, dict) else {}))
    return runs


def _thresholds(run: Run) -> np.ndarray | float:
    """The decision thresholds `cxrdx evaluate` used (RUN/eval/metrics.json), else 0.5."""
    from cxrdx.evaluation import stored_thresholds

    stored = stored_thresholds(run.path / EVAL)
    return 0.5 if stored is None else stored


def _score(runs: list[Run]) -> Scores:
    from cxrdx.evaluation import load_runs

    _, probs, y, _ = load_runs([r.path / EVAL for r in runs], [r.name for r in runs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)  # kept in cmp.notes
        cmp = metrics.compare_models(y, probs, thresholds={r.name: _thresholds(r) for r in runs})
    return Scores(runs, cmp, y, probs)


def score_runs(runs: list[Run]) -> tuple[list[Scores], list[str]]:
    """One comparison over all evaluated runs when they share the test images, else one per run."""
    evaluated = [r for r in runs if r.has_eval()]
    notes = []
    if len(evaluated) > 1:
        try:
            return [_score(evaluated)], notes
        except CxrdxError as exc:
            notes.append(f"The runs cannot be compared on the same test images, so each is shown on its own, without model-vs-model tests ({exc}).")
    groups = []
    for run in evaluated:
        try:
            groups.append(_score([run]))
        except CxrdxError as exc:
            notes.append(f"{run.name}: evaluation not readable: {exc}")
    return groups, notes


def _models(groups: list[Scores]) -> list[str]:
    return [m for g in groups for m in g.cmp.models]


def _best(groups: list[Scores]) -> tuple[str, dict[str, float], int] | None:
    """(model, its mean AUROC summary, test images) with the highest mean AUROC."""
    scored = [(g.cmp.evaluations[m].overall["auroc"], m, len(g.y)) for g in groups for m in g.cmp.models]
    scored = [s for s in scored if np.isfinite(s[0]["mean"])]
    if not scored:
        return None
    summary, model, images = max(scored, key=lambda s: s[0]["mean"])
    return model, summary, images


# --- the header --------------------------------------------------------------------------------------


def _ci(summary: dict[str, float], level: float = 0.95) -> str:
    f = report.format_value
    return f"{f(summary['mean'])} ± {f(summary['se'])} ({round(level * 100)}% CI {f(summary['low'])}–{f(summary['high'])})"


def _position(auroc: float) -> float:
    """Per cent along the 0.5-1 AUROC axis."""
    return 100 * min(1.0, max(0.0, (auroc - 0.5) / 0.5))


def _forest(groups: list[Scores]) -> str:
    """Each model's mean AUROC with its CI as a horizontal bar on a 0.5-1 scale."""
    rows = []
    pos = _position
    for group in groups:
        for model in group.cmp.models:
            s = group.cmp.evaluations[model].overall["auroc"]
            if not np.isfinite(s["mean"]):
                continue
            low, high = (pos(s[k]) if np.isfinite(s[k]) else pos(s["mean"]) for k in ("low", "high"))
            rows.append(
                f"<div class='forest-row'><span class='forest-name'>{escape(model)}</span>"
                f"<span class='forest-track'><span class='forest-bar' style='width:{pos(s['mean']):.1f}%'></span>"
                f"<span class='forest-ci' style='left:{low:.1f}%;width:{max(high - low, 0.4):.1f}%'></span></span>"
                f"<span class='forest-value'>{report.format_value(s['mean'])}</span></div>"
            )
    if not rows:
        return ""
    axis = "".join(f"<span style='left:{_position(t):.0f}%'>{t:.1f}</span>" for t in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    return (
        "<div class='forest' aria-label='mean AUROC per model'>" + "".join(rows)
        + f"<div class='forest-row axis'><span class='forest-name'></span><span class='forest-track'>{axis}</span>"
        "<span class='forest-value'></span></div></div>"
    )


def _header(title: str, runs: list[Run], groups: list[Scores]) -> str:
    best = _best(groups)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if best is None:
        headline = "<p class='headline'>No evaluated model: run <code>cxrdx evaluate --out RUN/eval</code> for the results.</p>"
        cards = ""
    else:
        model, summary, images = best
        evaluation = next(g.cmp.evaluations[model] for g in groups if model in g.cmp.evaluations)
        headline = (
            f"<p class='headline'>{'Best model' if len(_models(groups)) > 1 else 'Model'} <strong>{escape(model)}</strong>: mean AUROC "
            f"<strong class='big'>{report.format_value(summary['mean'])}</strong> "
            f"<span class='ci'>± {report.format_value(summary['se'])} SE "
            f"(95% CI {report.format_value(summary['low'])}–{report.format_value(summary['high'])})</span></p>"
        )
        overall = evaluation.overall
        facts = [
            ("Test images", f"{images:,}"),
            ("Findings with an AUROC", f"{summary['n']} of {len(FINDINGS)}"),
            ("Models", str(len(_models(groups)))),
            ("Macro F1" + (" (best model)" if len(_models(groups)) > 1 else ""), report.format_value(overall["macro_f1"]["mean"], 2)),
            ("All findings correct", report.format_value(overall["exact_match_accuracy"])),
        ]
        cards = "<dl class='cards'>" + "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in facts) + "</dl>"
    where = ", ".join(_code(str(r.path)) for r in runs)
    return (
        f"<header class='hero'><p class='eyebrow'>cxrdx {escape(__version__)} · report of {len(runs)} run(s) · {stamp}</p>"
        f"<h1>{escape(title)}</h1>{headline}{cards}{_forest(groups)}<p class='runs'>Runs: {where}</p></header>"
    )


def _runs_table(runs: list[Run]) -> str:
    """The settings that tell runs apart, one row per run."""
    fields = [
        ("Model", ("model", "name")), ("Loss", ("loss", "name")), ("Input", ("data", "input_size")),
        ("Epochs", ("optim", "epochs")), ("Batch", ("optim", "batch_size")), ("Peak LR", ("optim", "lr")),
        ("EMA", ("ema", "enabled")), ("Seed", ("seed",)),
    ]

    def get(config: dict[str, Any], keys: tuple[str, ...]) -> str:
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return report.DASH if value is None else str(value)

    display = pd.DataFrame(
        {label: [get(r.config, keys) for r in runs] for label, keys in fields}, index=pd.Index([r.name for r in runs], name="Run")
    )
    return report.html(report.Table("runs", "Runs at a glance", display, display))


# --- Table 1 and Table 2 -----------------------------------------------------------------------------


def _cache_path(run: Run) -> Path | None:
    named = (run.config.get("data") or {}).get("cache")
    if not named:
        return None
    for candidate in (Path(named), run.path / named, run.path.parent / named):
        if candidate.is_dir():
            return candidate
    return None


def table1_table(index: pd.DataFrame, split: pd.Series, title: str) -> tuple[report.Table, dict[str, int]]:
    """Table 1 (images, patients, labels and findings per image by split) and the leakage report."""
    from cxrdx.data.splits import LABEL_COUNT_ROWS, SPLITS, split_summary, table1

    counts = table1(index, split)
    parts = counts["splits"]
    columns = [*SPLITS, "all"]
    patients = {k: v["patients"] for k, v in split_summary(index, split).items()}
    patients["all"] = int(index.loc[index["Image Index"].isin(split.index), "Patient ID"].nunique())
    total = parts["all"]["images"]
    names = {"train": "Train", "val": "Validation", "test": "Test", "all": "Total"}
    heads = [f"{names[c]} ({100 * parts[c]['images'] / max(total, 1):.0f}%)" if c != "all" else "Total" for c in columns]
    data: dict[tuple[str, str], list[int]] = {("Split", "Images"): [parts[c]["images"] for c in columns]}
    data[("Split", "Patients")] = [patients[c] for c in columns]
    for f in FINDINGS:
        data[("Labels", f)] = [parts[c]["findings"][f] for c in columns]
    row_names = {"0": "0 (No Finding)", ">=4": "≥4"}
    for k in LABEL_COUNT_ROWS:
        data[("Findings per image", row_names.get(k, k))] = [parts[c]["label_counts"][k] for c in columns]
    frame = pd.DataFrame.from_dict(data, orient="index", columns=heads)
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["", ""])
    display = frame.astype(object).copy()
    for key in frame.index:
        for head, c in zip(heads, columns):
            count = int(frame.loc[key, head])
            share = "" if key[0] == "Split" or not parts[c]["images"] else f" ({100 * count / parts[c]['images']:.1f}%)"
            display.loc[key, head] = f"{count:,}{share}"
    table_notes = ["Percentages: share of the split's images. An image can carry several findings."]
    return report.Table("table1", title, frame, display, table_notes), counts["leakage"]


def _leakage_note(leak: dict[str, int]) -> str:
    val, test = leak["val_images_with_train_patient"], leak["test_images_with_train_patient"]
    if val == test == 0:
        return note("No leakage: no validation or test image belongs to a patient with images in train.", "ok")
    return note(
        f"Leakage: {val:,} validation and {test:,} test images belong to a patient who also has images in train "
        "(a random image-wise split; the patient-wise and official splits avoid this).",
        "warn",
    )


def dataset_section(runs: list[Run]) -> Section:
    from cxrdx.data.cache import open_cache
    from cxrdx.data.splits import read_split

    parts, used = [], {}
    for run in runs:
        split_path = run.path / "split.csv"
        cache = _cache_path(run)
        if not split_path.is_file():
            parts.append(note(f"{run.name}: no split.csv in {run.path}, so no Table 1."))
            continue
        if cache is None:
            named = (run.config.get("data") or {}).get("cache")
            parts.append(note(f"{run.name}: the prepared cache {named or '(none named in config.yaml)'} is not here; Table 1 needs its labels."))
            continue
        key = (hashlib.sha256(split_path.read_bytes()).hexdigest(), str(cache.resolve()))
        used.setdefault(key, []).append(run)
    for (_, cache), group in used.items():
        first = group[0]
        title = f"Table 1. Images and labels by split (run(s) {', '.join(r.name for r in group)}; prepared cache {cache})"
        try:
            table, leak = table1_table(open_cache(cache).index, read_split(first.path / "split.csv"), title)
        except CxrdxError as exc:
            parts.append(note(f"{first.name}: no Table 1: {exc}"))
            continue
        parts += [report.html(table), _leakage_note(leak)]
    return Section("dataset", "Dataset (Table 1)", "".join(parts))


def _si(value: float | None) -> str:
    if value is None:
        return "n/a"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f}"


def model_rows(
    wanted: Sequence[tuple[str, int]],
    cache_file: Path | None = None,
    measure: Callable[[list[str], int], list[dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Table 2 rows for (model, input size) pairs, reusing `cache_file`; `measure` defaults to
    cxrdx.models.model_table. Returns the rows and a note per model that could not be measured."""
    cached: dict[str, dict[str, Any]] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = {f"{r['model']}@{r['resolution']}": r for r in json.loads(cache_file.read_text(encoding="utf-8"))}
        except (ValueError, KeyError, TypeError):
            cached = {}
    rows, notes, fresh = [], [], False
    for name, size in wanted:
        key = f"{name}@1*{size}*{size}"
        if key not in cached:
            if measure is None:
                from cxrdx.models import model_table as measure
            try:
                cached[key] = measure([name], size)[0]
                fresh = True
            except Exception as exc:  # noqa: BLE001 - an unbuildable model is a note in the page, not a failed report
                notes.append(f"{name} at {size} px: not measured ({exc.__class__.__name__}: {exc})")
                continue
        rows.append(cached[key])
    if fresh and cache_file is not None:
        write_text(cache_file, json.dumps(list(cached.values()), indent=1) + "\n")
    return rows, notes


def models_section(runs: list[Run], cache_file: Path | None) -> Section:
    wanted = list(dict.fromkeys((r.model, r.input_size) for r in runs if isinstance(r.model, str) and isinstance(r.input_size, int)))
    if not wanted:
        return Section("models", "Models (Table 2)", note("No config.yaml names a model and input size, so no Table 2."))
    rows, notes = model_rows(wanted, cache_file)
    users = {key: [r.name for r in runs if (r.model, r.input_size) == key] for key in wanted}
    data = pd.DataFrame(
        [[r["params"], r["macs"], r["flops"], r["resolution"]] for r in rows],
        index=pd.Index([r["model"] for r in rows], name="Model"), columns=["params", "macs", "flops", "resolution"],
    )
    display = pd.DataFrame(
        {
            "Parameters": [_si(r["params"]) for r in rows],
            "MACs": [_si(r["macs"]) for r in rows],
            "FLOPs (2 per MAC)": [_si(r["flops"]) for r in rows],
            "Input (C×H×W)": [r["resolution"].replace("*", "×") for r in rows],
            "Runs": [", ".join(users.get((r["model"], int(r["resolution"].split("*")[-1])), [])) for r in rows],
        },
        index=data.index,
    )
    table_notes = ["MACs = multiply-accumulates (the unit of the paper's “FLOPs”), counted with torch.utils.flop_counter on one image."]
    table_notes += [f"{r['model']}: {r['note']}" for r in rows if r["note"]] + notes
    return Section("models", "Models (Table 2)", report.html(report.Table("table2", "Table 2. Model size and cost", data, display, table_notes)))


# --- training ----------------------------------------------------------------------------------------


def _epochs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError:
        return []
    return [r for r in rows if isinstance(r, dict) and "epoch" in r]


def _training_facts(rows: list[dict[str, Any]]) -> str:
    best = [r for r in rows if r.get("best")]
    chosen = best[-1] if best else rows[-1]
    auroc = chosen.get("ema_val_mean_auroc") if chosen.get("ema_val_mean_auroc") is not None else chosen.get("val_mean_auroc")
    seconds = sum(float(r.get("seconds") or 0) for r in rows)
    facts = [f"{len(rows)} epoch(s)", f"selected epoch {chosen.get('epoch')}"]
    if auroc is not None:
        facts.append(f"its validation mean AUROC {report.format_value(auroc)}")
    if seconds:
        facts.append(f"{seconds / 60:.1f} min of training")
    return f"<p class='facts'>{escape(' · '.join(facts))}</p>"


def training_section(runs: list[Run]) -> Section:
    parts = []
    for run in runs:
        rows = _epochs(run.path / "metrics.jsonl")
        head = f"<h3>{escape(run.name)}</h3>" + (_training_facts(rows) if rows else "")
        if (run.path / "curves.png").is_file():
            body = figure(run.path / "curves.png", f"{run.name}: loss and validation mean AUROC per epoch")
        elif rows:
            from cxrdx.engine import plot_curves

            body = figure(_draw(plot_curves, rows), f"{run.name}: loss and validation mean AUROC per epoch (from metrics.jsonl)")
        else:
            body = note(f"No training curves: neither curves.png nor metrics.jsonl in {run.path}.")
        parts.append(f"<div class='keep'>{head}{body}</div>")
    return Section("training", "Training", "".join(parts))


# --- results -----------------------------------------------------------------------------------------


def _auroc_shade(cmp: metrics.Comparison) -> Callable[[tuple[str, ...], Any], str]:
    """Background tint for the per-finding AUROC cells: white at 0.5, deep teal at 1."""
    auc = {(f, m): cmp.auc[i, k] for i, m in enumerate(cmp.models) for k, f in enumerate(cmp.findings)}

    def style(key: tuple[str, ...], column: Any) -> str:
        value = auc.get((key[-1], column))
        if value is None or not np.isfinite(value):
            return ""
        strength = min(1.0, max(0.0, (value - 0.5) / 0.5)) ** 2  # spreads the usual 0.7-0.95 range
        return f"background:rgba(13,115,119,{0.05 + 0.6 * strength:.2f})"

    return style


def wide_table4(table: report.Table) -> report.Table:
    """Table 4 with findings as rows and (model, metric) as columns: one screen instead of four."""
    display = table.display.unstack(level="Metric")
    rest = sorted((i for i in display.index if i not in FINDINGS), key=lambda i: not str(i).startswith("Overall"))
    order = [f for f in FINDINGS if f in display.index] + rest
    metrics_order = list(dict.fromkeys(table.display.index.get_level_values("Metric")))
    columns = [(m, k) for m in table.display.columns for k in metrics_order]
    display = display.reindex(index=order, columns=pd.MultiIndex.from_tuples(columns)).fillna("")
    display.index.name = "Finding"
    return report.Table(table.name, table.title, table.data, display, table.notes)


def significance_grid(table: report.Table) -> str:
    """Table 5 as a coloured grid: *** / ** / * / n.s. between every pair of findings (ordered by AUROC)."""
    order = list(table.display.index)
    head = "<th scope='col'>Finding</th><th scope='col' class='num'>AUROC</th>"
    head += "".join(f"<th scope='col' class='rot'><span>{escape(f)}</span></th>" for f in order)
    rows = []
    for f in order:
        cells = [f"<th scope='row'>{escape(f)}</th>", f"<td class='num'>{escape(str(table.display.loc[f, 'AUROC']))}</td>"]
        for g in order:
            mark = str(table.display.loc[f, g])
            kind = "diag" if f == g else SIGNIFICANCE.get(mark, "na")
            cells.append(f"<td class='sig {kind}' title='{escape(f)} vs {escape(g)}'>{escape(mark)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    legend = "".join(f"<span class='sig {k}'>{escape(m)}</span>" for m, k in SIGNIFICANCE.items())
    notes = "".join(f"<li>{escape(n)}</li>" for n in table.notes)
    return (
        f"<figure class='table grid' id='table-{escape(table.name)}'><figcaption>{escape(table.title)}</figcaption>"
        f"<div class='scroll'><table class='sig-grid'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        f"<p class='legend'>{legend}</p><ul class='notes'>{notes}</ul></figure>"
    )


def _notes_box(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f"<div class='missing'><p>Test-set caveats:</p><ul>{items}</ul></div>"


def _keep_ci_together(table: report.Table) -> report.Table:
    """'0.842 ± 0.017 (0.805, 0.879)' may wrap only before the interval."""
    glue = lambda text: text.replace(" ± ", "\u00a0±\u00a0").replace(", ", ",\u00a0") if " ± " in text else text  # noqa: E731
    return report.Table(table.name, table.title, table.data, table.display.map(glue), table.notes)


def _ece_table(cmp: metrics.Comparison) -> report.Table:
    data = pd.DataFrame({m: cmp.evaluations[m].per_finding["ece"] for m in cmp.models})
    data.index.name = "Finding"
    data.loc["Overall (mean over findings)"] = data.mean()
    display = data.map(report.format_value)
    notes = ["ECE: expected calibration error, |observed positive fraction − mean probability| over 10 equal-width bins, weighted by the images in each bin; 0 is perfect."]
    return report.Table("ece", "Calibration: ECE by finding", data, display, notes)


def bootstrap_table(run: Run, result: dict[str, Any]) -> report.Table | None:
    """AUROC with its DeLong and its bootstrap CI per finding (`cxrdx evaluate --bootstrap N`); None without them."""
    try:
        boot, overall = result["overall"]["auroc_bootstrap"], result["overall"]["auroc"]
        per = pd.DataFrame.from_dict(result["per_finding"], orient="index")
        data = per[["auroc", "auroc_low", "auroc_high", "auroc_boot_low", "auroc_boot_high"]].apply(pd.to_numeric, errors="coerce")
        data.loc["Overall (mean over findings)"] = [overall["mean"], overall["low"], overall["high"], boot["low"], boot["high"]]
        data = data.astype(np.float64)
        replicates, unit, level = int(boot["replicates"]), str(boot["unit"]), float(result["overall"].get("level", 0.95))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    data.index.name = "Finding"
    interval = lambda lo, hi: f"{report.format_value(lo)}–{report.format_value(hi)}" if np.isfinite(lo) and np.isfinite(hi) else report.DASH  # noqa: E731
    display = pd.DataFrame(
        {
            "AUROC": data["auroc"].map(report.format_value),
            f"{round(level * 100)}% CI (DeLong)": [interval(lo, hi) for lo, hi in data[["auroc_low", "auroc_high"]].to_numpy()],
            f"{round(level * 100)}% CI (bootstrap)": [interval(lo, hi) for lo, hi in data[["auroc_boot_low", "auroc_boot_high"]].to_numpy()],
        },
        index=data.index,
    )
    whole = " (a drawn patient brings all their images)" if unit == "patient" else ""
    notes = [f"Bootstrap: percentile interval over {replicates} resamples of the test {unit}s{whole}.",
             "Overall row: the mean AUROC over findings; its first interval is the t-interval over findings."]
    return report.Table(f"bootstrap-{_slug(run.name)}", f"AUROC with {unit}-level bootstrap CIs: {run.name}", data, display, notes)


def expert_labels_table(run: Run, result: dict[str, Any]) -> report.Table | None:
    """AUROC against expert labels beside the NLP labels (`cxrdx evaluate --expert-labels`); None without them."""
    expert = result.get("expert_labels")
    if not isinstance(expert, dict) or not expert:
        return None
    try:
        table = report.expert_table(pd.DataFrame.from_dict(expert, orient="index").apply(pd.to_numeric, errors="coerce"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return report.Table(f"expert-{_slug(run.name)}", f"{table.title}: {run.name}", table.data, table.display, table.notes)


def _evaluate_extras(run: Run) -> str:
    """What `cxrdx evaluate` stored beyond the basics: bootstrap CIs and expert-label AUROCs, when present."""
    from cxrdx.evaluation import read_metrics

    result = read_metrics(run.path / EVAL)
    tables = [t for t in (bootstrap_table(run, result), expert_labels_table(run, result)) if t is not None]
    return "".join(report.html(t) for t in tables)


def results_sections(groups: list[Scores], notes: list[str]) -> list[Section]:
    if not groups:
        text = "No evaluation: run `cxrdx evaluate --checkpoint RUN/checkpoints/best.pt --out RUN/eval` for Tables 3–5, ROC curves and calibration."
        return [Section("results", "Results", "".join(note(n, "warn") for n in notes) + note(text))]
    perf, tests, roc, calibration = [], [], [], []
    for group in groups:
        cmp = group.cmp
        label = f"<h3>{escape(', '.join(cmp.models))}</h3>" if len(groups) > 1 else ""
        per_finding = report.html(report.calibration_table(cmp))
        perf += [label, _notes_box(cmp.notes), report.html(_keep_ci_together(report.table3(cmp)), _auroc_shade(cmp)),
                 f"<details><summary>AUROC per finding with its 95% DeLong CI, threshold and ECE</summary>{per_finding}</details>",
                 report.html(_keep_ci_together(wide_table4(report.table4(cmp))))]
        perf += [_evaluate_extras(run) for run in group.runs]
        tests.append(label)
        if len(cmp.models) > 1:
            tests += [report.html(report.delong_table(cmp)), report.html(report.anova_table(cmp))]
        tests += [significance_grid(report.table5(cmp, m)) for m in cmp.models]
        stored = group.runs[0].path / EVAL / "roc.png"  # evaluate drew it for a single model
        png = stored if len(group.runs) == 1 and stored.is_file() else _draw(report.roc_figure, group.y, group.probs, cmp.findings)
        roc.append(label + figure(png, f"ROC curves: {', '.join(cmp.models)} (AUROC in the legend)"))
        calibration += [label, report.html(_ece_table(cmp))]
        for i, run in enumerate(group.runs):
            stored = run.path / EVAL / "reliability.png"
            png = stored if stored.is_file() else _draw(report.reliability_figure, group.y, group.probs[run.name], cmp.findings)
            shown = figure(png, f"Reliability diagrams: {run.name} (observed positive fraction against predicted probability)")
            calibration.append(shown if i == 0 else f"<details><summary>Reliability diagrams: {escape(run.name)}</summary>{shown}</details>")
    head = "".join(note(n, "warn") for n in notes)
    return [
        Section("performance", "Performance (Tables 3 and 4)", head + "".join(perf)),
        Section("significance", "Statistical tests (Table 5)", "".join(tests)),
        Section("roc", "ROC curves", "".join(roc)),
        Section("calibration", "Calibration", "".join(calibration)),
    ]


# --- explanations and localization -------------------------------------------------------------------


def _explanations(folder: Path) -> pd.DataFrame:
    """explain's explanations.csv, or the panels found as FINDING/IMAGE.METHOD.png."""
    table = folder / "explanations.csv"
    if table.is_file():
        try:
            frame = pd.read_csv(table)
        except (ValueError, OSError):
            frame = pd.DataFrame()
        if {"Image Index", "Finding", "probability", "png"} <= set(frame.columns):
            return frame
    rows = [
        {"Image Index": p.name.split(".")[0], "Finding": p.parent.name, "probability": np.nan, "png": str(p)}
        for p in sorted(folder.glob("*/*.png")) if p.parent.name in FINDINGS
    ]
    return pd.DataFrame(rows, columns=["Image Index", "Finding", "probability", "png"])


def _lookup(table: pd.DataFrame, name: str) -> pd.Series | None:
    """A row by Image Index, also when one side drops the file extension."""
    if name in table.index:
        return table.loc[name]
    stems = {Path(i).stem: i for i in table.index}
    return table.loc[stems[Path(name).stem]] if Path(name).stem in stems else None


OUTCOMES = {
    (True, 1): ("correct", "true positive"), (False, 0): ("correct", "true negative"),
    (True, 0): ("wrong", "false positive"), (False, 1): ("wrong", "missed (false negative)"),
}


def _optional(read: Callable[[Path], pd.DataFrame], path: Path) -> pd.DataFrame | None:
    """A table the panels can do without: None when missing or damaged (the evaluation section reports why)."""
    try:
        return read(path)
    except CxrdxError:
        return None


def classify_panels(run: Run) -> pd.DataFrame:
    """The run's explanation panels with probability, label and outcome (correct / wrong / unknown)."""
    from cxrdx.evaluation import read_labels, read_predictions

    frame = _explanations(run.path / EXPLAIN)
    frame = frame[frame["Finding"].isin(FINDINGS)].assign(probability=pd.to_numeric(frame["probability"], errors="coerce"))
    labels = _optional(read_labels, run.path / EVAL / "labels.csv")
    preds = _optional(read_predictions, run.path / EVAL / "predictions.csv")
    thresholds = np.broadcast_to(_thresholds(run), (len(FINDINGS),))
    records = []
    for row in frame.to_dict("records"):
        name, finding, p = str(row["Image Index"]), row["Finding"], float(row["probability"])
        if not np.isfinite(p) and preds is not None:
            found = _lookup(preds, name)
            p = float(found[finding]) if found is not None else np.nan
        truth = _lookup(labels, name) if labels is not None else None
        label = int(truth[finding]) if truth is not None else None
        threshold = float(thresholds[FINDINGS.index(finding)])
        if np.isfinite(p):
            kind, outcome = OUTCOMES.get((bool(p >= threshold), label), ("unknown", "label unknown"))
        else:
            kind, outcome = "unknown", "probability unknown"
        png = Path(str(row["png"]))
        if not png.is_file():  # explain ran elsewhere: the panel keeps its place in RUN/explain
            png = run.path / EXPLAIN / finding / png.name
        method = png.name.split(".")[-2] if png.name.count(".") >= 2 else ""
        records.append({"image": name, "finding": finding, "p": p, "threshold": threshold, "label": label,
                        "kind": kind, "outcome": outcome, "png": png, "method": method})
    return pd.DataFrame(records, columns=["image", "finding", "p", "threshold", "label", "kind", "outcome", "png", "method"])


def _panel(row: pd.Series) -> str:
    label = {1: "labelled positive", 0: "labelled negative"}.get(row["label"], "label unknown")
    p = f"p = {row['p']:.3f} (threshold {row['threshold']:.2f})" if np.isfinite(row["p"]) else "p unknown"
    return (
        f"<figure class='panel {row['kind']}'>{image(row['png'], f'{row.image} {row.finding}')}"
        f"<figcaption><b>{escape(row['finding'])}</b> · {escape(row['image'])}<br>{escape(p)} · {escape(label)} "
        f"<span class='tag {row['kind']}'>{escape(row['outcome'])}</span></figcaption></figure>"
    )


def _pick(panels: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The most telling panels: confident hits for correct; for wrong, the most confident false
    positives and misses taken in turn."""
    chosen = panels[(panels["kind"] == kind) & panels["png"].map(Path.is_file)]
    if kind != "wrong":
        return chosen.sort_values("p", ascending=False).head(PANELS)
    margin = (chosen["p"] - chosen["threshold"]).abs()
    turn = margin.groupby(chosen["outcome"]).rank(ascending=False, method="first")
    return chosen.assign(turn=turn, margin=margin).sort_values(["turn", "margin"], ascending=[True, False]).head(PANELS)


def explanations_section(runs: list[Run]) -> Section:
    parts, methods = [], set()
    for run in runs:
        head = f"<h3>{escape(run.name)}</h3>"
        if not (run.path / EXPLAIN).is_dir():
            parts.append(head + note(f"No explanations: run `cxrdx explain --checkpoint {run.path}/checkpoints/best.pt --split test --limit 16 --out {run.path}/{EXPLAIN}`."))
            continue
        panels = classify_panels(run)
        if panels.empty:
            parts.append(head + note(f"No panels in {run.path / EXPLAIN}."))
            continue
        methods |= {METHOD_NAMES.get(m, m) for m in panels["method"] if m}
        body = []
        for kind, title in (("correct", "Correct predictions"), ("wrong", "Wrong predictions"), ("unknown", "Without a label to check")):
            picked = _pick(panels, kind)
            if len(picked):
                body.append(f"<h4 class='{kind}'>{title} <small>({len(picked)} of {int((panels['kind'] == kind).sum())})</small></h4>"
                            f"<div class='panels'>{''.join(_panel(r) for _, r in picked.iterrows())}</div>")
        if not any(kind in panels["kind"].to_numpy() for kind in ("correct", "wrong")):
            body.insert(0, note("No labels to sort the panels into correct and wrong: RUN/eval/labels.csv is missing, damaged or lacks these images."))
        parts.append(head + "".join(body))
    explain_note = ("Each panel: the X-ray, then the same X-ray under the saliency map (red = where the evidence for the finding lies). "
                    "Correct: the call at the decision threshold matches the label; wrong: a false positive or a miss, most confident first.")
    title = f"Where the model looks ({', '.join(sorted(methods)) or 'Group-CAM'})"
    return Section("explanations", title, f"<p class='lead'>{escape(explain_note)}</p>" + "".join(parts))


def localization_table(summary: dict[str, Any], name: str) -> report.Table:
    records = pd.DataFrame(summary.get("summary") or [])
    if records.empty:
        raise CxrdxError("no boxed findings were scored")
    methods = list(dict.fromkeys(records["method"]))
    wide = records.pivot_table(index="Finding", columns="method", values=["pointing_game", "iou"], aggfunc="first")
    boxes = records.groupby("Finding")["n"].max()
    order = [f for f in FINDINGS if f in boxes.index] + [f for f in boxes.index if f not in FINDINGS]
    data = pd.DataFrame({("", "Boxes"): boxes}).join(
        pd.DataFrame({(METHOD_NAMES.get(m, m), label): wide[(metric, m)] for m in methods
                      for metric, label in (("pointing_game", "Pointing game"), ("iou", "IoU"))})
    ).reindex(order)
    data.index = ["All boxed findings" if i == "all" else i for i in data.index]
    data.index.name = "Finding"
    display = data.astype(object).copy()
    display[("", "Boxes")] = data[("", "Boxes")].map(lambda v: f"{int(v):,}")
    for column in data.columns[1:]:
        display[column] = data[column].map(report.format_value)
    mode = summary.get("threshold_mode", "relative")
    threshold = float(summary.get("threshold", 0.5))
    cut = f"map ≥ {threshold:g} × its maximum" if mode == "relative" else f"the top {threshold:.0%} of pixels"
    notes = [
        f"Pointing game: share of boxed findings whose map maximum lies in a box (tolerance {summary.get('tolerance', 0)} px). IoU: {cut} against the boxes.",
        f"{summary.get('images', '?')} boxed image(s)" + (f" of the {summary['split']} split" if summary.get("split") else "") + ".",
    ]
    flat = records.groupby("method")["flat"].max()
    notes += [f"{METHOD_NAMES.get(m, m)}: {int(v)} flat map(s) (nothing highlighted) counted as misses." for m, v in flat.items() if v]
    return report.Table("localization", f"Localization against the boxes: {name}", data, display, notes)


def localization_section(runs: list[Run]) -> Section:
    parts = []
    for run in runs:
        path = run.path / LOCALIZE / "localization.json"
        if not path.is_file():
            parts.append(note(f"{run.name}: no localization: run `cxrdx localize --checkpoint {run.path}/checkpoints/best.pt --out {run.path}/{LOCALIZE}`."))
            continue
        try:
            parts.append(report.html(localization_table(json.loads(path.read_text(encoding="utf-8")), run.name)))
        except (ValueError, KeyError, CxrdxError) as exc:
            parts.append(note(f"{run.name}: {path} not usable ({exc})."))
    return Section("localization", "Localization", "".join(parts))


# --- settings and the page ---------------------------------------------------------------------------


def settings_section(runs: list[Run]) -> Section:
    parts = []
    for run in runs:
        config = run.path / "config.yaml"
        body = f"<pre>{escape(config.read_text(encoding='utf-8'))}</pre>" if config.is_file() else note(f"No config.yaml in {run.path}.")
        evaluation = run.path / EVAL / "metrics.json"
        if evaluation.is_file():
            try:
                settings = json.loads(evaluation.read_text(encoding="utf-8")).get("settings") or {}
            except ValueError:
                settings = {}
            if settings:
                body += "<h4>Evaluation</h4><dl class='kv'>" + "".join(
                    f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in settings.items()) + "</dl>"
        parts.append(f"<details><summary>{escape(run.name)}: config.yaml and evaluation settings</summary>{body}</details>")
    return Section("settings", "Settings", "".join(parts))


STYLE = """
:root{--ink:#1c2430;--muted:#5b6675;--line:#dfe3e8;--soft:#f5f7f9;--accent:#0d7377;--ok:#17803d;--bad:#b42318;--warn:#9a6700}
*{box-sizing:border-box}
html{-webkit-print-color-adjust:exact;print-color-adjust:exact}
body{margin:0;background:#fff;color:var(--ink);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main,header.hero,nav{max-width:1180px;margin:0 auto;padding:0 28px}
header.hero{padding-top:28px;padding-bottom:8px}
.eyebrow{margin:0;color:var(--muted);font-size:12.5px;letter-spacing:.04em;text-transform:uppercase}
h1{font-size:28px;line-height:1.2;margin:6px 0 10px;font-weight:650}
h2{font-size:21px;margin:40px 0 12px;padding-bottom:6px;border-bottom:2px solid var(--ink);font-weight:650}
h3{font-size:16.5px;margin:24px 0 8px}
h4{font-size:14.5px;margin:18px 0 8px}
h4.correct{color:var(--ok)}h4.wrong{color:var(--bad)}h4 small{color:var(--muted);font-weight:400}
code,pre{font:12.5px/1.45 ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace}
code{background:var(--soft);padding:1px 4px;border-radius:3px}
pre{background:var(--soft);border:1px solid var(--line);padding:12px 14px;overflow:auto;max-height:480px}
.headline{font-size:18px;margin:4px 0 14px}
.headline .big{font-size:30px;color:var(--accent);font-variant-numeric:tabular-nums}
.headline .ci{color:var(--muted);font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;margin:0 0 16px}
.cards div{border:1px solid var(--line);border-radius:8px;padding:8px 12px;background:var(--soft)}
.cards dt{font-size:12px;color:var(--muted)}.cards dd{margin:0;font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.runs{color:var(--muted);font-size:13px}
nav{position:sticky;top:0;background:rgba(255,255,255,.96);border-bottom:1px solid var(--line);z-index:2}
nav ol{list-style:none;display:flex;flex-wrap:wrap;gap:4px 18px;margin:0;padding:8px 0;font-size:13.5px}
nav a{color:var(--accent);text-decoration:none}nav a:hover{text-decoration:underline}
.forest{margin:4px 0 14px;max-width:760px}
.forest-row{display:grid;grid-template-columns:170px 1fr 56px;align-items:center;gap:10px;height:24px}
.forest-name{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.forest-track{position:relative;height:14px;background:linear-gradient(90deg,var(--soft),var(--soft));border-radius:3px}
.forest-bar{position:absolute;left:0;top:0;bottom:0;background:rgba(13,115,119,.28);border-radius:3px}
.forest-ci{position:absolute;top:5px;height:4px;background:var(--accent);border-radius:2px}
.forest-value{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
.forest-row.axis{height:16px}.forest-row.axis .forest-track{background:none;height:16px;border-top:1px solid var(--line)}
.forest-row.axis span span{position:absolute;transform:translateX(-50%);font-size:11px;color:var(--muted)}
figure{margin:14px 0 22px}
figcaption{font-weight:600;margin:0 0 6px}
figure.plot img{display:block;max-width:100%;height:auto;border:1px solid var(--line)}
figure.plot figcaption{font-weight:400;color:var(--muted);font-size:13px;margin:6px 0 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{padding:4px 9px;border-bottom:1px solid var(--line);vertical-align:top}
thead th{border-bottom:2px solid var(--ink);text-align:left;font-weight:600;vertical-align:bottom;white-space:nowrap}
thead th.group{text-align:center;border-bottom:1px solid var(--muted)}
tbody th{text-align:left;font-weight:500;white-space:nowrap}
td.num,th.num{text-align:right;white-space:nowrap}
tbody tr:hover{background:#fafbfc}
tr.overall th,tr.overall td{border-top:2px solid var(--muted);font-weight:600}
tbody th[rowspan]{background:var(--soft);font-weight:600}
tr.overall td.num,tr.overall th,thead tr+tr th.num{white-space:normal}
ul.notes{margin:6px 0 0;padding-left:18px;color:var(--muted);font-size:12.5px;max-width:900px}
p.missing,div.missing{color:var(--muted);font-style:italic;border-left:3px solid var(--line);padding:2px 10px}
div.missing p{margin:0}div.missing ul{margin:2px 0 4px;padding-left:18px;font-size:12.5px}
p.warn{border-left:3px solid var(--warn);background:#fff8e6;padding:6px 10px}
p.ok{border-left:3px solid var(--ok);background:#eefaf1;padding:6px 10px}
p.lead{color:var(--muted);max-width:900px}
p.facts{color:var(--muted);margin:0 0 6px}
table.sig-grid{font-size:12.5px}
table.sig-grid th.rot{height:128px;padding:4px 2px;vertical-align:bottom;border-bottom:2px solid var(--ink)}
table.sig-grid th.rot span{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:500}
td.sig{text-align:center;min-width:30px;padding:3px 2px;border:1px solid #fff}
.sig.s3{background:#0b4f6c;color:#fff}.sig.s2{background:#2f7fa8;color:#fff}.sig.s1{background:#9cc7dd}
.sig.ns{background:#eef1f4;color:#8a94a1}.sig.diag{background:#fff}.sig.na{background:#fff;color:#aab}
p.legend{font-size:12.5px;display:flex;gap:6px;align-items:center}
p.legend span{display:inline-block;min-width:40px;text-align:center;padding:1px 6px;border-radius:3px}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
figure.panel{margin:0;border:1px solid var(--line);border-top:4px solid var(--muted);border-radius:6px;overflow:hidden;break-inside:avoid}
figure.panel.correct{border-top-color:var(--ok)}figure.panel.wrong{border-top-color:var(--bad)}
figure.panel img{display:block;width:100%;height:auto}
figure.panel figcaption{font-weight:400;font-size:12.5px;padding:6px 10px 8px;margin:0}
.tag{display:inline-block;font-size:11.5px;padding:0 6px;border-radius:9px;background:var(--soft);color:var(--muted)}
.tag.correct{background:#e3f4e8;color:var(--ok)}.tag.wrong{background:#fde8e6;color:var(--bad)}
details{border:1px solid var(--line);border-radius:6px;padding:6px 12px;margin:10px 0}
details summary{cursor:pointer;font-weight:600}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:13px}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace}
footer{max-width:1180px;margin:40px auto 30px;padding:12px 28px;color:var(--muted);font-size:12.5px;border-top:1px solid var(--line)}
@media print{
 body{font-size:10pt}table{font-size:8.5pt}nav{display:none}main,header.hero,footer{max-width:none;padding:0}
 h2{break-after:avoid;margin-top:24px}h3,h4,figcaption{break-after:avoid}
 figure,tr,.cards,.forest,.keep{break-inside:avoid}
 details{border:none;padding:0}details::details-content{content-visibility:visible;display:block}
 pre{max-height:none;white-space:pre-wrap}.scroll{overflow:visible}
 @page{margin:14mm}
}
"""


def _guarded(anchor: str, title: str, build: Callable[..., Section], *args: Any) -> Section:
    """A section, or a note saying why it could not be built: a damaged file must not cost the whole page."""
    try:
        return build(*args)
    except (CxrdxError, OSError, ValueError, KeyError, TypeError) as exc:
        return Section(anchor, title, note(f"This part could not be built: {exc.__class__.__name__}: {exc}", "warn"))


def render_page(title: str, header: str, sections: Sequence[Section], footer: str) -> str:
    nav = "".join(f"<li><a href='#{s.id}'>{escape(s.title)}</a></li>" for s in sections)
    body = "".join(f"<section id='{s.id}'><h2>{escape(s.title)}</h2>{s.body}</section>" for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"{header}<nav><ol>{nav}</ol></nav><main>{body}</main><footer>{footer}</footer></body></html>\n"
    )


def _plain(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready numbers: NaN becomes null."""
    return {k: (float(v) if np.isfinite(v) else None) if isinstance(v, (float, np.floating)) else v for k, v in summary.items()}


def _summary(groups: list[Scores], path: Path) -> dict[str, Any]:
    best = _best(groups)
    models = {m: _plain(g.cmp.evaluations[m].overall["auroc"]) for g in groups for m in g.cmp.models}
    return {
        "report": str(path),
        "best_model": best[0] if best else None,
        "mean_auroc": _plain(best[1]) if best else None,
        "images": best[2] if best else None,
        "models": models,
    }


def headline(summary: dict[str, Any]) -> str:
    """'best model NAME: mean AUROC 0.842 ± 0.017 (95% CI 0.805–0.879) on N test images' (from summary.json)."""
    if not summary.get("best_model"):
        return "no evaluated model (run cxrdx evaluate --out RUN/eval)"
    auc = {k: np.nan if v is None else v for k, v in summary["mean_auroc"].items()}
    which = "best model" if len(summary.get("models") or {}) > 1 else "model"
    return f"{which} {summary['best_model']}: mean AUROC {_ci(auc)} on {summary['images']:,} test images"


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    extra_sections: Sequence[tuple[str, str]] | None = None,
    title: str = "Chest X-ray diagnosis: report",
    progress: bool = True,
) -> Path:
    """Write OUT/report.html (self-contained) and OUT/summary.json for run folders; returns report.html's path.

    `extra_sections`: (title, HTML fragment) pairs placed right after the overview, e.g. the demo's
    timings; the fragments are inserted as given (escape any text with html.escape).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    runs = open_runs(run_dirs, names)
    steps = ["scores", "dataset", "models", "training", "results", "explanations", "localization", "page"]
    with tqdm(total=len(steps), desc="report", unit="part", disable=not progress, leave=False) as bar:

        def step(value: Any) -> Any:
            bar.update(1)
            return value

        groups, notes = step(score_runs(runs))
        overview = Section("overview", "Runs", _runs_table(runs))
        extras = [Section(f"extra-{i}-{_slug(t)}", t, body) for i, (t, body) in enumerate(extra_sections or [])]
        sections = [
            overview, *extras,
            step(_guarded("dataset", "Dataset (Table 1)", dataset_section, runs)),
            step(_guarded("models", "Models (Table 2)", models_section, runs, out / TABLE2)),
            step(_guarded("training", "Training", training_section, runs)),
            *step(results_sections(groups, notes)),
            step(_guarded("explanations", "Where the model looks", explanations_section, runs)),
            step(_guarded("localization", "Localization", localization_section, runs)),
            _guarded("settings", "Settings", settings_section, runs),
        ]
        path = out / REPORT
        footer = (f"Written by cxrdx {escape(__version__)} from {', '.join(_code(str(r.path.resolve())) for r in runs)}. "
                  "Self-contained: every figure is embedded; no network access is needed to view or print it.")
        page = render_page(title, _header(title, runs, groups), sections, footer)
        write_text(path, page)
        write_text(out / SUMMARY, json.dumps(_summary(groups, path), indent=1) + "\n")
        step(None)
    return path
