"""The method registry: every registered method, walked like timm walks its models, and a
user's own method loaded from a recipe as ``package.module:Class``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_nets import three_class_arrays, three_class_recipe, trained_mlp
from click.testing import CliRunner

from fairdeploy.cli import main
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.methods import Method, get_method, list_methods, register_method
from fairdeploy.models import build_model
from fairdeploy.plan import Plan
from fairdeploy.recipe import load_recipe, parse_recipe

PAPER_ORDER = [
    "vanilla", "truncated_svd", "slr_w", "slr_a", "fairprune", "fairquantize", "fairlrf"
]  # fmt: skip


def _mlp(device: str = "cpu") -> torch.nn.Module:
    with torch.device(device):
        torch.manual_seed(0)
        return build_model("mlp", 3, in_features=8, widths=(32, 32))


def test_builtins_are_registered_in_the_papers_row_order() -> None:
    assert list_methods()[: len(PAPER_ORDER)] == PAPER_ORDER
    assert get_method("fairlrf").label == "FairLRF"


@pytest.mark.parametrize("name", list_methods())
def test_every_method_plan_round_trips_and_accounts_from_shapes(name: str) -> None:
    impl = get_method(name)
    model = _mlp()
    plan = impl.example(model)
    assert plan.method == name and isinstance(plan, impl.plan_class)
    # The JSON form (metadata, reports) and the recipe form (name:) rebuild the same plan.
    assert Plan(**plan.to_dict()) == plan
    assert impl.plan_class.model_validate(plan.model_dump(by_alias=True)) == plan
    assert plan.label.startswith(impl.label)
    impl.check(plan, model)
    # Accounting reads shapes only: the meta device gives the same numbers.
    meta = _mlp("meta")
    assert impl.theoretical_cr(plan, meta) == impl.theoretical_cr(plan, model) > 0
    assert impl.layer_table(plan, meta) == impl.layer_table(plan, model)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_refuses_a_key_it_does_not_read(name: str) -> None:
    raw = get_method(name).example(_mlp()).model_dump(by_alias=True)
    with pytest.raises(FairDeployError, match=r"not_a_setting: unknown key"):
        Plan(**raw, not_a_setting=1)


def test_register_method_refuses_a_taken_name() -> None:
    class Other(Method):
        name = "fairlrf"
        label = "Other"
        plan_class = Plan

    with pytest.raises(FairDeployError, match="already registered"):
        register_method(Other)


class _OwnPlan(Plan):
    """A plan no built-in method takes."""


def test_plan_class_is_the_type_argument_unless_a_class_names_its_own() -> None:
    from typing import Generic, TypeVar

    from fairdeploy.methods._lrf import SparseLowRankMethod

    P = TypeVar("P", bound=Plan)
    for name in list_methods():  # every built-in: Method[ItsPlan] and nothing else
        impl = get_method(name)
        bases = [b for b in type(impl).__orig_bases__ if hasattr(b, "__args__")]
        assert [b.__args__ for b in bases] == [(impl.plan_class,)], name

    class FromArgument(Method[_OwnPlan]):
        pass

    class Explicit(Method[_OwnPlan]):
        plan_class = Plan

    class Unparametrized(Method):
        plan_class = _OwnPlan

    class Inherits(FromArgument):
        pass

    class Intermediate(Method[P], Generic[P]):  # a type variable: nothing derived here
        pass

    class Leaf(Intermediate[_OwnPlan]):
        pass

    assert FromArgument.plan_class is _OwnPlan
    assert Explicit.plan_class is Plan
    assert Unparametrized.plan_class is _OwnPlan
    assert Inherits.plan_class is _OwnPlan
    class ChildOfExplicit(Explicit):  # the parent's own choice stands
        pass

    class Holder(Generic[P]):
        pass

    class TwoGenericBases(Holder[Plan], Method[_OwnPlan]):  # the Method base's argument
        pass

    assert "plan_class" not in Intermediate.__dict__
    assert Leaf.plan_class is _OwnPlan
    assert ChildOfExplicit.plan_class is Plan
    assert TwoGenericBases.plan_class is _OwnPlan
    assert SparseLowRankMethod.strategy is None
    assert get_method("fairlrf").strategy == "fairlrf" and get_method("slr_a").strategy == "slr_a"


def test_a_method_derived_from_fairlrf_under_another_name_scores_as_fairlrf(tmp_path) -> None:
    """The selection strategy is the name of the first class that names itself: a subclass
    registered under its own name keeps its parent's strategy (and runs)."""
    from fairdeploy.methods.fairlrf import FairLRF

    class Renamed(FairLRF):
        name = "renamed_fairlrf_for_test"
        label = "Renamed"

    assert Renamed.strategy == "fairlrf" and Renamed.plan_class is FairLRF.plan_class
    register_method(Renamed)
    try:
        arrays = three_class_arrays(n=240)
        np.savez(tmp_path / "data.npz", **arrays)
        model = trained_mlp(arrays)
        method = {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}],
                  "scoring": {"samples_per_group": 20}}
        exp = Experiment(parse_recipe(three_class_recipe(tmp_path / "data.npz", method=method)),
                         model, progress=False)
        want = exp.apply(exp.recipe.method)
        got = exp.apply(Plan(**{**method, "name": Renamed.name}))
        assert got.selections == want.selections
    finally:
        from fairdeploy._method_table import METHODS

        METHODS.pop(Renamed.name, None)


