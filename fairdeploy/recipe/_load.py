"""Reading a recipe from YAML; schema errors as one line with file, line and key path."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from fairdeploy.errors import FairDeployError
from fairdeploy.recipe._data import DATA_KINDS
from fairdeploy.recipe._recipe import Recipe

__all__ = ["format_validation_error", "load_recipe", "parse_recipe"]


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe YAML file.

    Parameters
    ----------
    path : path-like
        The recipe file. Relative data paths in it are resolved against its folder.

    Returns
    -------
    Recipe
        The resolved recipe (all defaults filled in).

    Raises
    ------
    FairDeployError
        Missing file, YAML syntax error (with its line), or a schema error naming the
        line, the key path, the value found and what is allowed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FairDeployError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FairDeployError(f"recipe {path}: cannot be read ({exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FairDeployError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise FairDeployError(
            f"{path}: the recipe must be a mapping of sections (model, data, sensitive, "
            f"method, ...), found {type(data).__name__}"
        )
    real_dir = path.resolve().parent
    _check_symlinked_paths(path, real_dir, data)
    recipe = parse_recipe(data, source=str(path), base_dir=real_dir, _node=node)
    recipe._source = path
    return recipe


def _check_symlinked_paths(path: Path, real_dir: Path, data: dict[str, Any]) -> None:
    """Relative data paths resolve from the recipe file's real folder, also when it was
    opened through a symlink (``recipes/`` in the repository links to the package's
    ``fairdeploy/recipes/``). Where that finds nothing but the symlink's folder would,
    say so now rather than leave the user to guess which folder was meant."""
    from fairdeploy.recipe._data import _LOCAL_PATH_KEYS

    link_dir = Path(os.path.abspath(path)).parent
    section = data.get("data")
    if link_dir == real_dir or not isinstance(section, dict):
        return
    for key in _LOCAL_PATH_KEYS:
        value = section.get(key)
        if not isinstance(value, str) or Path(os.path.expanduser(value)).is_absolute():
            continue
        tried = Path(os.path.normpath(real_dir / value))
        # Lexically: the kernel would resolve "link/.." through the link's target.
        meant = Path(os.path.normpath(link_dir / value))
        if not tried.exists() and meant.exists():
            raise FairDeployError(
                f"{path}: data.{key}: {value!r} resolves from the recipe's real folder "
                f"{real_dir} (the file is reached through a symlink) to {tried}, which does "
                f"not exist; {meant} does: give an absolute path, or copy the recipe instead "
                "of linking it"
            )


def parse_recipe(
    data: dict[str, Any],
    *,
    source: str = "recipe",
    base_dir: str | os.PathLike[str] | None = None,
    _node: yaml.Node | None = None,
) -> Recipe:
    """Validate a recipe given as a mapping (e.g. parsed YAML, or built in code).

    Parameters
    ----------
    data : dict
        The recipe's sections.
    source : str
        Name used at the start of error messages.
    base_dir : path-like, optional
        Folder that relative paths are resolved against (default: left relative).
    """
    context = {"base_dir": Path(base_dir) if base_dir is not None else None}
    try:
        return Recipe.model_validate(data, context=context)
    except ValidationError as exc:
        raise FairDeployError(format_validation_error(exc, source, _node)) from None


def format_validation_error(
    exc: ValidationError, source: str, node: yaml.Node | None = None
) -> str:
    """One line for a schema error: ``source[:line]: key.path: what is wrong (what is allowed)``."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [p for i, p in enumerate(err["loc"]) if not _is_union_tag(err["loc"], i)]
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
        loc = [*loc, "kind"]
        tags = ", ".join(DATA_KINDS)
        text = (
            f"{ctx['tag']!r} is not allowed (use one of {tags})"
            if kind == "union_tag_invalid"
            else f"required key is missing (use one of {tags})"
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
    line = _line_of(node, loc) if node is not None else None
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


def _is_union_tag(loc: tuple[Any, ...], i: int) -> bool:
    # A discriminated union puts the tag ('celeba', ...) into the location after 'data'.
    return i == 1 and loc[0] == "data" and loc[i] in DATA_KINDS


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line if line is not None else None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
