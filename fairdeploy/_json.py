"""Numbers for JSON: ``NaN`` (an undefined rate, an empty group) and ``±inf`` (an error
that is not finite) become ``null``, as JSON has neither; reports, sweep rows, metric dicts
and verify results all write them this way."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "METADATA_PREFIX",
    "JsonRecord",
    "decode_prefixed",
    "json_fields",
    "json_float",
    "json_floats",
]


#: Prefix of every ONNX ``metadata_props`` key fairdeploy writes (values are JSON): here,
#: below both the export that writes them and ``serve``, which reads them without torch.
METADATA_PREFIX = "fairdeploy."


def json_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is None, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_floats(values: Iterable[Any]) -> list[float | None]:
    """:func:`json_float` of each value."""
    return [json_float(v) for v in values]


def json_fields(record: Any) -> dict[str, Any]:
    """A dataclass instance as a dict in field order, its float fields through
    :func:`json_float` (NaN, ±inf → None) and the others as they are."""
    return {
        f.name: json_float(v) if isinstance(v, float) else v
        for f in dataclasses.fields(record)
        for v in (getattr(record, f.name),)
    }


class JsonRecord:
    """Mixin for a dataclass whose JSON form is its fields: :meth:`to_dict` is
    :func:`json_fields` (field order, NaN and ±inf → None). A record that writes more, or writes a
    field differently, extends the dict it returns."""

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as a JSON-ready dict (NaN and ±inf become ``None``)."""
        return json_fields(self)


def decode_prefixed(items: Iterable[tuple[str, str]], prefix: str) -> dict[str, Any]:
    """The ``(key, value)`` entries whose key starts with ``prefix``, the prefix dropped and
    the value JSON-decoded (a value that is not JSON is kept as its text): how fairdeploy
    reads an ONNX file's metadata, whether from the proto or from an ORT session."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key.startswith(prefix):
            try:
                out[key[len(prefix) :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(prefix) :]] = value
    return out