def test_unknown_and_unimportable_methods_are_one_line_errors(monkeypatch) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipes import test modules
    with pytest.raises(FairDeployError, match="'nope' is unknown: use one of vanilla"):
        get_method("nope")
    with pytest.raises(FairDeployError, match=r"cannot import 'no_such_module'.*PYTHONPATH"):
        get_method("no_such_module:Thing")
    with pytest.raises(FairDeployError, match=r"is not a fairdeploy\.methods\.Method subclass"):
        get_method("json:dumps")


# --------------------------------------------------------------------------- a user method


def _data(path: Path, n: int = 600) -> None:
    np.savez(path, **three_class_arrays(n=n))


def _recipe(tmp: Path, **sections) -> dict:
    return three_class_recipe(tmp / "data.npz", **sections)


def test_a_user_method_from_a_recipe_runs_in_compare(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipes import test modules
    _data(tmp_path / "data.npz")
    torch.save(_mlp().state_dict(), tmp_path / "ckpt.pt")
    user = {"name": "_tiny_method:MagnitudeZero", "layer": "layers.2", "fraction": 0.5}
    recipe = _recipe(tmp_path, compare=["vanilla", user, "truncated_svd"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(
        main,
        ["compare", str(tmp_path / "ckpt.pt"), "--recipe", str(tmp_path / "r.yaml"), "--out",
         str(tmp_path / "cmp"), "--exports", str(tmp_path / "exports")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    rows = {m["name"]: m for m in report["methods"]}
    assert list(rows) == ["vanilla", "_tiny_method:MagnitudeZero", "truncated_svd"]
    assert rows["_tiny_method:MagnitudeZero"]["label"] == "Magnitude zero (layers.2, 50%)"
    assert "Magnitude zero (layers.2, 50%)" in result.output
    # The row equals the method run alone through the Python API.
    exp = Experiment(tmp_path / "r.yaml", tmp_path / "ckpt.pt")
    alone = exp.evaluate(exp.apply(Plan(**user)), "test").to_dict()
    assert rows["_tiny_method:MagnitudeZero"]["metrics"] == json.loads(json.dumps(alone))
    # The resolved recipe keeps the import string and loads back.
    again = load_recipe(tmp_path / "cmp" / "recipe.yaml")
    assert again.compare[1] == Plan(**user)


def test_a_user_method_refuses_unknown_keys_with_file_and_line(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipes import test modules
    bad = {"name": "_tiny_method:MagnitudeZero", "layer": "layers.2", "fractoin": 0.5}
    with pytest.raises(FairDeployError, match=r"compare\[0\]\.fractoin: unknown key .*"
                                               "did you mean 'fraction'"):
        parse_recipe(_recipe(tmp_path, compare=[bad]), source="r.yaml")
