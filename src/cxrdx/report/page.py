"""The HTML report: one self-contained page (`report.html`) for one or more run folders (`cxrdx report`).

The run folders are read through `cxrdx.rundir` (its docstring lists the layout); every part is
optional and a missing one becomes a short note in the page. Table 1 needs the prepared cache the
config names (data.cache) for the labels of the split's images. Runs evaluated on the same test
images are compared (Tables 3-5, DeLong, ANOVA); otherwise each run gets its own tables.

The page is rendered from the Jinja2 template `templates/report.html.j2` with the style sheet
`templates/report.css`; `template_dir` overrides either with a file of the same name. The output
folder receives report.html, summary.json (the headline numbers) and table2.json (Table 2 rows,
reused by later reports: counting FLOPs costs a forward pass per model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrdx import __version__
from cxrdx.atomic import write_text
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.jsonsafe import to_json_safe
from cxrdx.report import sections as s
from cxrdx.report.tables import format_value, slug

REPORT, SUMMARY, TABLE2 = "report.html", "summary.json", "table2.json"
TEMPLATE = "report.html.j2"
AXIS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Best:
    """The headline: the model with the highest mean AUROC, its numbers formatted."""

    model: str
    mean: str
    se: str
    low: str
    high: str
    several: bool  # more than one model on the page


@dataclass(frozen=True)
class ForestRow:
    """One model's mean AUROC bar and CI, positions in per cent along the 0.5-1 axis."""

    name: str
    mean: str
    low: str
    width: str
    value: str


def _best(groups: list[s.Scores]) -> tuple[str, dict[str, float], int] | None:
    """(model, its mean AUROC summary, test images) with the highest mean AUROC."""
    scored = [(g.cmp.evaluations[m].overall.auroc._asdict(), m, len(g.y)) for g in groups for m in g.cmp.models]
    scored = [x for x in scored if np.isfinite(x[0]["mean"])]
    if not scored:
        return None
    summary, model, images = max(scored, key=lambda x: x[0]["mean"])
    return model, summary, images


def _models(groups: list[s.Scores]) -> list[str]:
    return [m for g in groups for m in g.cmp.models]


def _position(auroc: float) -> float:
    """Per cent along the 0.5-1 AUROC axis."""
    return 100 * min(1.0, max(0.0, (auroc - 0.5) / 0.5))


def forest_rows(groups: list[s.Scores]) -> list[ForestRow]:
    """Each model's mean AUROC with its CI as a horizontal bar on a 0.5-1 scale."""
    rows = []
    pos = _position
    for group in groups:
        for model in group.cmp.models:
            x = group.cmp.evaluations[model].overall.auroc._asdict()
            if not np.isfinite(x["mean"]):
                continue
            low, high = (pos(x[k]) if np.isfinite(x[k]) else pos(x["mean"]) for k in ("low", "high"))
            rows.append(ForestRow(model, f"{pos(x['mean']):.1f}", f"{low:.1f}", f"{max(high - low, 0.4):.1f}", format_value(x["mean"])))
    return rows


def header_context(runs: list[s.Run], groups: list[s.Scores]) -> dict[str, Any]:
    """The template's header variables: best, facts, forest, axis."""
    models = _models(groups)
    best = _best(groups)
    context: dict[str, Any] = {
        "best": None,
        "facts": [],
        "forest": forest_rows(groups),
        "axis": [(f"{_position(t):.0f}", f"{t:.1f}") for t in AXIS],
    }
    if best is None:
        return context
    model, summary, images = best
    overall = next(g.cmp.evaluations[model] for g in groups if model in g.cmp.evaluations).overall
    several = len(models) > 1
    f = format_value
    context["best"] = Best(model, f(summary["mean"]), f(summary["se"]), f(summary["low"]), f(summary["high"]), several)
    context["facts"] = [
        ("Test images", f"{images:,}"),
        ("Findings with an AUROC", f"{summary['n']} of {len(FINDINGS)}"),
        ("Models", str(len(models))),
        ("Macro F1" + (" (best model)" if several else ""), f(overall.macro_f1.mean, 2)),
        ("All findings correct", f(overall.exact_match_accuracy)),
    ]
    return context


