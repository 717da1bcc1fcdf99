"""Numbers for JSON: ``NaN`` (an undefined rate, an empty group) becomes ``null``, as JSON
has no NaN; reports, sweep rows and metric dicts all write them this way."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

__all__ = ["json_fields", "json_float", "json_floats"]


def json_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is None or NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def json_floats(values: Iterable[Any]) -> list[float | None]:
    """:func:`json_float` of each value."""
    return [json_float(v) for v in values]


def json_fields(record: Any) -> dict[str, Any]:
    """A dataclass instance as a dict in field order, its float fields through
    :func:`json_float` (NaN → None) and the others as they are."""
    return {
        f.name: json_float(v) if isinstance(v, float) else v
        for f in dataclasses.fields(record)
        for v in (getattr(record, f.name),)
    }
