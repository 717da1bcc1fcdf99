"""``fairdeploy sweep``: choose a method's settings on the validation split, honestly.

A sweep evaluates every point of a grid over ``layer``, ``rank``, ``sr``, ``rr`` and
``β`` (:mod:`._grid`) on the validation split only, each against vanilla and truncated
SVD at the same layers and ranks, reusing cached features, SVD factors and Hessians
(:mod:`._run`). With ``scoring.repeats: R`` each point is evaluated for R independent
scoring draws, and every number is reported as the median and range over the draws,
with the overlap of the draws' selections. Finished evaluations are journaled as they
complete, so an interrupted sweep resumes (:mod:`._journal`). A rule (``--select``,
:mod:`._select`) picks one point — by the median over draws, behind a collapse guard —
which is then evaluated once on the test split against vanilla and truncated SVD with
paired bootstrap intervals. The table, the plots and the chosen recipe are written by
:mod:`._output` and :mod:`._plots`; :func:`fairdeploy.commands.sweep.run_sweep` runs it all.
"""

from fairdeploy.sweep._grid import (
    GRID_KEYS,
    SweepPoint,
    grid_points,
    parse_grid,
    parse_grid_values,
    reference_plan,
)
from fairdeploy.sweep._journal import JOURNAL_NAME, Journal, record_key
from fairdeploy.sweep._output import (
    CSV_COLUMNS,
    difference_words,
    reference_settings,
    render_sweep_markdown,
    sweep_csv,
    write_sweep_files,
)
from fairdeploy.sweep._plots import pareto_figure, pareto_front, write_plots
from fairdeploy.sweep._run import (
    ROW_METRICS,
    SweepRow,
    apply_selection,
    describe_settings,
    evaluate_on,
    run_grid,
    test_comparison,
)
from fairdeploy.sweep._select import (
    DEFAULT_GUARD_TOLERANCE,
    GRAMMAR,
    SELECT_METRICS,
    Constraint,
    Selection,
    guard_reasons,
    parse_selection,
)

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_GUARD_TOLERANCE",
    "GRAMMAR",
    "GRID_KEYS",
    "JOURNAL_NAME",
    "ROW_METRICS",
    "SELECT_METRICS",
    "Constraint",
    "Journal",
    "Selection",
    "SweepPoint",
    "SweepRow",
    "apply_selection",
    "describe_settings",
    "difference_words",
    "evaluate_on",
    "grid_points",
    "guard_reasons",
    "pareto_figure",
    "pareto_front",
    "parse_grid",
    "parse_grid_values",
    "parse_selection",
    "record_key",
    "reference_plan",
    "reference_settings",
    "render_sweep_markdown",
    "run_grid",
    "sweep_csv",
    "test_comparison",
    "write_plots",
    "write_sweep_files",
]
