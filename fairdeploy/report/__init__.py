"""The report: one JSON-serializable dict (report.json), rendered as report.md and a
terminal table, so what the terminal shows is what the file says.

``_build``: the dict's blocks from an experiment's results. ``_render``: report.md and
the terminal table (every figure names its unit and convention). ``_plot``: compare's
trade-off PNG.
"""

from fairdeploy.report._build import (
    accuracy_summary,
    base_report,
    bootstrap_block,
    change_direction,
    collapse_reasons,
    draws_block,
    latency_block,
    method_entry,
    packing_block,
    plan_notes,
    prediction_notes,
    rank_bootstrap_block,
    rank_pairs,
    single_class_note,
    size_ratios,
    skipped_in_words,
    verify_summary,
)
from fairdeploy.report._plot import tradeoff_figure, tradeoff_points, write_tradeoff_plot
from fairdeploy.report._render import (
    SCHEMA_VERSION,
    fairness_table,
    method_label,
    render_markdown,
    runtimes_text,
    terminal_text,
    validation_table,
    write_report,
)

__all__ = [
    "SCHEMA_VERSION",
    "accuracy_summary",
    "base_report",
    "bootstrap_block",
    "change_direction",
    "collapse_reasons",
    "draws_block",
    "fairness_table",
    "latency_block",
    "method_entry",
    "method_label",
    "packing_block",
    "plan_notes",
    "prediction_notes",
    "rank_bootstrap_block",
    "rank_pairs",
    "render_markdown",
    "runtimes_text",
    "single_class_note",
    "size_ratios",
    "skipped_in_words",
    "terminal_text",
    "tradeoff_figure",
    "tradeoff_points",
    "validation_table",
    "verify_summary",
    "write_report",
    "write_tradeoff_plot",
]
