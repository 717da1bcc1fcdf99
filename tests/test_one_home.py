"""One home for each concept: the shared helpers against independent references, the
defaults that several layers read, and the import rules that keep the package acyclic."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import fairdeploy
from fairdeploy._json import json_fields, json_float, json_floats
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.fraction import check_fraction, fraction_count, kept_entries, num_selected

PKG = Path(fairdeploy.__file__).parent


# --------------------------------------------------------------------------- first_line


def test_first_line_quotes_the_first_line_cut_at_the_limit() -> None:
    assert first_line(ValueError("  bad value\nsecond line\n")) == "bad value"
    long = RuntimeError("x" * 500)
    assert first_line(long) == "x" * 200
    assert first_line(long, limit=300) == "x" * 300
    assert first_line(long, limit=None) == "x" * 500


def test_first_line_of_an_exception_without_text_is_its_type() -> None:
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("   \n  ")) == "OSError"


# --------------------------------------------------------------------------- json numbers


def test_json_float_turns_nan_inf_and_none_into_null() -> None:
    assert json_float(None) is None
    assert json_float(float("nan")) is None and json_float(np.float32("nan")) is None
    got = json_float(np.float64(0.25))
    assert got == 0.25 and type(got) is float
    assert json_float(3) == 3.0 and type(json_float(3)) is float
    assert json_floats(np.array([1.0, np.nan, -2.5])) == [1.0, None, -2.5]
    assert json_float(np.inf) is None and json_float(-np.float32("inf")) is None


def test_json_fields_keeps_field_order_and_non_floats() -> None:
    @dataclasses.dataclass
    class Row:
        value: float
        low: float
        flag: bool
        count: int

    assert list(json_fields(Row(math.nan, 0.5, True, 3)).items()) == [
        ("value", None), ("low", 0.5), ("flag", True), ("count", 3)
    ]


def test_every_record_that_is_its_fields_writes_them_through_json_record() -> None:
    from fairdeploy.comparison import compare_outputs

    # No class of the package spells out "its fields as a dict" again: JsonRecord is the home.
    for path in sorted(set(PKG.rglob("*.py")) - {PKG / "_json.py"}):
        text = path.read_text(encoding="utf-8")
        assert "getattr(self, k) for k in self.__dataclass_fields__" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name == "to_dict":
                body = ast.unparse(node.body[-1])
                assert body != "return json_fields(self)", f"{path}: inherit JsonRecord"
    # A record's NaN becomes null, so the dict is valid JSON.
    got = np.array([[np.nan, 1.0]], dtype=np.float32)
    record = compare_outputs("logits", got, np.ones_like(got), 1e-4, 1e-4, 1.0).to_dict()
    assert record["max_abs_error"] is None and not record["passed"]
    json.dumps(record, allow_nan=False)


# --------------------------------------------------------------------------- ⌊fraction·n⌋


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_fraction_count_is_the_exact_floor_of_a_decimal_fraction(digits: int) -> None:
    """Against exact rational arithmetic on the decimal text (the float 0.29 is below
    29/100, so a plain ``int(0.29 * 100)`` gives 28)."""
    step = 10**digits
    for numerator in range(0, step + 1, max(1, step // 50)):
        text = f"{numerator / step:.{digits}f}"
        for n in (1, 7, 10, 100, 768, 4096, 45_000_007):
            expected = math.floor(Fraction(text) * n)
            assert fraction_count(float(text), n) == expected, (text, n)
            assert num_selected(float(text), n) == expected
            assert kept_entries(float(text), n) == expected


def test_fraction_count_of_small_ratios() -> None:
    assert fraction_count(5 / 9, 9) == 5 and fraction_count(1 / 3, 3) == 1
    assert fraction_count(2 / 3, 10) == 6


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, True, "0.5", None])
def test_check_fraction_refuses_what_is_not_a_fraction(bad: object) -> None:
    with pytest.raises(FairDeployError, match=r"sr=.* is not allowed; use a fraction in \[0, 1\]"):
        num_selected(bad, 10)  # type: ignore[arg-type]
    with pytest.raises(FairDeployError, match=r"rr=.* is not allowed"):
        kept_entries(bad, 10)  # type: ignore[arg-type]


def test_check_fraction_without_zero() -> None:
    assert check_fraction("prune_ratio", 1) == 1.0
    with pytest.raises(FairDeployError, match=r"prune_ratio=0 is not allowed; .* \(0, 1\]"):
        check_fraction("prune_ratio", 0, allow_zero=False)


def test_every_method_counts_with_the_one_fraction_count() -> None:
    import importlib

    import fairdeploy.plan as plan
    import fairdeploy.weight_selection as weight_selection

    # ``fairdeploy.fairprune`` the attribute is the function; the module by its full name.
    fairprune = importlib.import_module("fairdeploy.fairprune")
    assert plan.num_selected is num_selected and plan.kept_entries is kept_entries
    assert weight_selection.fraction_count is fraction_count
    assert weight_selection.check_fraction is check_fraction
    assert fairprune.check_fraction is check_fraction


# --------------------------------------------------------------------------- defaults


def test_verify_tolerances_have_one_source() -> None:
    from fairdeploy import comparison
    from fairdeploy.cli import main
    from fairdeploy.recipe import ExportSpec

    export = ExportSpec()
    assert export.tolerances.atol == comparison.DEFAULT_ATOL
    assert export.tolerances.rtol == comparison.DEFAULT_RTOL
    assert export.tolerances.argmax_agreement == comparison.DEFAULT_ARGMAX_AGREEMENT
    assert export.int8.atol_scale == comparison.DEFAULT_INT8_ATOL_SCALE
    assert export.int8.rtol == comparison.DEFAULT_INT8_RTOL
    assert export.int8.argmax_agreement == comparison.DEFAULT_INT8_ARGMAX_AGREEMENT
    # verify's options default to None (an int8 file's recorded tolerances, else these):
    # the help text names the one source's values.
    verify = {p.name: p for p in main.commands["verify"].params}
    assert verify["atol"].default is None and verify["rtol"].default is None
    assert f"default {comparison.DEFAULT_ATOL:g};" in verify["atol"].help
    assert f"default {comparison.DEFAULT_RTOL:g};" in verify["rtol"].help


def test_finetune_defaults_have_one_source() -> None:
    from fairdeploy.fairquantize import FINETUNE_DEFAULTS
    from fairdeploy.methods.fairquantize import FinetuneSpec

    assert FinetuneSpec().model_dump() == FINETUNE_DEFAULTS


def test_sparse_layout_names_have_one_source() -> None:
    from fairdeploy.export import SPARSE_LAYOUTS
    from fairdeploy.export._eliminate import SPARSE_LAYOUTS as counted

    assert SPARSE_LAYOUTS is counted == ("blocks", "zeros")


# --------------------------------------------------------------------------- imports


def _imported(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from ... import`` in a file, relative imports resolved,
    inside functions and under TYPE_CHECKING included."""
    module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            src = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                src = ".".join([*base, *([src] if src else [])])
            out += [(src, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
    return out


def test_data_sits_below_recipe() -> None:
    """``data/`` and ``data_specs`` never import the recipe package, the plan or methods:
    the specs they share live in ``data_specs``, below both."""
    files = [*sorted((PKG / "data").glob("*.py")), PKG / "data_specs.py"]
    offenders = [
        f"{p.name}: {src}"
        for p in files
        for src, _ in _imported(p)
        if src.startswith(("fairdeploy.recipe", "fairdeploy.plan", "fairdeploy.methods"))
    ]
    assert offenders == []


def test_no_private_name_is_imported_across_packages() -> None:
    """``from fairdeploy.x import _name`` only within the package ``fairdeploy.x`` belongs
    to (a private module's public names may be imported anywhere)."""
    offenders = []
    for path in PKG.rglob("*.py"):
        here = ".".join(path.relative_to(PKG.parent).parts[:2]).removesuffix(".py")
        for src, name in _imported(path):
            parts = src.split(".")
            if parts[0] != "fairdeploy" or not name.startswith("_") or name.startswith("__"):
                continue
            if parts[-1].startswith("_"):
                continue  # the public names of a private module
            if ".".join(parts[:2]) != here:
                offenders.append(f"{path.relative_to(PKG)}: {src}.{name}")
    assert offenders == []
