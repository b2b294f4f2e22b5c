"""cxrdx.report: table builders and renderers (Markdown, CSV, JSON) and the figures."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdx import metrics, report
from cxrdx.findings import FINDINGS


@pytest.fixture(scope="module")
def comparison() -> metrics.Comparison:
    rng = np.random.default_rng(0)
    y = (rng.random((400, 14)) < 0.15).astype(np.uint8)
    y[:, FINDINGS.index("Hernia")] = 0
    probs = {
        "good": np.clip(0.5 * y + 0.5 * rng.random(y.shape), 0, 1),
        "weak": np.clip(0.1 * y + 0.9 * rng.random(y.shape), 0, 1),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.MetricWarning)
        return metrics.compare_models(y, probs)


def test_formatting():
    assert report.format_mean_ci({"mean": 0.8417, "se": 0.01707, "low": 0.80483, "high": 0.87859}) == "0.842 ± 0.017 (0.805, 0.879)"
    assert [report.format_p(p) for p in (0.0004, 0.037, np.nan)] == ["<0.001", "0.037", "–"]
    assert report.p_clause(0.0001) == "p < 0.001" and report.p_clause(0.25) == "p = 0.250"


def test_markdown_renderer():
    data = pd.DataFrame({"a": [1.0, np.nan]}, index=pd.Index(["x|y", "z"], name="Finding"))
    table = report.Table("t", "Title", data, data.map(report.format_value), ["a note"])
    assert report.markdown(table) == (
        "### Title\n\n| Finding | a     |\n| ------- | ----- |\n| x\\|y    | 1.000 |\n| z       | –     |\n\n- a note\n"
    )


def test_table3_numbers_and_formats(comparison: metrics.Comparison):
    table = report.table3(comparison)
    assert table.data.loc["Atelectasis", "good"] == pytest.approx(comparison.auc[0, 0])
    assert np.isnan(table.data.loc["Hernia", "good"])
    overall = comparison.evaluations["good"].overall.auroc._asdict()
    assert table.data.loc["Overall mean", "good"] == pytest.approx(overall["mean"])
    assert table.display.loc["Overall, mean ± SE (95% CI)", "good"] == report.format_mean_ci(overall)
    assert table.data.loc["Pearson r", "weak"] == pytest.approx(comparison.pearson["weak"][0])
    assert any("Hernia" in n for n in table.notes)
    text = report.render(table, "md")
    assert text.startswith("### Table 3") and "| Hernia" in text and "–" in text
    frame = pd.read_csv(io.StringIO(report.render(table, "csv")))
    assert frame.columns.tolist() == ["Finding", "positive ratio", "good", "weak"]
    assert frame.loc[frame["Finding"] == "Atelectasis", "good"].item() == pytest.approx(comparison.auc[0, 0])
    loaded = json.loads(report.render(table, "json"))
    hernia = next(r for r in loaded["rows"] if r["Finding"] == "Hernia")
    assert hernia["good"] is None and loaded["name"] == "table3"


def test_table4_has_exact_match_and_macro_blocks(comparison: metrics.Comparison):
    table = report.table4(comparison)
    assert table.data.loc[("Accuracy", "All findings correct"), "good"] == comparison.evaluations["good"].overall.exact_match_accuracy
    assert table.data.loc[("Macro F1-score", "Effusion"), "weak"] == pytest.approx(
        comparison.evaluations["weak"].per_finding.loc["Effusion", "macro_f1"]
    )
    assert "| Macro recall" in report.markdown(table)


def test_model_tests_and_table5(comparison: metrics.Comparison):
    delong = report.delong_table(comparison)
    assert delong.data.columns.tolist() == ["good vs weak"]
    assert delong.data.loc["Atelectasis", "good vs weak"] == pytest.approx(comparison.delong_p[0, 0, 1])
    anova = report.anova_table(comparison)
    assert "Repeated-measures ANOVA over 13 findings" in anova.notes[0]
    t5 = report.table5(comparison, "good")
    aucs = t5.data["AUROC"].to_numpy()
    assert np.all(np.diff(aucs[np.isfinite(aucs)]) <= 0)  # ordered by AUROC, best first
    assert t5.data.index[-1] == "Hernia"  # no AUROC: last
    assert set(t5.display.drop(columns="AUROC").to_numpy().ravel()) <= {"", "n.s.", "*", "**", "***", "–"}
    names = [t.name for t in report.comparison_tables(comparison)]
    assert names == ["table3", "table4", "delong", "anova", "table5_good", "table5_weak", "per_finding"]


def test_write_tables_and_report(comparison: metrics.Comparison, tmp_path: Path):
    tables = report.comparison_tables(comparison)
    written = report.write_tables(tables, tmp_path, ["md", "json"])
    assert len(written) == 2 * len(tables) and all(p.is_file() for p in written)
    assert not list(tmp_path.glob("*.csv"))
    text = report.markdown_report(tables, "Title", ["note one"])
    assert text.startswith("# Title\n\n> note one\n") and text.count("### ") == len(tables)


def test_figures_are_pngs(tmp_path: Path):
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.2).astype(np.uint8)
    y[:, 1] = 0  # a panel without positives must not break the figure
    probs = {"a": rng.random((200, 3)), "b": rng.random((200, 3))}
    roc = report.roc_figure(y, probs, FINDINGS[:3], tmp_path / "roc.png")
    rel = report.reliability_figure(y, probs["a"], FINDINGS[:3], tmp_path / "reliability.png")
    for path in (roc, rel):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
