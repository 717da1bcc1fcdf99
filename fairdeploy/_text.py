"""Numbers in words for people: counts with the right plural, durations, fixed decimals."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ago", "fixed", "nbytes", "plural", "seconds"]


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """``1 sample``, ``2 samples``, ``1,024 samples`` (``plural_form`` for irregular words)."""
    word = singular if n == 1 else (plural_form or singular + "s")
    return f"{n:,} {word}"


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
