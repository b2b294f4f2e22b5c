"""Tables (Markdown, CSV, JSON, HTML) for evaluations.

A `Table` carries numbers (`data`, written to CSV and JSON) and their display strings (`display`,
written to Markdown and HTML). The paper's tables take a `metrics.Comparison`; the report page's
further tables (Table 1, bootstrap and expert-label AUROCs, localization) take what `cxrdx.rundir`
reads; renderers take a `Table`. The figures are in `cxrdx.report.figures`, the page in `cxrdx.report.page`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrdx import rundir
from cxrdx.atomic import write_text
from cxrdx.errors import CxrdxError
from cxrdx.explain.registry import TITLES
from cxrdx.findings import FINDINGS
from cxrdx.metrics import Comparison
from cxrdx.stats import stars

FORMATS = ("md", "csv", "json")
DASH = "–"


@dataclass
class Table:
    name: str  # file stem
    title: str
    data: pd.DataFrame  # numbers
    display: pd.DataFrame  # the same table as strings
    notes: list[str] = field(default_factory=list)


# --- number formatting ---------------------------------------------------------------------------


def format_value(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if x is not None and np.isfinite(x) else DASH


def format_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_clause(p: float) -> str:
    """'p < 0.001' or 'p = 0.037'."""
    text = format_p(p)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def format_mean_ci(summary: Mapping[str, float], digits: int = 3) -> str:
    """{'mean', 'se', 'low', 'high'} -> '0.842 ± 0.017 (0.805, 0.879)'."""
    f = lambda key: format_value(summary[key], digits)  # noqa: E731
    return f"{f('mean')} ± {f('se')} ({f('low')}, {f('high')})"


# --- renderers -----------------------------------------------------------------------------------


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """Index levels become leading columns (named, title-cased for display)."""
    names = [n or "" for n in frame.index.names]
    return frame.reset_index(names=names)


def markdown(table: Table) -> str:
    """A '### title' heading, a GitHub-flavoured Markdown table, then the notes."""
    frame = _flat(table.display).astype(str)
    cells = [list(frame.columns)] + frame.to_numpy().tolist()
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    rows = [line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells[1:])]
    notes = [f"- {n}" for n in table.notes]
    return "\n".join([f"### {table.title}", "", *rows, *([""] + notes if notes else [])]) + "\n"


_NUMBER = re.compile(r"^(?:[<>+\-−]?\.?\d|–$)")  # right-aligned: numbers, '<0.001', '+0.012 (...)', the dash


def _row_labels(keys: list[tuple[str, ...]], i: int) -> list[str]:
    """Row header cells of row i; an outer label repeated on the following rows becomes one rowspan."""
    cells, levels = [], len(keys[i])
    for level, label in enumerate(keys[i]):
        prefix = keys[i][: level + 1]
        outer = level < levels - 1
        if outer and i and keys[i - 1][: level + 1] == prefix:
            continue
        span = 1
        while outer and i + span < len(keys) and keys[i + span][: level + 1] == prefix:
            span += 1
        rowspan = f" rowspan='{span}'" if span > 1 else ""
        cells.append(f"<th scope='row'{rowspan}>{escape(label)}</th>")
    return cells


def _numeric_columns(cells: list[list[str]]) -> list[bool]:
    """A column is numeric (right-aligned) when most of its non-empty cells are numbers."""
    columns = zip(*cells) if cells else []
    flags = []
    for column in columns:
        filled = [c for c in column if c]
        flags.append(bool(filled) and 2 * sum(bool(_NUMBER.match(c)) for c in filled) >= len(filled))
    return flags


def _html_head(frame: pd.DataFrame, numeric: list[bool]) -> str:
    """Header rows; two-level columns get a spanning top row (e.g. model over metric)."""
    names = [escape(str(n or "")) for n in frame.index.names]
    two = frame.columns.nlevels > 1
    right = " class='num'"
    leaves = "".join(
        f"<th scope='col'{right if num else ''}>{escape(str(c[1] if two else c))}</th>" for c, num in zip(frame.columns, numeric)
    )
    if not two:
        return "<tr>" + "".join(f"<th scope='col'>{n}</th>" for n in names) + leaves + "</tr>"
    top = [f"<th scope='col' rowspan='2'>{n}</th>" for n in names]
    for label, group in groupby(str(c[0]) for c in frame.columns):
        top.append(f"<th scope='colgroup' colspan='{len(list(group))}' class='group'>{escape(label)}</th>")
    return f"<tr>{''.join(top)}</tr><tr>{leaves}</tr>"


def html(table: Table, cell_style: Callable[[tuple[str, ...], Any], str] | None = None) -> str:
    """An HTML fragment: the table under its title, numbers right-aligned, repeated outer row labels
    merged, 'Overall' rows marked (class overall), then the notes. The page supplies the style sheet;
    `cell_style(row key, column)` may add an inline style to a data cell (e.g. a colour scale)."""
    frame = table.display
    keys = [tuple(map(str, k)) if frame.index.nlevels > 1 else (str(k),) for k in frame.index]
    values = frame.astype(str).to_numpy().tolist()
    numeric = _numeric_columns(values)
    rows = []
    for i, line in enumerate(values):
        cells = _row_labels(keys, i)
        for column, text, num in zip(frame.columns, line, numeric):
            style = cell_style(keys[i], column) if cell_style else ""
            attributes = (" class='num'" if num else "") + (f" style='{escape(style)}'" if style else "")
            cells.append(f"<td{attributes}>{escape(text)}</td>")
        mark = " class='overall'" if keys[i][-1].startswith("Overall") else ""
        rows.append(f"<tr{mark}>{''.join(cells)}</tr>")
    notes = "".join(f"<li>{escape(n)}</li>" for n in table.notes)
    return (
        f"<figure class='table' id='table-{escape(table.name)}'><figcaption>{escape(table.title)}</figcaption>"
        f"<div class='scroll'><table><thead>{_html_head(frame, numeric)}</thead><tbody>{''.join(rows)}</tbody></table></div>"
        + (f"<ul class='notes'>{notes}</ul>" if notes else "")
        + "</figure>\n"
    )


def csv_text(table: Table) -> str:
    return _flat(table.data).to_csv(index=False)


def json_object(table: Table) -> dict[str, Any]:
    records = json.loads(_flat(table.data).to_json(orient="records", double_precision=15))
    return {"name": table.name, "title": table.title, "rows": records, "notes": table.notes}


def render(table: Table, fmt: str) -> str:
    if fmt == "md":
        return markdown(table)
    if fmt == "csv":
        return csv_text(table)
    if fmt == "json":
        return json.dumps(json_object(table), indent=1) + "\n"
    raise CxrdxError(f"unknown table format {fmt!r}; expected one of {', '.join(FORMATS)}")


def write_tables(tables: Sequence[Table], out_dir: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """One file per table and format: OUT/<name>.<fmt>."""
    return [write_text(Path(out_dir) / f"{t.name}.{fmt}", render(t, fmt)) for t in tables for fmt in formats]


# --- the paper's tables --------------------------------------------------------------------------


def _summary_rows(summary: Mapping[str, float], label: str) -> dict[str, float]:
    return {
        f"{label} mean": summary["mean"],
        f"{label} SE": summary["se"],
        f"{label} CI low": summary["low"],
        f"{label} CI high": summary["high"],
    }


def _left_out_note(cmp: Comparison) -> list[str]:
    left = sorted({n for e in cmp.evaluations.values() for n in e.overall.left_out_of_auroc_mean})
    return [f"Left out of the means (no AUROC): {', '.join(left)}."] if left else []


def table3(cmp: Comparison) -> Table:
    """AUROC per finding and model, overall mean ± SE (CI), Pearson r/p against the positive ratio."""
    level = f"{round(cmp.level * 100)}%"
    data, display = {}, {}
    for i, model in enumerate(cmp.models):
        overall = cmp.evaluations[model].overall.auroc._asdict()
        r, p = cmp.pearson[model]
        data[model] = {**dict(zip(cmp.findings, cmp.auc[i])), **_summary_rows(overall, "Overall"), "Pearson r": r, "Pearson p": p}
        display[model] = {
            **{f: format_value(a) for f, a in zip(cmp.findings, cmp.auc[i])},
            f"Overall, mean ± SE ({level} CI)": format_mean_ci(overall),
            "Pearson r with positive ratio": format_value(r),
            "p value": format_p(p),
        }
    ratio = dict(zip(cmp.findings, cmp.positive_ratio))
    data_frame = pd.DataFrame(data)
    data_frame.insert(0, "positive ratio", pd.Series(ratio))
    display_frame = pd.DataFrame(display)
    display_frame.insert(
        0, "Positive ratio", pd.Series({f: format_value(v, 4) for f, v in ratio.items()}).reindex(display_frame.index, fill_value="")
    )
    data_frame.index.name = display_frame.index.name = "Finding"
    notes = [
        f"AUROC per finding; overall = mean over findings ± standard error, t-interval with n-1 df ({cmp.evaluations[cmp.models[0]].overall.auroc.n} findings)."
    ]
    return Table("table3", "Table 3. AUROC by finding and model", data_frame, display_frame, notes + _left_out_note(cmp))


_TABLE4 = {"accuracy": "Accuracy", "macro_precision": "Macro precision", "macro_recall": "Macro recall", "macro_f1": "Macro F1-score"}


def table4(cmp: Comparison) -> Table:
    """Accuracy and the paper's macro precision/recall/F1 per finding at the decision thresholds."""
    level = f"{round(cmp.level * 100)}%"
    data, display = {}, {}
    for model in cmp.models:
        e = cmp.evaluations[model]
        d, s = {}, {}
        for metric, label in _TABLE4.items():
            for finding, v in e.per_finding[metric].items():
                d[(label, finding)], s[(label, finding)] = v, format_value(v, 3 if metric == "accuracy" else 2)
            summary = getattr(e.overall, metric)._asdict()
            for row, v in _summary_rows(summary, "Overall").items():
                d[(label, row)] = v
            s[(label, f"Overall, mean ± SE ({level} CI)")] = format_mean_ci(summary, 3 if metric == "accuracy" else 2)
            if metric == "accuracy":
                d[(label, "All findings correct")] = e.overall.exact_match_accuracy
                s[(label, "All findings correct")] = format_value(e.overall.exact_match_accuracy)
        data[model], display[model] = d, s
    data_frame, display_frame = pd.DataFrame(data), pd.DataFrame(display)
    for frame in (data_frame, display_frame):
        frame.index.names = ["Metric", "Finding"]
    thresholds = {m: cmp.evaluations[m].per_finding["threshold"] for m in cmp.models}
    same = all(np.allclose(t, 0.5) for t in thresholds.values())
    notes = [
        "Macro = unweighted mean over the negative and the positive class of each finding.",
        "Decision threshold 0.5 for every finding." if same else "Per-finding decision thresholds (see metrics.json).",
        "'All findings correct' = exact-match accuracy over all findings (the paper's overall accuracy).",
    ]
    return Table("table4", "Table 4. Threshold metrics by finding and model", data_frame, display_frame, notes)


