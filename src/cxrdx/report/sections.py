"""The report's sections: each reads run folders through `cxrdx.rundir` and returns a `Section` (an anchor,
a title and an HTML fragment whose text is escaped here); `cxrdx.report.page` puts them into the template.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrdx import card, metrics, rundir
from cxrdx.atomic import write_text
from cxrdx.config import TrainConfig
from cxrdx.errors import CxrdxError
from cxrdx.explain.registry import TITLES
from cxrdx.findings import FINDINGS
from cxrdx.report import figures, tables
from cxrdx.rundir import EVAL, EXPLAIN, LOCALIZE

PANELS = 4  # Group-CAM panels per run and kind (correct, wrong)
SIGNIFICANCE = {"***": "s3", "**": "s2", "*": "s1", "n.s.": "ns"}


@dataclass
class Run:
    """A run folder and what the page needs to know about it up front."""

    name: str
    path: Path
    config: TrainConfig | None  # None without config.yaml

    @property
    def model(self) -> str | None:
        return self.config.model.name if self.config else None

    @property
    def input_size(self) -> int | None:
        return self.config.data.input_size if self.config else None

    def has_eval(self) -> bool:
        return (self.path / EVAL / rundir.PREDICTIONS).is_file()


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
    return [Run(name, path, rundir.read_config(path) if rundir.config_path(path).is_file() else None) for name, path in zip(labels, paths)]


def _thresholds(run: Run) -> np.ndarray | float:
    """The decision thresholds `cxrdx evaluate` used (RUN/eval/metrics.json), else 0.5."""
    stored = rundir.read_eval_metrics(run.path / EVAL).thresholds
    return 0.5 if stored is None else stored


def _score(runs: list[Run]) -> Scores:
    from cxrdx.evaluation import load_runs

    aligned = load_runs([r.path / EVAL for r in runs], [r.name for r in runs])
    probs, y = aligned.probs, aligned.labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)  # kept in cmp.notes
        cmp = metrics.compare_models(y, probs, thresholds={r.name: _thresholds(r) for r in runs})
    return Scores(runs, cmp, y, probs)


def score_runs(runs: list[Run]) -> tuple[list[Scores], list[str]]:
    """One comparison over all evaluated runs when they share the test images, else one per run."""
    evaluated = [r for r in runs if r.has_eval()]
    notes: list[str] = []
    if len(evaluated) > 1:
        try:
            return [_score(evaluated)], notes
        except CxrdxError as exc:
            notes.append(
                f"The runs cannot be compared on the same test images, so each is shown on its own, without model-vs-model tests ({exc})."
            )
    groups = []
    for run in evaluated:
        try:
            groups.append(_score([run]))
        except CxrdxError as exc:
            notes.append(f"{run.name}: evaluation not readable: {exc}")
    return groups, notes


def runs_table(runs: list[Run]) -> str:
    """The settings that tell runs apart, one row per run."""
    fields = [
        ("Model", ("model", "name")),
        ("Loss", ("loss", "name")),
        ("Input", ("data", "input_size")),
        ("Epochs", ("optim", "epochs")),
        ("Global batch", ("optim", "global_batch")),
        ("Peak LR", ("optim", "lr")),
        ("EMA", ("ema", "enabled")),
        ("Seed", ("seed",)),
    ]

    def get(config: TrainConfig | None, keys: tuple[str, ...]) -> str:
        value: Any = config
        for key in keys:
            value = getattr(value, key, None)
        return tables.DASH if value is None else str(value)

    display = pd.DataFrame(
        {label: [get(r.config, keys) for r in runs] for label, keys in fields}, index=pd.Index([r.name for r in runs], name="Run")
    )
    return tables.html(tables.Table("runs", "Runs at a glance", display, display))


# --- Table 1 and Table 2 -----------------------------------------------------------------------------


def _cache_path(run: Run) -> Path | None:
    named = run.config.data.cache if run.config else None
    if not named:
        return None
    for candidate in (Path(named), run.path / named, run.path.parent / named):
        if candidate.is_dir():
            return candidate
    return None


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

    parts: list[str] = []
    used: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        split_path = rundir.split_path(run.path)
        cache = _cache_path(run)
        if not split_path.is_file():
            parts.append(note(f"{run.name}: no split.csv in {run.path}, so no Table 1."))
            continue
        if cache is None:
            named = run.config.data.cache if run.config else None
            parts.append(
                note(f"{run.name}: the prepared cache {named or '(none named in config.yaml)'} is not here; Table 1 needs its labels.")
            )
            continue
        key = (hashlib.sha256(split_path.read_bytes()).hexdigest(), str(cache.resolve()))
        used.setdefault(key, []).append(run)
    for (_, cache_dir), group in used.items():
        first = group[0]
        title = f"Table 1. Images and labels by split (run(s) {', '.join(r.name for r in group)}; prepared cache {cache_dir})"
        try:
            table, leak = tables.table1_table(open_cache(cache_dir).index, read_split(rundir.split_path(first.path)), title)
        except CxrdxError as exc:
            parts.append(note(f"{first.name}: no Table 1: {exc}"))
            continue
        parts += [tables.html(table), _leakage_note(leak)]
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
    if measure is None:
        from cxrdx.models import model_table

        measure = model_table
    for name, size in wanted:
        key = f"{name}@1*{size}*{size}"
        if key not in cached:
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
        index=pd.Index([r["model"] for r in rows], name="Model"),
        columns=["params", "macs", "flops", "resolution"],
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
    return Section(
        "models", "Models (Table 2)", tables.html(tables.Table("table2", "Table 2. Model size and cost", data, display, table_notes))
    )


# --- training ----------------------------------------------------------------------------------------


def _epochs(run: Run) -> list[rundir.EpochRow]:
    """The run's epoch rows; [] when metrics.jsonl is missing or damaged (the section says so)."""
    try:
        return rundir.read_epochs(run.path)
    except CxrdxError:
        return []


