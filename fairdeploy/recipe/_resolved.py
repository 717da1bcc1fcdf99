"""The resolved recipe: its hash and its YAML file next to the outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from fairdeploy._io import atomic_write_text
from fairdeploy.data_specs import LOCAL_PATH_KEYS
from fairdeploy.recipe._recipe import Recipe

__all__ = ["recipe_hash", "save_resolved_recipe"]


def _resolved_dict(recipe: Recipe) -> dict[str, Any]:
    # Plans are written with ``name:`` first, as recipes write them.
    data = recipe.model_dump(mode="json", by_alias=True)
    if data.get("sweep") is None:
        data.pop("sweep", None)  # a recipe without one is written without one
    # Readers look for the data kind and location first.
    section = data["data"]
    first = {k: section.pop(k) for k in ("kind", *LOCAL_PATH_KEYS, "target") if k in section}
    data["data"] = {**first, **section}
    return data


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 (hex) of the resolved recipe, without machine-local data paths and without
    the ``sweep:`` section (it does not change what ``optimize`` computes).

    Two recipes that resolve to the same settings hash the same, however they were
    written (defaults spelled out or not, ``5/9`` or ``0.5555…``); moving the data to
    another folder keeps the hash. It is stored in the ONNX metadata and the report.
    """
    data = _resolved_dict(recipe)
    for key in LOCAL_PATH_KEYS:
        data["data"].pop(key, None)
    # The sweep section says how `fairdeploy sweep` explores settings; it changes
    # nothing `optimize` or `compare` computes, so it stays out of the hash.
    data.pop("sweep", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _relative(target: str, start: Path) -> str:
    """``target`` relative to the folder ``start`` when they share a folder below the file
    system's root (a project folder); else unchanged (absolute)."""
    t = Path(target)
    if not t.is_absolute():
        return target
    start = Path(os.path.abspath(start))
    common = Path(os.path.commonpath([t, start]))
    if common == Path(common.anchor):
        return target
    return os.path.relpath(t, start)


def _relative_paths(data: dict[str, Any], folder: Path) -> None:
    section = data["data"]
    root = section.get("root")
    for key in LOCAL_PATH_KEYS:
        value = section.get(key)
        if not isinstance(value, str):
            continue
        if section.get("kind") == "fitzpatrick17k" and key != "root":
            # csv and images are read relative to root: keep them so.
            if root and Path(value).is_relative_to(root):
                section[key] = os.path.relpath(value, root)
            continue
        section[key] = _relative(value, folder)


def save_resolved_recipe(
    recipe: Recipe,
    path: str | os.PathLike[str],
    *,
    relative_to: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the resolved recipe as YAML (all defaults filled), atomically.

    Data paths are absolute, or with ``relative_to`` (the folder the file will finally
    live in, e.g. a run folder written under a temporary name) relative to that folder
    where the data and the folder share a folder below the file system's root: a project
    moved or copied as a whole keeps working. The file loads back with
    :func:`load_recipe` (relative paths resolve from the recipe's folder) into an equal
    recipe with the same :func:`recipe_hash`. Returns the path written.
    """
    path = Path(path)
    data = _resolved_dict(recipe)
    if relative_to is not None:
        _relative_paths(data, Path(relative_to))
    text = (
        f"# Resolved fairdeploy recipe (recipe_hash {recipe_hash(recipe)}).\n"
        + (
            f"# Data paths are relative to this file's folder ({Path(relative_to).name}).\n"
            if relative_to is not None
            else ""
        )
        + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    )
    atomic_write_text(path, text)
    return path