def delong_table(cmp: Comparison) -> Table:
    """Model vs model, per finding: paired DeLong p-values (unadjusted) with significance marks."""
    pairs = [(a, b) for a in range(len(cmp.models)) for b in range(a + 1, len(cmp.models))]
    columns = [f"{cmp.models[a]} vs {cmp.models[b]}" for a, b in pairs]
    p = np.array([[cmp.delong_p[k, a, b] for a, b in pairs] for k in range(len(cmp.findings))]).reshape(len(cmp.findings), len(pairs))
    data = pd.DataFrame(p, index=pd.Index(cmp.findings, name="Finding"), columns=columns)
    display = data.map(lambda v: f"{format_p(v)} {stars(v)}" if np.isfinite(v) else DASH)
    notes = ["Two-sided paired DeLong test of the two models' AUROCs on the same images; p not adjusted for multiplicity."]
    if np.isnan(p).any():
        notes.append("–: no test, the DeLong variance needs at least two positive and two negative images.")
    return Table("delong", "Model vs model: DeLong p-values per finding", data, display, notes)


def anova_table(cmp: Comparison) -> Table:
    """The repeated-measures ANOVA over findings and its Bonferroni-adjusted pairwise comparisons."""
    a = cmp.anova
    m = len(cmp.models)
    data = pd.DataFrame(cmp.pairwise_p, index=pd.Index(cmp.models, name="Model"), columns=cmp.models)
    diff = pd.DataFrame(cmp.pairwise_diff, index=data.index, columns=cmp.models)
    display = pd.DataFrame(
        [
            [DASH if i == j else f"{diff.iat[i, j]:+.3f} ({p_clause(data.iat[i, j])}) {stars(data.iat[i, j])}" for j in range(m)]
            for i in range(m)
        ],
        index=data.index,
        columns=cmp.models,
    )
    data = pd.concat({"p_bonferroni": data, "mean_difference": diff}, axis=1)
    data.columns = [f"{kind}: {model}" for kind, model in data.columns]
    notes = [
        f"Repeated-measures ANOVA over {a.subjects} findings (subject = finding, within = model): "
        f"F({format_value(a.df_num, 0)}, {format_value(a.df_den, 0)}) = {format_value(a.f, 3)}, {p_clause(a.p)}.",
        f"Cells: mean AUROC difference (row - column) over findings, paired t-test p with Bonferroni adjustment over {m * (m - 1) // 2} pair(s).",
    ]
    return Table("anova", "Model vs model: repeated-measures ANOVA and pairwise comparisons", data, display, notes)


