"""Numbers for JSON: ``NaN`` (an undefined rate, an empty group) becomes ``null``, as JSON
has no NaN; reports, sweep rows and metric dicts all write them this way."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["json_float", "json_floats"]


def json_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is None or NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def json_floats(values: Iterable[Any]) -> list[float | None]:
    """:func:`json_float` of each value."""
    return [json_float(v) for v in values]
