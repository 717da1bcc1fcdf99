"""Reading a recipe from YAML; schema errors as one line with file, line and key path."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from fairdeploy._schema_errors import format_validation_error
from fairdeploy._trust import check_import_allowed
from fairdeploy.data_specs import DATA_KINDS
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.recipe._recipe import Recipe

__all__ = ["load_recipe", "parse_recipe"]


#: Limits checked before any Python object is built from a recipe file. A recipe is a
#: few kilobytes of sections and lists; these are orders of magnitude above any real one
#: and far below what would exhaust time or memory (an alias "billion laughs" expands
#: 9 aliases of 9 items nine levels deep into 387 million values; 100,000 nested
#: brackets overflow the parser's recursion).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 64
MAX_RECIPE_NODES = 200_000  # values after alias expansion
MAX_RECIPE_CHARS = 8 << 20  # characters of scalars after alias expansion

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 20× faster


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
        Missing file, not a regular file (a FIFO), YAML syntax error (with its line), a
        key given twice in one mapping (both lines named), a file over the size, nesting
        or alias-expansion limits (:data:`MAX_RECIPE_BYTES`, :data:`MAX_RECIPE_DEPTH`,
        :data:`MAX_RECIPE_NODES`, :data:`MAX_RECIPE_CHARS`), an import string while
        recipes are not trusted (:mod:`fairdeploy._trust`), or a schema error naming the
        line, the key path, the value found and what is allowed.
    """
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or a device would block or never end: refused before opening.
            raise FairDeployError(
                f"recipe {path} is not a regular file (a pipe, socket or device): give the "
                "recipe's .yaml file"
            )
        size = st.st_size
        if size > MAX_RECIPE_BYTES:
            raise FairDeployError(
                f"recipe {path} is {size:,} bytes, over the {MAX_RECIPE_BYTES:,}-byte limit for "
                "a recipe: give the YAML recipe file (a few kilobytes), not a data file"
            )
        # Read one byte more than allowed: the file may be growing, or a device.
        with path.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise FairDeployError(
                f"recipe {path} is over the {MAX_RECIPE_BYTES:,}-byte limit for a recipe"
            )
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise FairDeployError(f"recipe {path}: no such file") from None
    except IsADirectoryError:
        raise FairDeployError(f"recipe {path} is a folder: give the recipe's .yaml file") from None
    except UnicodeDecodeError as exc:
        raise FairDeployError(
            f"recipe {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise FairDeployError(f"recipe {path}: cannot be read ({exc.strerror or exc})") from None
    node, data = _parse_yaml(text, str(path))
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
    from fairdeploy.data_specs import LOCAL_PATH_KEYS

    link_dir = Path(os.path.abspath(path)).parent
    section = data.get("data")
    if link_dir == real_dir or not isinstance(section, dict):
        return
    for key in LOCAL_PATH_KEYS:
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


def _parse_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The node graph and the Python value of a YAML text, within the limits above.

    Three passes: the event stream (libyaml's parser keeps an explicit stack, so any
    nesting is safe to scan) checks the depth; the node graph (aliases are shared
    nodes, not copies) is measured as it would be expanded; only then are Python
    objects built.
    """
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_RECIPE_DEPTH:
                    raise _too_deep(source, event.start_mark.line + 1)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _check_expansion(node, source)
            _check_duplicate_keys(node, source)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in str(problem):
            # libyaml ≥ 0.2.5 (PyYAML ≥ 6.0.4) stops at its own limit while it scans ahead,
            # before the event stream reaches ours: the same mistake, the same message.
            raise _too_deep(source, None if mark is None else mark.line + 1) from None
        raise FairDeployError(f"{source}{where}: invalid YAML ({problem})") from None
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        # The constructors of ints, floats and timestamps raise plain Python errors
        # (an int of 5,000 digits, a 13th month).
        raise FairDeployError(
            f"{source}: invalid YAML value ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    return node, data


def _too_deep(source: str, line: int | None) -> FairDeployError:
    where = f":{line}" if line is not None else ""
    return FairDeployError(
        f"{source}{where}: the recipe nests deeper than {MAX_RECIPE_DEPTH} levels: a recipe "
        "is a few levels of sections and lists"
    )


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a node graph whose aliases expand past the limits, or into a cycle."""
    sizes: dict[int, tuple[int, int]] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise FairDeployError(
                f"{source}:{node.start_mark.line + 1}: an alias refers to a value that "
                "contains it (a cycle): recipes cannot be recursive"
            )
        visiting.add(key)
        nodes, chars = 1, 0
        if isinstance(node, yaml.ScalarNode):
            chars = len(node.value)
        else:
            children = (
                [c for pair in node.value for c in pair]
                if isinstance(node, yaml.MappingNode)
                else node.value
            )
            for child in children:
                n, c = size(child)
                nodes, chars = nodes + n, chars + c
                if nodes > MAX_RECIPE_NODES or chars > MAX_RECIPE_CHARS:
                    raise FairDeployError(
                        f"{source}:{node.start_mark.line + 1}: the recipe expands (through "
                        f"aliases) to more than {MAX_RECIPE_NODES:,} values or "
                        f"{MAX_RECIPE_CHARS:,} characters: write the values out, or use "
                        "fewer nested aliases"
                    )
        visiting.discard(key)
        sizes[key] = (nodes, chars)
        return nodes, chars

    size(root)


def _check_duplicate_keys(root: yaml.Node, source: str) -> None:
    """Refuse a mapping that gives one key twice (YAML keeps the last one silently).
    Keys merged in with ``<<: *alias`` are YAML's own overriding, not duplicates."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes or isinstance(node, yaml.ScalarNode):
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
            continue
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            stack.append(value)
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                stack.append(key)
                continue
            line = key.start_mark.line + 1
            ident = (key.tag, key.value)
            if ident in first:
                raise FairDeployError(
                    f"{source}:{line}: key {key.value!r} is given twice in one mapping (first "
                    f"on line {first[ident]}); YAML would silently keep only the last: "
                    "delete one"
                )
            first[ident] = line


def _check_import_strings(data: dict[str, Any]) -> None:
    """Refuse ``model.arch: package.module:factory`` before anything is built unless
    recipes are trusted (methods are checked where their names are resolved)."""
    model = data.get("model")
    arch = model.get("arch") if isinstance(model, dict) else None
    if isinstance(arch, str) and ":" in arch:
        check_import_allowed(arch, "model.arch")


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
    if isinstance(data, dict):
        try:
            _check_import_strings(data)
        except FairDeployError as exc:
            raise FairDeployError(f"{source}: {exc}") from None
    try:
        return Recipe.model_validate(data, context=context)
    except ValidationError as exc:
        line_of = functools.partial(_line_of, _node) if _node is not None else None
        raise FairDeployError(
            format_validation_error(exc, source, line_of=line_of, union_tags={"data": DATA_KINDS})
        ) from None


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