def table5(cmp: Comparison, model: str) -> Table:
    """One model's findings compared pairwise (Bonferroni), ordered by AUROC as in the paper."""
    i = cmp.models.index(model)
    auc = pd.Series(cmp.auc[i], index=cmp.findings)
    order = auc.sort_values(ascending=False, na_position="last").index
    p = pd.DataFrame(cmp.findings_p[model], index=cmp.findings, columns=cmp.findings).loc[order, order]
    data = p.copy()
    data.insert(0, "AUROC", auc[order])
    display = p.map(stars)
    for f in order:
        display.loc[f, f] = ""
    display.insert(0, "AUROC", auc[order].map(format_value))
    data.index.name = display.index.name = "Finding"
    k = int(np.isfinite(auc).sum())
    notes = [
        "*** p < 0.001, ** p < 0.01, * p < 0.05, n.s. no significant difference; Bonferroni adjustment over "
        f"{len(cmp.findings) * (len(cmp.findings) - 1) // 2} pairs. Two-sided z-test of the AUROC difference with its "
        "paired DeLong variance var_a + var_b - 2 cov_ab: the findings share the test images, and their covariance comes "
        "from each image's structural components (placement values) for both findings.",
    ]
    if k < len(cmp.findings):
        notes.append("Findings without an AUROC are marked –.")
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return Table(f"table5_{slug}", f"Table 5. Findings compared by AUROC: {model}", data, display, notes)


