"""The resolved recipe: its hash and its YAML file next to the outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from fairdeploy._io import atomic_write_text
from fairdeploy.recipe._data import _LOCAL_PATH_KEYS
from fairdeploy.recipe._recipe import Recipe

__all__ = ["recipe_hash", "save_resolved_recipe"]


def _resolved_dict(recipe: Recipe) -> dict[str, Any]:
    # Plans are written with ``name:`` first, as recipes write them.
    data = recipe.model_dump(mode="json", by_alias=True)
    if data.get("sweep") is None:
        data.pop("sweep", None)  # a recipe without one is written without one
    # Readers look for the data kind and location first.
    section = data["data"]
    first = {k: section.pop(k) for k in ("kind", *_LOCAL_PATH_KEYS, "target") if k in section}
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
    for key in _LOCAL_PATH_KEYS:
        data["data"].pop(key, None)
    # The sweep section says how `fairdeploy sweep` explores settings; it changes
    # nothing `optimize` or `compare` computes, so it stays out of the hash.
    data.pop("sweep", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_resolved_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> Path:
    """Write the resolved recipe as YAML (all defaults filled, absolute paths), atomically.

    The file loads back with :func:`load_recipe` into an equal recipe with the same
    :func:`recipe_hash`. Returns the path written.
    """
    path = Path(path)
    text = (
        f"# Resolved fairdeploy recipe (recipe_hash {recipe_hash(recipe)}).\n"
        + yaml.safe_dump(_resolved_dict(recipe), sort_keys=False, allow_unicode=True)
    )
    atomic_write_text(path, text)
    return path