def template_environment(template_dir: str | Path | None = None) -> Any:
    """Jinja2 with autoescaping; files in `template_dir` win over the packaged report.html.j2 and report.css."""
    import jinja2

    loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("cxrdx.report", "templates")]
    if template_dir is not None:
        if not Path(template_dir).is_dir():
            raise CxrdxError(f"--template-dir {template_dir}: no such folder")
        loaders.insert(0, jinja2.FileSystemLoader(str(template_dir)))
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=True, keep_trailing_newline=True)


def render_page(
    title: str, runs: list[s.Run], groups: list[s.Scores], sections: Sequence[s.Section], template_dir: str | Path | None = None
) -> str:
    import jinja2
    from markupsafe import Markup

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    shown = [s.Section(x.id, x.title, Markup(x.body)) for x in sections]  # bodies are HTML built with escape()
    try:
        template = template_environment(template_dir).get_template(TEMPLATE)
        return template.render(title=title, version=__version__, stamp=stamp, runs=runs, sections=shown, **header_context(runs, groups))
    except jinja2.TemplateError as exc:
        raise CxrdxError(f"report template: {exc.__class__.__name__}: {exc}") from None


def _summary(groups: list[s.Scores], path: Path) -> dict[str, Any]:
    best = _best(groups)
    models = {m: to_json_safe(g.cmp.evaluations[m].overall.auroc._asdict()) for g in groups for m in g.cmp.models}
    return {
        "report": str(path),
        "best_model": best[0] if best else None,
        "mean_auroc": to_json_safe(best[1]) if best else None,
        "images": best[2] if best else None,
        "models": models,
    }


def headline(summary: dict[str, Any]) -> str:
    """'best model NAME: mean AUROC 0.842 ± 0.017 (95% CI 0.805–0.879) on N test images' (from summary.json)."""
    if not summary.get("best_model"):
        return "no evaluated model (run cxrdx evaluate --out RUN/eval)"
    auc = {k: np.nan if v is None else v for k, v in summary["mean_auroc"].items()}
    f = format_value
    which = "best model" if len(summary.get("models") or {}) > 1 else "model"
    ci = f"{f(auc['mean'])} ± {f(auc['se'])} (95% CI {f(auc['low'])}–{f(auc['high'])})"
    return f"{which} {summary['best_model']}: mean AUROC {ci} on {summary['images']:,} test images"


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    extra_sections: Sequence[tuple[str, str]] | None = None,
    title: str = "Chest X-ray diagnosis: report",
    progress: bool = True,
    template_dir: str | Path | None = None,
) -> Path:
    """Write OUT/report.html (self-contained) and OUT/summary.json for run folders; returns report.html's path.

    `extra_sections`: (title, HTML fragment) pairs placed right after the overview, e.g. the demo's
    timings; the fragments are inserted as given (escape any text with html.escape).
    `template_dir`: a folder with report.html.j2 and/or report.css replacing the packaged ones.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    runs = s.open_runs(run_dirs, names)
    template_environment(template_dir)  # a wrong folder fails before the work
    steps = ["scores", "dataset", "models", "training", "results", "explanations", "localization", "external", "page"]
    with tqdm(total=len(steps), desc="report", unit="part", disable=not progress, leave=False) as bar:

        def step(value: Any) -> Any:
            bar.update(1)
            return value

        groups, notes = step(s.score_runs(runs))
        overview = s.Section("overview", "Runs", s.runs_table(runs))
        extras = [s.Section(f"extra-{i}-{slug(t)}", t, body) for i, (t, body) in enumerate(extra_sections or [])]
        sections = [
            overview,
            *extras,
            step(s.guarded("dataset", "Dataset (Table 1)", s.dataset_section, runs)),
            step(s.guarded("models", "Models (Table 2)", s.models_section, runs, out / TABLE2)),
            step(s.guarded("training", "Training", s.training_section, runs)),
            *step(s.results_sections(groups, notes)),
            step(s.guarded("explanations", "Where the model looks", s.explanations_section, runs)),
            step(s.guarded("localization", "Localization", s.localization_section, runs)),
            step(s.guarded("external", "External validation and subgroups", s.external_section, runs)),
            s.guarded("model-card", "Model card", s.card_section, runs),
            s.guarded("settings", "Settings", s.settings_section, runs),
        ]
        path = out / REPORT
        write_text(path, render_page(title, runs, groups, sections, template_dir))
        write_text(out / SUMMARY, json.dumps(_summary(groups, path), indent=1) + "\n")
        step(None)
    return path
