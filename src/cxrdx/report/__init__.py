"""Reports: the paper's tables (`tables`), figures (`figures`) and the self-contained HTML page over run
folders (`sections`, `page`, rendered from `templates/report.html.j2` and `templates/report.css`).

The names other modules use are importable from here: `from cxrdx import report; report.table3(cmp)`.
"""

from cxrdx.report.figures import plot_curves, reliability_figure, roc_figure
from cxrdx.report.page import SUMMARY, TABLE2, headline, write_report
from cxrdx.report.tables import (
    DASH,
    FORMATS,
    Table,
    anova_table,
    calibration_table,
    comparison_tables,
    csv_text,
    delong_table,
    expert_table,
    format_mean_ci,
    format_p,
    format_value,
    html,
    json_object,
    markdown,
    markdown_report,
    p_clause,
    render,
    table3,
    table4,
    table5,
    write_tables,
)

__all__ = [
    "DASH",
    "FORMATS",
    "SUMMARY",
    "TABLE2",
    "Table",
    "anova_table",
    "calibration_table",
    "comparison_tables",
    "csv_text",
    "delong_table",
    "expert_table",
    "format_mean_ci",
    "format_p",
    "format_value",
    "headline",
    "html",
    "json_object",
    "markdown",
    "markdown_report",
    "p_clause",
    "plot_curves",
    "reliability_figure",
    "render",
    "roc_figure",
    "table3",
    "table4",
    "table5",
    "write_report",
    "write_tables",
]
