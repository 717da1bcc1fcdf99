"""The report: one JSON-serializable dict (report.json), rendered as report.md and a
terminal table, so what the terminal shows is what the file says.

``_build``: the dict's blocks from an experiment's results. ``_render``: report.md and
the terminal table (every figure names its unit and convention). ``_plot``: compare's
trade-off PNG.
"""

# Each name is listed once, in its submodule's ``__all__``; the package re-exports them.
from fairdeploy.report import _build, _plot, _render
from fairdeploy.report._build import *  # noqa: F403
from fairdeploy.report._plot import *  # noqa: F403
from fairdeploy.report._render import *  # noqa: F403

__all__ = [*_build.__all__, *_plot.__all__, *_render.__all__]