def _training_facts(rows: list[rundir.EpochRow]) -> str:
    best = [r for r in rows if r.best]
    chosen = best[-1] if best else rows[-1]
    auroc = chosen.selected_auroc
    seconds = sum(float(r.seconds or 0) for r in rows)
    facts = [f"{len(rows)} epoch(s)", f"selected epoch {chosen.epoch}"]
    if auroc is not None:
        facts.append(f"its validation mean AUROC {tables.format_value(auroc)}")
    if seconds:
        facts.append(f"{seconds / 60:.1f} min of training")
    return f"<p class='facts'>{escape(' · '.join(facts))}</p>"


def training_section(runs: list[Run]) -> Section:
    parts = []
    for run in runs:
        rows = _epochs(run)
        head = f"<h3>{escape(run.name)}</h3>" + (_training_facts(rows) if rows else "")
        if rundir.curves_path(run.path).is_file():
            body = figure(rundir.curves_path(run.path), f"{run.name}: loss and validation mean AUROC per epoch")
        elif rows:
            body = figure(
                figures.draw(figures.plot_curves, rows), f"{run.name}: loss and validation mean AUROC per epoch (from metrics.jsonl)"
            )
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


def significance_grid(table: tables.Table) -> str:
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


def _keep_ci_together(table: tables.Table) -> tables.Table:
    """'0.842 ± 0.017 (0.805, 0.879)' may wrap only before the interval."""
    glue = lambda text: text.replace(" ± ", "\u00a0±\u00a0").replace(", ", ",\u00a0") if " ± " in text else text  # noqa: E731
    return tables.Table(table.name, table.title, table.data, table.display.map(glue), table.notes)


def _evaluate_extras(run: Run) -> str:
    """What `cxrdx evaluate` stored beyond the basics: bootstrap CIs and expert-label AUROCs, when present."""
    result = rundir.read_eval_metrics(run.path / EVAL)
    extras = [t for t in (tables.bootstrap_table(run.name, result), tables.expert_labels_table(run.name, result)) if t is not None]
    return "".join(tables.html(t) for t in extras)


