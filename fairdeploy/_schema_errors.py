"""One line for a schema error: the key path, the value and what is allowed.

Recipe sections (:mod:`fairdeploy.recipe`) and method plans (:mod:`fairdeploy.plan`)
are pydantic models; a value they refuse becomes one line,
``source[:line]: key.path: what is wrong (what is allowed)``. This module sits below
both, so a plan reports its own errors without importing the recipe loader; the loader
adds the file's line from its YAML nodes.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

__all__ = ["format_validation_error"]


def format_validation_error(
    exc: ValidationError,
    source: str,
    *,
    line_of: Callable[[list[str | int]], int | None] | None = None,
    union_tags: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """One line for a schema error: ``source[:line]: key.path: what is wrong (what is allowed)``.

    Parameters
    ----------
    exc : pydantic.ValidationError
        The error; its first problem is described, the others counted.
    source : str
        What was validated (a file name, ``plan 'fairlrf'``): the start of the line.
    line_of : callable, optional
        The 1-based line of a key path in the source (the recipe loader reads it from
        the YAML nodes), or None where it has none.
    union_tags : mapping, optional
        For each key that holds a discriminated union (``data``), its tags: the tag
        pydantic puts into an error's key path is left out of the path, and a missing
        or unknown tag is reported with the tags allowed.
    """
    tagged = union_tags or {}
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [p for i, p in enumerate(err["loc"]) if not _is_union_tag(err["loc"], i, tagged)]
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "unknown_key":
        loc = [*loc, ctx["key"]]
        close = difflib.get_close_matches(ctx["key"], ctx["allowed"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        text = f"unknown key (allowed: {', '.join(ctx['allowed'])}{hint})"
    elif kind == "missing" and loc and isinstance(loc[-1], int):
        loc = loc[:-1]  # a fixed-length list (mean, std) is short of items
        text = "too few items"
    elif kind == "missing":
        text = "required key is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        allowed = tagged.get(str(loc[-1]), ()) if loc else ()
        tags = ", ".join(allowed) or str(ctx.get("expected_tags", "")).replace("'", "")
        loc = [*loc, str(ctx.get("discriminator", "kind")).strip("'")]
        hint = f" (use one of {tags})" if tags else ""
        text = (
            f"{ctx['tag']!r} is not allowed{hint}"
            if kind == "union_tag_invalid"
            else f"required key is missing{hint}"
        )
    elif kind == "literal_error":
        text = f"{_short(err['input'])} is not allowed (use one of {ctx['expected']})"
    elif kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
        text = f"{_short(err['input'])} is not allowed ({msg})"
    elif kind in _TYPE_HINTS:
        text = f"{_short(err['input'])} is not allowed ({_TYPE_HINTS[kind]})"
    elif kind in _BOUND_HINTS:
        op, key = _BOUND_HINTS[kind]
        text = f"{_short(err['input'])} is not allowed (use a number {op} {ctx[key]})"
    elif kind.startswith("fd_"):
        # Our own errors start with their key path relative to the model that raised them.
        text = err["msg"]
        head = text.split(" ", 1)[0]
        if head.endswith(":"):
            loc = [*loc, *_split_path(head[:-1])]
            text = text[len(head) + 1 :]
    else:
        text = f"{_short(err['input'])} is not allowed ({err['msg'][0].lower()}{err['msg'][1:]})"
    path = _join_loc(loc)
    line = line_of(loc) if line_of is not None else None
    where = f"{source}:{line}" if line else source
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(
        errors
    ) > 1 else ""
    return f"{where}: {path}: {text}{more}" if path else f"{where}: {text}{more}"


_TYPE_HINTS = {
    "int_type": "use an integer",
    "int_parsing": "use an integer",
    "int_from_float": "use an integer",
    "float_type": "use a number",
    "float_parsing": "use a number",
    "bool_type": "use true or false",
    "bool_parsing": "use true or false",
    "string_type": "use a string",
    "list_type": "use a list",
    "tuple_type": "use a list",
    "dict_type": "use a mapping of keys to values",
    "model_type": "use a mapping of keys to values",
    "model_attributes_type": "use a mapping of keys to values",
    "too_short": "too few items",
    "too_long": "too many items",
    "path_type": "use a path string",
}
_BOUND_HINTS = {
    "greater_than_equal": ("≥", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("≤", "le"),
    "less_than": ("<", "lt"),
}


def _is_union_tag(loc: tuple[Any, ...], i: int, tagged: Mapping[str, Sequence[str]]) -> bool:
    # A discriminated union puts the tag ('celeba', ...) into the location after its key.
    return i == 1 and loc[i] in tagged.get(str(loc[0]), ())


def _split_path(head: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in head.split("."):
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            parts.append(int(idx))
            rest = rest.removeprefix("[")
    return parts


def _join_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 50, 50, 40
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 4


def _short(value: Any) -> str:
    # reprlib stops early: the full repr of a large (or alias-expanded) value could take
    # minutes and gigabytes.
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