def calibration_table(cmp: Comparison) -> Table:
    """Per finding: AUROC with its DeLong CI, threshold and ECE, for each model."""
    data = pd.concat(
        {m: e.per_finding[["positives", "auroc", "auroc_low", "auroc_high", "threshold", "ece"]] for m, e in cmp.evaluations.items()},
        names=["Model", "Finding"],
    )
    display = data.copy().astype(object)
    display["positives"] = data["positives"].astype(int).astype(str)
    display["auroc"] = [
        f"{format_value(a)} ({format_value(lo)}, {format_value(hi)})" for a, lo, hi in data[["auroc", "auroc_low", "auroc_high"]].to_numpy()
    ]
    display = display.drop(columns=["auroc_low", "auroc_high"])
    display["threshold"] = data["threshold"].map(format_value)
    display["ece"] = data["ece"].map(format_value)
    display.columns = ["Positives", f"AUROC ({round(cmp.level * 100)}% DeLong CI)", "Threshold", "ECE"]
    notes = ["ECE: expected calibration error over 10 equal-width probability bins."]
    boot = [e.per_finding[["auroc_boot_low", "auroc_boot_high"]] for e in cmp.evaluations.values() if "auroc_boot_low" in e.per_finding]
    if len(boot) == len(cmp.models):
        both = pd.concat(dict(zip(cmp.models, boot)), names=["Model", "Finding"])
        data = data.join(both)
        display["Bootstrap CI"] = [f"({format_value(lo)}, {format_value(hi)})" for lo, hi in both.to_numpy()]
        unit = next(iter(cmp.evaluations.values())).overall.auroc_bootstrap
        if unit is not None:
            notes.append(f"Bootstrap CI: percentile interval over {unit.replicates} resamples of {unit.unit}s.")
    return Table("per_finding", "AUROC confidence intervals, thresholds and calibration", data, display, notes)


