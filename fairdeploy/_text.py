"""Numbers in words for people: counts with the right plural, durations, fixed decimals;
markdown tables whose cells cannot break their row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

__all__ = ["ago", "fixed", "markdown_table", "nbytes", "plural", "seconds"]


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """``1 sample``, ``2 samples``, ``1,024 samples`` (``plural_form`` for irregular words)."""
    word = singular if n == 1 else (plural_form or singular + "s")
    return f"{n:,} {word}"


def non_finite(bad: int) -> str:
    """``1 non-finite value (NaN or infinity)``, ``1,024 non-finite values (NaN or infinity)``."""
    return f"{plural(bad, 'non-finite value')} (NaN or infinity)"


def seconds(value: float) -> str:
    """``0.4 s``, ``12.3 s``, ``4 min 05 s``."""
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s"


def fixed(value: Any, digits: int = 3) -> str:
    """A number with exactly ``digits`` decimals (``0.850``, ``1.000``); ``n/a`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def nbytes(n: int) -> str:
    """``812 B``, ``8.4 kB``, ``531.2 MB``, ``1.20 GB`` (powers of 1000)."""
    if n < 1000:
        return f"{n} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if n < scale * 1000:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e9:.2f} GB"


def ago(elapsed: float) -> str:
    """Seconds in the past as ``just now``, ``12 min ago``, ``5.0 h ago``, ``3.2 days ago``."""
    if elapsed < 60:
        return "just now"
    if elapsed < 3600:
        return f"{elapsed / 60:.0f} min ago"
    if elapsed < 86400:
        return f"{elapsed / 3600:.1f} h ago"
    return f"{elapsed / 86400:.1f} days ago"


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table whose cells keep their text whole.

    A ``|`` inside a cell (``max |Δ| 3e-07``) would end the cell and split the row into
    more cells than the header has, so it is written ``\\|`` (GitHub's table syntax, inside
    code spans too); a newline would end the row, so it becomes a space; None is empty.
    Cells are taken as text: numbers are already formatted by the caller, and tabulate
    must not re-parse them.
    """

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    return tabulate(
        [[cell(v) for v in row] for row in rows], [cell(h) for h in header],
        tablefmt="github", disable_numparse=True,
    )
