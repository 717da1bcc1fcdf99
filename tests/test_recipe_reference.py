"""docs/recipe.md: generated from the recipe schema, up to date, and naming every key a
resolved recipe has (issue 20, item 10).

The keys are read from resolved recipes themselves (the shipped ones and one that uses
every section and every method), not from the generator's own walk of the schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fairdeploy.recipe import load_recipe, parse_recipe
from fairdeploy.recipe.reference import main, recipe_keys, render_reference

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipe.md"


def _sections(text: str) -> dict[str, str]:
    """``### `name: X``` / ``### `kind: X``` heading → that table's text."""
    parts = re.split(r"^### `((?:name|kind): [^`]+)`$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _types(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0].strip("`")] = cells[1]
    return out


def _paths(value: Any, prefix: str, types: dict[str, str]) -> list[str]:
    """Dotted key paths of a dumped recipe; free-form mappings (model.kwargs,
    sensitive.groups, sweep.grid) are one key."""
    out = []
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}{key}"
            out.append(path)
            if not types.get(path, "").startswith("mapping"):
                out += _paths(sub, path + ".", types)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for item in value:
            out += _paths(item, prefix[:-1] + "[].", types)
    return out


def _everything(tmp_path: Path):
    (tmp_path / "d.npz").write_bytes(b"")
    methods = [
        {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 4, "sr": 0.5, "rr": 0.5}]},
        "vanilla", "truncated_svd", "slr_w", "slr_a",
        {"name": "fairprune", "prune_ratio": 0.2},
        {"name": "fairquantize", "quantize_ratio": 0.2, "finetune_epochs": 1},
    ]
    return parse_recipe({
        "name": "all",
        "model": {"arch": "mlp", "num_classes": 2, "kwargs": {"in_features": 3}},
        "data": {"kind": "npz", "path": str(tmp_path / "d.npz")},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": methods[0],
        "compare": methods,
        "export": {"quantize": "int8"},
        "sweep": {"grid": {"sr": "0:0.5:0.25"}, "select": "min eodd"},
    })


def test_docs_recipe_md_is_what_the_schema_gives() -> None:
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        "docs/recipe.md is out of date: run python -m fairdeploy.recipe.reference")
    assert main([str(DOC), "--check"]) == 0


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "recipe.md"
    stale.write_text(render_reference().replace("`train.epochs`", "`train.epoch`"))
    assert main([str(stale), "--check"]) == 1
    assert main([str(tmp_path / "fresh.md")]) == 0
    assert main([str(tmp_path / "fresh.md"), "--check"]) == 0


@pytest.mark.parametrize("name", ["celeba", "demo", "fitz", "image_csv", "npz", "everything"])
def test_every_key_of_a_resolved_recipe_is_documented(name: str, tmp_path: Path) -> None:
    recipe = (_everything(tmp_path) if name == "everything"
              else load_recipe(ROOT / "fairdeploy" / "recipes" / f"{name}.yaml"))
    text = DOC.read_text(encoding="utf-8")
    sections = _sections(text)
    common = text.split("## `data`")[0]
    dump = recipe.model_dump(mode="json", by_alias=True)
    types = _types(common)
    top = [p for p in _paths({k: v for k, v in dump.items()
                              if k not in ("data", "method", "compare")}, "", types)]
    kind = sections[f"kind: {dump['data']['kind']}"]
    checked = [(p, common) for p in top]
    checked += [(p, kind) for p in _paths(dump["data"], "data.", _types(kind))]
    for entry in [dump["method"], *(dump["compare"] or [])]:
        table = sections[f"name: {entry['name']}"]
        checked += [(p, table) for p in _paths(entry, "method.", _types(table))]
    missing = [p for p, table in checked if p not in recipe_keys(table)]
    assert not missing
    assert {"data", "method", "compare"} <= recipe_keys(common)
    assert len(checked) >= (150 if name == "everything" else 60)