def results_sections(groups: list[Scores], notes: list[str]) -> list[Section]:
    if not groups:
        text = "No evaluation: run `cxrdx evaluate --checkpoint RUN/checkpoints/best.pt --out RUN/eval` for Tables 3–5, ROC curves and calibration."
        return [Section("results", "Results", "".join(note(n, "warn") for n in notes) + note(text))]
    perf, tests, roc, calibration = [], [], [], []
    for group in groups:
        cmp = group.cmp
        label = f"<h3>{escape(', '.join(cmp.models))}</h3>" if len(groups) > 1 else ""
        per_finding = tables.html(tables.calibration_table(cmp))
        perf += [
            label,
            _notes_box(cmp.notes),
            tables.html(_keep_ci_together(tables.table3(cmp)), _auroc_shade(cmp)),
            f"<details><summary>AUROC per finding with its 95% DeLong CI, threshold and ECE</summary>{per_finding}</details>",
            tables.html(_keep_ci_together(tables.wide_table4(tables.table4(cmp)))),
        ]
        perf += [_evaluate_extras(run) for run in group.runs]
        tests.append(label)
        if len(cmp.models) > 1:
            tests += [tables.html(tables.delong_table(cmp)), tables.html(tables.anova_table(cmp))]
        tests += [significance_grid(tables.table5(cmp, m)) for m in cmp.models]
        stored = group.runs[0].path / EVAL / rundir.ROC  # evaluate drew it for a single model
        png = stored if len(group.runs) == 1 and stored.is_file() else figures.draw(figures.roc_figure, group.y, group.probs, cmp.findings)
        roc.append(label + figure(png, f"ROC curves: {', '.join(cmp.models)} (AUROC in the legend)"))
        calibration += [label, tables.html(tables.ece_table(cmp))]
        for i, run in enumerate(group.runs):
            stored = run.path / EVAL / rundir.RELIABILITY
            png = stored if stored.is_file() else figures.draw(figures.reliability_figure, group.y, group.probs[run.name], cmp.findings)
            shown = figure(png, f"Reliability diagrams: {run.name} (observed positive fraction against predicted probability)")
            calibration.append(
                shown if i == 0 else f"<details><summary>Reliability diagrams: {escape(run.name)}</summary>{shown}</details>"
            )
    head = "".join(note(n, "warn") for n in notes)
    return [
        Section("performance", "Performance (Tables 3 and 4)", head + "".join(perf)),
        Section("significance", "Statistical tests (Table 5)", "".join(tests)),
        Section("roc", "ROC curves", "".join(roc)),
        Section("calibration", "Calibration", "".join(calibration)),
    ]


# --- explanations and localization -------------------------------------------------------------------


def _lookup(table: pd.DataFrame, name: str) -> pd.Series | None:
    """A row by Image Index, also when one side drops the file extension."""
    if name in table.index:
        return table.loc[name]
    stems = {Path(i).stem: i for i in table.index}
    return table.loc[stems[Path(name).stem]] if Path(name).stem in stems else None


OUTCOMES: dict[tuple[bool, int | None], tuple[str, str]] = {
    (True, 1): ("correct", "true positive"),
    (False, 0): ("correct", "true negative"),
    (True, 0): ("wrong", "false positive"),
    (False, 1): ("wrong", "missed (false negative)"),
}


def _optional(read: Callable[[Path], pd.DataFrame], path: Path) -> pd.DataFrame | None:
    """A table the panels can do without: None when missing or damaged (the evaluation section reports why)."""
    try:
        return read(path)
    except CxrdxError:
        return None


def panel_labels(run: Run, images: Sequence[str]) -> tuple[pd.DataFrame | None, str]:
    """The labels of the panels' images and where they come from: RUN/eval/labels.csv, else the labels of
    the run's prepared cache, else the NIH table shipped with cxrdx; the first that has any of `images`."""
    from cxrdx.data.cache import open_cache
    from cxrdx.data.metadata import find_metadata

    def cache_labels(cache: Path) -> pd.DataFrame:
        index = open_cache(cache).index
        return index.set_index(index["Image Index"].astype(str))[list(FINDINGS)]

    sources: list[tuple[str, Callable[[], pd.DataFrame | None]]] = [
        (str(run.path / EVAL / rundir.LABELS), lambda: _optional(rundir.read_labels, run.path / EVAL / rundir.LABELS))
    ]
    cache = _cache_path(run)
    if cache is not None:
        sources.append((f"the prepared cache {cache}", lambda: _optional(cache_labels, cache)))
    sources.append(("the NIH label table shipped with cxrdx", lambda: _optional(rundir.read_labels, find_metadata(None))))
    for source, read in sources:
        table = read()
        if table is not None and any(_lookup(table, name) is not None for name in images):
            return table, source
    return None, ""