def expert_table(frame: pd.DataFrame) -> Table:
    """AUROC against radiologist-adjudicated labels beside the NLP labels on the same images."""
    display = pd.DataFrame(
        {
            "Images": frame["images"].astype(str),
            "Expert positives": frame["expert_positives"].astype(str),
            "AUROC (expert labels)": [
                f"{format_value(a)} ({format_value(lo)}, {format_value(hi)})"
                for a, lo, hi in frame[["expert_auroc", "expert_low", "expert_high"]].to_numpy()
            ],
            "NLP positives": frame["nlp_positives"].astype(str),
            "AUROC (NLP labels)": [
                f"{format_value(a)} ({format_value(lo)}, {format_value(hi)})"
                for a, lo, hi in frame[["nlp_auroc", "nlp_low", "nlp_high"]].to_numpy()
            ],
            "Label agreement": frame["label_agreement"].map(format_value),
        },
        index=frame.index,
    )
    display.index.name = "Finding"
    notes = ["'Nodule or mass' is scored by the larger of the Nodule and Mass probabilities; DeLong 95% CIs."]
    return Table("expert", "AUROC against expert (adjudicated) labels", frame, display, notes)


def comparison_tables(cmp: Comparison) -> list[Table]:
    """Every table of a comparison: 3, 4, the model-vs-model tests (two or more models), 5 per model, per finding."""
    tables = [table3(cmp), table4(cmp)]
    if len(cmp.models) > 1:
        tables += [delong_table(cmp), anova_table(cmp)]
    return tables + [table5(cmp, m) for m in cmp.models] + [calibration_table(cmp)]


