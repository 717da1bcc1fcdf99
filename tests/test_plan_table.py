"""Plans find their method in a table below them: ``fairdeploy.plan`` imports neither the
methods nor the recipe loader, so it is in no import cycle (issue 18, item 3)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

import fairdeploy
from fairdeploy import LayerPlan, Plan
from fairdeploy._schema_errors import format_validation_error
from fairdeploy.errors import FairDeployError
from fairdeploy.methods import list_methods

PKG = Path(fairdeploy.__file__).parent
TESTS = Path(__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """fairdeploy module -> the fairdeploy modules it imports anywhere in its file
    (inside functions and under TYPE_CHECKING too), each to the deepest existing module."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                            for a in node.names}
        graph[module] = {r for t in targets if (r := resolve(t)) and r != module}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


@pytest.mark.parametrize("low", ["fairdeploy.plan", "fairdeploy._method_table",
                                 "fairdeploy._schema_errors"])
def test_the_plan_layer_imports_no_method_and_no_recipe_and_is_in_no_cycle(low: str) -> None:
    graph = _import_graph()
    below = _reachable(graph, low)
    assert not {m for m in below if m.startswith(("fairdeploy.methods", "fairdeploy.recipe"))}
    assert low not in below  # nothing it imports imports it back


def test_the_graph_sees_imports_inside_functions() -> None:
    # The check above is only worth something if function-level imports count: the
    # recipe loader imports the methods at module level, experiment imports recipe_hash
    # inside a function.
    graph = _import_graph()
    assert "fairdeploy.methods" in graph["fairdeploy.recipe._method"]
    assert "fairdeploy.recipe" in graph["fairdeploy.experiment"]


_FRESH = """
import json, sys
from fairdeploy.errors import FairDeployError
from fairdeploy.plan import LayerPlan, Plan
out = {"loaded": sorted(m for m in sys.modules
                        if m.startswith(("fairdeploy.methods", "fairdeploy.recipe")))}
try:
    Plan("fairlrf", [LayerPlan("layers.2", 4)])
except FairDeployError as exc:
    out["before"] = str(exc)
import fairdeploy.methods
plan = Plan("fairlrf", [LayerPlan("layers.2", 4, 0.25)], beta=0.5)
out["after"] = [plan.label, plan.factorizes, type(plan).__name__]
try:
    Plan("_tiny_method:MagnitudeZero", layer="layers.2")
except FairDeployError as exc:
    out["user"] = str(exc)
out["user_imported"] = "_tiny_method" in sys.modules
from fairdeploy._trust import trusting_recipes
with trusting_recipes():
    fairdeploy.methods.get_method("_tiny_method:MagnitudeZero")
out["user_after"] = Plan("_tiny_method:MagnitudeZero", layer="layers.2").label
print(json.dumps(out))
"""


def _fresh(code: str) -> str:
    env = {"PYTHONPATH": f"{PKG.parent}:{TESTS}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_plan_in_a_fresh_interpreter_finds_its_method_once_methods_are_imported() -> None:
    out = json.loads(_fresh(_FRESH))
    assert out["loaded"] == []  # importing fairdeploy.plan imports no method, no recipe
    assert out["before"] == (
        "method 'fairlrf' is unknown: no method is registered yet (import fairdeploy.methods "
        "first, or use `from fairdeploy import Plan`: either registers the built-in methods)"
    )
    here = Plan("fairlrf", [LayerPlan("layers.2", 4, 0.25)], beta=0.5)  # this process's
    assert out["after"] == [here.label, True, "FairLRFPlan"]
    # A plan never imports code: an import-string method is registered by get_method
    # (or a recipe naming it) first.
    assert out["user"].startswith("method '_tiny_method:MagnitudeZero' is not registered")
    assert "get_method('_tiny_method:MagnitudeZero')" in out["user"]
    assert out["user_imported"] is False
    assert out["user_after"] == "Magnitude zero (layers.2, 50%)"


def test_the_public_plan_registers_the_built_in_methods() -> None:
    code = ("from fairdeploy import Plan; from fairdeploy.methods import list_methods; "
            "plan = Plan('truncated_svd', [{'layer': 'layers.2', 'rank': 3}]); "
            "print(plan.label, *list_methods())")
    here = Plan("truncated_svd", [{"layer": "layers.2", "rank": 3}])
    assert _fresh(code) == " ".join([here.label, *list_methods()])
    assert len(list_methods()) == 7


def test_an_unknown_method_is_refused_with_the_registered_names() -> None:
    with pytest.raises(FairDeployError) as err:
        Plan("fairlfr", layers=[])
    assert str(err.value) == (f"method 'fairlfr' is unknown: use one of "
                              f"{', '.join(list_methods())} or package.module:Class")
    assert list_methods()[:2] == ["vanilla", "truncated_svd"]


class _A(BaseModel):
    type: Literal["a"]
    x: int


class _B(BaseModel):
    type: Literal["b"]


class _Top(BaseModel):
    source: Annotated[_A | _B, Field(discriminator="type")]


def _line(data: dict, **kwargs) -> str:
    with pytest.raises(ValidationError) as err:
        _Top.model_validate(data)
    return format_validation_error(err.value, "src", **kwargs)


def test_schema_error_lines_of_a_tagged_union() -> None:
    tags = {"source": ("a", "b")}
    assert _line({"source": {"type": "c"}}) == (
        "src: source.type: 'c' is not allowed (use one of a, b)")
    assert _line({"source": {}}) == "src: source.type: required key is missing"
    assert _line({"source": {}}, union_tags=tags) == (
        "src: source.type: required key is missing (use one of a, b)")
    # The tag pydantic puts into the key path is left out where the union is named.
    assert _line({"source": {"type": "a", "x": "no"}}) == (
        "src: source.a.x: 'no' is not allowed (use an integer)")
    assert _line({"source": {"type": "a", "x": "no"}}, union_tags=tags) == (
        "src: source.x: 'no' is not allowed (use an integer)")
    seen: list[list[str | int]] = []
    assert _line({"source": {"type": "a", "x": "no"}}, union_tags=tags,
                 line_of=lambda loc: seen.append(loc) or 7).startswith("src:7: source.x: ")
    assert seen == [["source", "x"]]