def classify_panels(run: Run) -> tuple[pd.DataFrame, str]:
    """The run's explanation panels with probability, label and outcome (correct / wrong / unknown), and
    where the labels came from ("" without labels)."""
    frame = rundir.read_explanations(run.path / EXPLAIN)
    frame = frame[frame["Finding"].isin(FINDINGS)].assign(probability=pd.to_numeric(frame["probability"], errors="coerce"))
    labels, source = panel_labels(run, [str(n) for n in frame["Image Index"]])
    preds = _optional(rundir.read_predictions, run.path / EVAL / rundir.PREDICTIONS)
    thresholds = np.broadcast_to(_thresholds(run), (len(FINDINGS),))
    records = []
    for row in frame.to_dict("records"):
        name, finding, p = str(row["Image Index"]), row["Finding"], float(row["probability"])
        if not np.isfinite(p) and preds is not None:
            found = _lookup(preds, name)
            p = float(found[finding]) if found is not None else np.nan
        truth = _lookup(labels, name) if labels is not None else None
        label = int(truth[finding]) if truth is not None and np.isfinite(truth[finding]) else None
        threshold = float(thresholds[FINDINGS.index(finding)])
        if np.isfinite(p):
            kind, outcome = OUTCOMES.get((bool(p >= threshold), label), ("unknown", "label unknown"))
        else:
            kind, outcome = "unknown", "probability unknown"
        png = Path(str(row["png"]))
        if not png.is_file():  # explain ran elsewhere: the panel keeps its place in RUN/explain
            png = run.path / EXPLAIN / finding / png.name
        method = png.name.split(".")[-2] if png.name.count(".") >= 2 else ""
        records.append(
            {
                "image": name,
                "finding": finding,
                "p": p,
                "threshold": threshold,
                "label": label,
                "kind": kind,
                "outcome": outcome,
                "png": png,
                "method": method,
            }
        )
    columns = ["image", "finding", "p", "threshold", "label", "kind", "outcome", "png", "method"]
    return pd.DataFrame(records, columns=columns), source


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
            parts.append(
                head
                + note(
                    f"No explanations: run `cxrdx explain --checkpoint {rundir.best_checkpoint(run.path)} --split test --limit 16 --out {run.path}/{EXPLAIN}`."
                )
            )
            continue
        panels, source = classify_panels(run)
        if panels.empty:
            parts.append(head + note(f"No panels in {run.path / EXPLAIN}."))
            continue
        methods |= {TITLES.get(m, m) for m in panels["method"] if m}
        body = []
        for kind, title in (("correct", "Correct predictions"), ("wrong", "Wrong predictions"), ("unknown", "Without a label to check")):
            picked = _pick(panels, kind)
            if len(picked):
                body.append(
                    f"<h4 class='{kind}'>{title} <small>({len(picked)} of {int((panels['kind'] == kind).sum())})</small></h4>"
                    f"<div class='panels'>{''.join(_panel(r) for _, r in picked.iterrows())}</div>"
                )
        if not source:
            body.insert(
                0,
                note(
                    "No labels to sort the panels into correct and wrong: neither RUN/eval/labels.csv, nor the prepared cache, "
                    "nor the NIH label table shipped with cxrdx has these images."
                ),
            )
        elif source != str(run.path / EVAL / rundir.LABELS):
            body.insert(0, note(f"Labels from {source}: RUN/eval/labels.csv is missing, damaged or lacks these images."))
        parts.append(head + "".join(body))
    explain_note = (
        "Each panel: the X-ray, then the same X-ray under the saliency map (red = where the evidence for the finding lies). "
        "Correct: the call at the decision threshold matches the label; wrong: a false positive or a miss, most confident first."
    )
    title = f"Where the model looks ({', '.join(sorted(methods)) or 'Group-CAM'})"
    return Section("explanations", title, f"<p class='lead'>{escape(explain_note)}</p>" + "".join(parts))


def localization_section(runs: list[Run]) -> Section:
    parts = []
    for run in runs:
        path = run.path / LOCALIZE / rundir.LOCALIZATION
        if not path.is_file():
            parts.append(
                note(
                    f"{run.name}: no localization: run `cxrdx localize --checkpoint {rundir.best_checkpoint(run.path)} --out {run.path}/{LOCALIZE}`."
                )
            )
            continue
        try:
            parts.append(tables.html(tables.localization_table(rundir.read_localization(path.parent), run.name)))
        except (ValueError, KeyError, CxrdxError) as exc:
            parts.append(note(f"{run.name}: {path} not usable ({exc})."))
    return Section("localization", "Localization", "".join(parts))