def markdown_report(tables: Sequence[Table], title: str, notes: Sequence[str] = ()) -> str:
    head = [f"# {title}", ""] + [f"> {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(head) + "\n" + "\n".join(markdown(t) for t in tables)


# --- the report page's further tables ------------------------------------------------------------


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def table1_table(index: pd.DataFrame, split: pd.Series, title: str) -> tuple[Table, dict[str, int]]:
    """Table 1 (images, patients, labels and findings per image by split) and the leakage"""
    from cxrdx.data.splits import LABEL_COUNT_ROWS, SPLITS, split_summary, table1

    counts = table1(index, split)
    parts = counts["splits"]
    columns = [*SPLITS, "all"]
    patients = {k: v["patients"] for k, v in split_summary(index, split).items()}
    patients["all"] = int(index.loc[index["Image Index"].isin(split.index), "Patient ID"].nunique())
    total = parts["all"]["images"]
    names = {"train": "Train", "val": "Validation", "test": "Test", "all": "Total"}
    heads = [f"{names[c]} ({100 * parts[c]['images'] / max(total, 1):.0f}%)" if c != "all" else "Total" for c in columns]
    data: dict[tuple[str, str], list[float]] = {("Split", "Images"): [parts[c]["images"] for c in columns]}
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
    return Table("table1", title, frame, display, table_notes), counts["leakage"]


def wide_table4(table: Table) -> Table:
    """Table 4 with findings as rows and (model, metric) as columns: one screen instead of four."""
    display = table.display.unstack(level="Metric")
    rest = sorted((i for i in display.index if i not in FINDINGS), key=lambda i: not str(i).startswith("Overall"))
    order = [f for f in FINDINGS if f in display.index] + rest
    metrics_order = list(dict.fromkeys(table.display.index.get_level_values("Metric")))
    columns = [(m, k) for m in table.display.columns for k in metrics_order]
    display = display.reindex(index=order, columns=pd.MultiIndex.from_tuples(columns)).fillna("")
    display.index.name = "Finding"
    return Table(table.name, table.title, table.data, display, table.notes)


def ece_table(cmp: Comparison) -> Table:
    data = pd.DataFrame({m: cmp.evaluations[m].per_finding["ece"] for m in cmp.models})
    data.index.name = "Finding"
    data.loc["Overall (mean over findings)"] = data.mean()
    display = data.map(format_value)
    notes = [
        "ECE: expected calibration error, |observed positive fraction − mean probability| over 10 equal-width bins, weighted by the images in each bin; 0 is perfect."
    ]
    return Table("ece", "Calibration: ECE by finding", data, display, notes)


def bootstrap_table(name: str, result: rundir.EvalMetrics) -> Table | None:
    """AUROC with its DeLong and its bootstrap CI per finding (`cxrdx evaluate --bootstrap N`); None without them."""
    try:
        boot, overall = result.overall["auroc_bootstrap"], result.overall["auroc"]
        per = pd.DataFrame.from_dict(result.per_finding, orient="index")
        data = per[["auroc", "auroc_low", "auroc_high", "auroc_boot_low", "auroc_boot_high"]].apply(pd.to_numeric, errors="coerce")
        data.loc["Overall (mean over findings)"] = [overall["mean"], overall["low"], overall["high"], boot["low"], boot["high"]]
        data = data.astype(np.float64)
        replicates, unit, level = int(boot["replicates"]), str(boot["unit"]), float(result.overall.get("level", 0.95))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    data.index.name = "Finding"
    interval = lambda lo, hi: f"{format_value(lo)}–{format_value(hi)}" if np.isfinite(lo) and np.isfinite(hi) else DASH  # noqa: E731
    display = pd.DataFrame(
        {
            "AUROC": data["auroc"].map(format_value),
            f"{round(level * 100)}% CI (DeLong)": [interval(lo, hi) for lo, hi in data[["auroc_low", "auroc_high"]].to_numpy()],
            f"{round(level * 100)}% CI (bootstrap)": [
                interval(lo, hi) for lo, hi in data[["auroc_boot_low", "auroc_boot_high"]].to_numpy()
            ],
        },
        index=data.index,
    )
    whole = " (a drawn patient brings all their images)" if unit == "patient" else ""
    notes = [
        f"Bootstrap: percentile interval over {replicates} resamples of the test {unit}s{whole}.",
        "Overall row: the mean AUROC over findings; its first interval is the t-interval over findings.",
    ]
    return Table(f"bootstrap-{slug(name)}", f"AUROC with {unit}-level bootstrap CIs: {name}", data, display, notes)


def expert_labels_table(name: str, result: rundir.EvalMetrics) -> Table | None:
    """AUROC against expert labels beside the NLP labels (`cxrdx evaluate --expert-labels`); None without them."""
    expert = result.expert_labels
    if not expert:
        return None
    try:
        table = expert_table(pd.DataFrame.from_dict(expert, orient="index").apply(pd.to_numeric, errors="coerce"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return Table(f"expert-{slug(name)}", f"{table.title}: {name}", table.data, table.display, table.notes)


def localization_table(result: rundir.Localization, name: str) -> Table:
    records = result.summary
    if records.empty:
        raise CxrdxError("no boxed findings were scored")
    methods = list(dict.fromkeys(records["method"]))
    wide = records.pivot_table(index="Finding", columns="method", values=["pointing_game", "iou"], aggfunc="first")
    boxes = records.groupby("Finding")["n"].max()
    order = [f for f in FINDINGS if f in boxes.index] + [f for f in boxes.index if f not in FINDINGS]
    data = (
        pd.DataFrame({("", "Boxes"): boxes})
        .join(
            pd.DataFrame(
                {
                    (TITLES.get(m, m), label): wide[(metric, m)]
                    for m in methods
                    for metric, label in (("pointing_game", "Pointing game"), ("iou", "IoU"))
                }
            )
        )
        .reindex(order)
    )
    data.index = ["All boxed findings" if i == "all" else i for i in data.index]
    data.index.name = "Finding"
    display = data.astype(object).copy()
    display[("", "Boxes")] = data[("", "Boxes")].map(lambda v: f"{int(v):,}")
    for column in data.columns[1:]:
        display[column] = data[column].map(format_value)
    mode, threshold = result.threshold_mode, result.threshold
    cut = f"map ≥ {threshold:g} × its maximum" if mode == "relative" else f"the top {threshold:.0%} of pixels"
    notes = [
        f"Pointing game: share of boxed findings whose map maximum lies in a box (tolerance {result.tolerance} px). IoU: {cut} against the boxes.",
        f"{'?' if result.images is None else result.images} boxed image(s)"
        + (f" of the {result.split} split" if result.split else "")
        + ".",
    ]
    flat = records.groupby("method")["flat"].max()
    notes += [f"{TITLES.get(m, m)}: {int(v)} flat map(s) (nothing highlighted) counted as misses." for m, v in flat.items() if v]
    return Table("localization", f"Localization against the boxes: {name}", data, display, notes)
