"""Numbers in words for people: counts with the right plural, durations, fixed decimals."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fixed", "plural", "seconds"]


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