def external_section(runs: list[Run]) -> Section:
    """Per run: the generalisation table over its external evaluations (RUN/eval-NAME) and its
    subgroup tables (from RUN/eval's labels.csv columns: sex, age band, view, dataset)."""
    from cxrdx.external import compare_external
    from cxrdx.subgroups import read_subgroups, subgroup_tables

    parts = []
    for run in runs:
        internal = run.path / EVAL
        if not (internal / rundir.PREDICTIONS).is_file():
            continue
        try:
            externals = rundir.external_evals(run.path)
            if externals:
                names = ["internal", *(name for name, _ in externals)]
                _, table = compare_external(internal, [path for _, path in externals], names)
                parts.append(f"<h3>{escape(run.name)}: generalisation</h3>" + tables.html(table))
            groups = read_subgroups(internal)
            if groups is not None:
                parts.append(f"<h3>{escape(run.name)}: subgroups</h3>" + "".join(tables.html(t) for t in subgroup_tables(groups)))
        except (CxrdxError, ValueError, KeyError) as exc:
            parts.append(note(f"{run.name}: external validation and subgroups not usable ({exc})."))
    if not parts:
        parts.append(
            note(
                "No external evaluation (RUN/eval-NAME, from `cxrdx evaluate --cache OTHER --out RUN/eval-NAME`) "
                "and no subgroup columns in RUN/eval/labels.csv."
            )
        )
    return Section("external", "External validation and subgroups", "".join(parts))


# --- the model card ------------------------------------------------------------------------------------


def _card_facts(facts: Sequence[tuple[str, str]]) -> str:
    """(label, text) pairs as a definition list; a pair without a label continues the label above as a list."""
    groups: list[tuple[str, list[str]]] = []
    for label, text in facts:
        if label or not groups:
            groups.append((label, [text]))
        else:
            groups[-1][1].append(text)
    items = "".join(
        f"<dt>{escape(label)}</dt><dd>{escape(texts[0]) if len(texts) == 1 else '<ul>' + ''.join(f'<li>{escape(t)}</li>' for t in texts) + '</ul>'}</dd>"
        for label, texts in groups
    )
    return f"<dl class='card'>{items}</dl>" if items else ""


def _card_table(table: card.CardTable) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    shown = f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    return f"<details><summary>{escape(table.caption)}</summary>{shown}</details>"


def card_html(model_card: card.ModelCard, folded: str | None = None) -> str:
    """A model card as an HTML fragment: the not-for-clinical-use line, the intended use, then the sections (`folded`: under
    a <details> element with this summary)."""
    banner = ""
    if model_card.not_for_clinical_use:
        banner = f"<p class='not-clinical'>{escape(card.NOT_FOR_CLINICAL_USE)}: {escape('; '.join(model_card.not_for_clinical_use))}.</p>"
    body = "".join(
        f"<h4>{escape(part.title)}</h4>{_card_facts(part.facts)}{''.join(_card_table(t) for t in part.tables)}"
        for part in card.card_sections(model_card)
    )
    banner += f"<p><b>Intended use:</b> {escape(model_card.intended_use.primary)}</p>"
    return banner + (f"<details><summary>{escape(folded)}</summary>{body}</details>" if folded else body)


def card_section(runs: list[Run]) -> Section:
    """Each run's model card (RUN/card.json, written by training and enriched by evaluate); several are folded."""
    parts = []
    for run in runs:
        head = f"<h3>{escape(run.name)}</h3>" if len(runs) > 1 else ""
        model_card = card.read_run_card(run.path)
        if model_card is None:
            parts.append(head + note(f"No model card: run `cxrdx card --checkpoint {rundir.best_checkpoint(run.path)} --out {run.path}`."))
        else:
            parts.append(head + card_html(model_card, f"The model card of {run.name}" if len(runs) > 1 else None))
    return Section("model-card", "Model card", "".join(parts))


# --- settings and the page ---------------------------------------------------------------------------


def settings_section(runs: list[Run]) -> Section:
    parts = []
    for run in runs:
        body = f"<pre>{escape(run.config.to_yaml())}</pre>" if run.config else note(f"No config.yaml in {run.path}.")
        settings = rundir.read_eval_metrics(run.path / EVAL).settings
        if settings:
            body += (
                "<h4>Evaluation</h4><dl class='kv'>"
                + "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in settings.items())
                + "</dl>"
            )
        parts.append(f"<details><summary>{escape(run.name)}: config.yaml and evaluation settings</summary>{body}</details>")
    return Section("settings", "Settings", "".join(parts))


def guarded(anchor: str, title: str, build: Callable[..., Section], *args: Any) -> Section:
    """A section, or a note saying why it could not be built: a damaged file must not cost the whole page."""
    try:
        return build(*args)
    except (CxrdxError, OSError, ValueError, KeyError, TypeError) as exc:
        return Section(anchor, title, note(f"This part could not be built: {exc.__class__.__name__}: {exc}", "warn"))
