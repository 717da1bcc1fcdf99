"""Recipe schema: shipped recipes, defaults, one-line errors with key paths and lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fairdeploy.errors import FairDeployError
from fairdeploy.plan import LayerPlan, Plan
from fairdeploy.recipe import (
    CELEBA_ATTRIBUTES,
    load_recipe,
    parse_recipe,
    recipe_hash,
    save_resolved_recipe,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

BASE = {
    "model": {"arch": "mlp", "num_classes": 2},
    "data": {"kind": "celeba_attributes"},
    "method": {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 4, "sr": 0.5}]},
}


def _with(**sections):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in sections.items():
        data[key] = value
    return data


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _error(data) -> str:
    with pytest.raises(FairDeployError) as info:
        parse_recipe(data, source="r.yaml")
    return str(info.value)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    plan = recipe.to_plan()
    assert isinstance(plan, Plan) and plan.layers
    out = save_resolved_recipe(recipe, tmp_path / "resolved.yaml")
    again = load_recipe(out)
    assert again == recipe
    assert recipe_hash(again) == recipe_hash(recipe)
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"]  # no temp file left


def test_celeba_recipe_has_table_1_settings():
    r = load_recipe(RECIPES / "celeba.yaml")
    assert r.to_plan() == Plan(
        "fairlrf", (LayerPlan("classifier.3", rank=1, sr=0.8, rr=0.65, beta=5 / 9),),
        scoring={"samples_per_group": 1024},  # images: a draw, not every training sample
    )
    assert (r.data.target, r.sensitive.attribute) == ("Smiling", "Male")
    assert r.sensitive.groups == {"female": [-1], "male": [1]}
    by_name = {c.method: c for c in r.compare}
    assert list(by_name) == ["vanilla", "truncated_svd", "slr_w", "slr_a", "fairprune",
                             "fairquantize", "fairlrf"]
    assert by_name["slr_w"].layers == (LayerPlan("classifier.3", 1, 0.5, 0.5),)
    assert by_name["truncated_svd"].layers[0].sr == 0.0
    assert by_name["fairprune"].prune_ratio == 0.55
    assert by_name["fairprune"].beta == pytest.approx(3 / 7)
    assert by_name["fairquantize"].quantize_ratio == 0.10
    assert by_name["fairlrf"] == r.to_plan()
    assert r.train.epochs == 100 and r.train.gamma == 0.57 and r.train.batch_size == 128


def test_fitz_recipe_has_table_2_settings():
    r = load_recipe(RECIPES / "fitz.yaml")
    assert r.to_plan().layers == (LayerPlan("classifier.3", 64, 0.4, 0.0, 5 / 9),)
    assert r.model.num_classes == 114
    assert r.data.split.mode == "stratified" and r.data.split.seed == 4242
    assert (r.data.split.train, r.data.split.val, r.data.split.test) == (0.6, 0.2, 0.2)
    assert r.data.csv == (RECIPES / "../data/fitzpatrick17k/fitzpatrick17k.csv").resolve() or (
        r.data.csv.name == "fitzpatrick17k.csv" and r.data.csv.is_absolute()
    )
    assert r.sensitive.groups == {"light": [1, 2, 3], "dark": [4, 5, 6]}


def test_demo_defaults_features_to_the_other_38_attributes():
    r = parse_recipe(BASE)
    assert r.data.features == [a for a in CELEBA_ATTRIBUTES if a not in ("Smiling", "Male")]
    assert len(r.data.features) == 38
    assert r.sensitive.groups == {"not_Male": [-1], "Male": [1]}
    assert r.data.split.mode == "official"
    assert r.model.kwargs == {"in_features": 38}


def test_beta_as_fraction_string_equals_float_and_hash_ignores_spelling():
    a = _with(method={"name": "fairlrf", "beta": "5/9",
                      "layers": [{"layer": "layers.2", "rank": 4, "sr": 0.5}]})
    b = _with(method={"name": "fairlrf", "layers": [
        {"layer": "layers.2", "rank": 4, "sr": 0.5, "rr": 0.0, "beta": 0.5555555555555556}]})
    ra, rb = parse_recipe(a), parse_recipe(b)
    assert ra.method.layers[0].beta == 5 / 9
    assert ra.to_plan() == rb.to_plan()
    # β defaults to the paper's 5/9: spelled out or not, the same resolved recipe
    assert recipe_hash(ra) == recipe_hash(rb)
    b["method"]["beta"] = "1/3"
    assert recipe_hash(parse_recipe(b)) != recipe_hash(ra)


def test_default_beta_is_the_papers_five_ninths():
    r = parse_recipe(BASE)
    assert r.method.beta == 5 / 9 and r.method.layers[0].beta == 5 / 9


def test_hash_ignores_where_the_data_lives_but_not_settings(tmp_path):
    a = parse_recipe(_with(data={"kind": "npz", "path": "/x/a.npz"},
                           sensitive={"groups": {"a": [0], "b": [1]}}))
    b = parse_recipe(_with(data={"kind": "npz", "path": "/y/b.npz"},
                           sensitive={"groups": {"a": [0], "b": [1]}}))
    c = parse_recipe(_with(data={"kind": "npz", "path": "/y/b.npz", "x_key": "feats"},
                           sensitive={"groups": {"a": [0], "b": [1]}}))
    assert recipe_hash(a) == recipe_hash(b) != recipe_hash(c)
    assert len(recipe_hash(a)) == 64


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump(_with(data={"kind": "npz", "path": "../d/f.npz"},
                                         sensitive={"groups": {"a": [0], "b": [1]}})))
    r = load_recipe(path)
    assert r.data.path == tmp_path / "sub" / ".." / "d" / "f.npz"
    assert r.source == path


def test_out_of_range_value_names_file_line_path_and_allowed_values(tmp_path):
    text = """model: {arch: mlp, num_classes: 2}
data: {kind: celeba_attributes}
method:
  name: fairlrf
  layers:
    - layer: layers.2
      rank: 4
      sr: 1.5
"""
    path = _write(tmp_path, text)
    with pytest.raises(FairDeployError) as info:
        load_recipe(path)
    assert str(info.value) == (
        f"{path}:8: method.layers[0].sr: 1.5 is not allowed (use a number in [0, 1])"
    )


def test_unknown_key_is_rejected_with_suggestion(tmp_path):
    path = _write(tmp_path, "model: {arch: mlp, num_classes: 2}\n"
                            "data: {kind: celeba_attributes, rooot: x}\n"
                            "method: {name: vanilla}\n")
    with pytest.raises(FairDeployError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: data.rooot: unknown key (allowed: ")
    assert "did you mean 'root'?" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_with(data={"kind": "celebA"}),
         "r.yaml: data.kind: 'celebA' is not allowed (use one of celeba, fitzpatrick17k, "
         "image_csv, npz, celeba_attributes)"),
        (_with(model={"arch": "mlp"}), "r.yaml: model.num_classes: required key is missing"),
        (_with(model={"arch": "mlp", "num_classes": 1}),
         "r.yaml: model.num_classes: 1 is not allowed (use a number ≥ 2)"),
        (_with(method={"name": "fairlrf", "layers": [{"layer": "a", "rank": 0}]}),
         "r.yaml: method.layers[0].rank: 0 is not allowed (use an integer ≥ 1)"),
        (_with(method={"name": "fairlrf", "layers": [{"layer": "a", "rank": True}]}),
         "r.yaml: method.layers[0].rank: True is not allowed (use a number, not true/false)"),
        (_with(method={"name": "fairlrf", "beta": "5/x", "layers": [{"layer": "a", "rank": 1}]}),
         "r.yaml: method.beta: '5/x' is not allowed (use a number or a fraction such as 5/9)"),
        (_with(method={"name": "svd"}),
         "r.yaml: method.name: 'svd' is not allowed (use one of vanilla, truncated_svd, slr_w, "
         "slr_a, fairprune, fairquantize, fairlrf or package.module:Class)"),
        (_with(method={"name": "fairlrf"}),
         "r.yaml: method.layers: required for fairlrf (list the target nn.Linear layers, e.g. "
         "[{layer: classifier.3, rank: 64}])"),
        (_with(method={"name": "truncated_svd", "layers": [{"layer": "a", "rank": 2, "sr": 0.4}]}),
         "r.yaml: method.layers[0].sr: 0.4 is not allowed for truncated_svd (it does not read "
         "sr; slr_w, slr_a and fairlrf do)"),
        (_with(method={"name": "slr_w", "layers": [{"layer": "a", "rank": 2, "beta": 0.4}]}),
         "r.yaml: method.layers[0].beta: 0.4 is not allowed for slr_w (it does not read beta; "
         "fairlrf does)"),
        (_with(method={"name": "slr_w", "beta": 0.4, "layers": [{"layer": "a", "rank": 2}]}),
         "r.yaml: method.beta: unknown key (allowed: name, layers)"),
        (_with(method={"name": "fairlrf", "layers": [{"layer": "a", "rank": 2}] * 2}),
         "r.yaml: method.layers: 'a' is listed twice (list each layer once)"),
        (_with(method={"name": "vanilla", "prune_ratio": 0.3}),
         "r.yaml: method.prune_ratio: unknown key (allowed: name)"),
        (_with(method={"name": "fairprune"}),
         "r.yaml: method.prune_ratio: required key is missing"),
        (_with(method={"name": "fairprune", "prune_ratio": 0}),
         "r.yaml: method.prune_ratio: 0 is not allowed (use a fraction in (0, 1], e.g. 0.35)"),
        (_with(method={"name": "fairlrf", "layers": [{"layer": "a", "rank": 2}],
                       "scoring": {"row_score": "full", "estimatr": "fisher"}}),
         "r.yaml: method.scoring.estimatr: unknown key (allowed: samples_per_group, seed, repeats, "
         "estimator, batch_size, mc_samples, row_score; did you mean 'estimator'?)"),
        (_with(sensitive={"groups": {"a": [1], "b": [1]}}),
         "r.yaml: sensitive.groups: {'a': [1], 'b': [1]} is not allowed (value 1 is in both "
         "group 'a' and 'b')"),
        (_with(sensitive={"groups": {"a": [1]}}),
         "r.yaml: sensitive.groups: {'a': [1]} is not allowed (give exactly two groups (FairLRF "
         "compares an unprivileged and a privileged group), e.g. {light: [1, 2, 3], dark: "
         "[4, 5, 6]})"),
        (_with(sensitive={"privileged": "men"}),
         "r.yaml: sensitive.privileged: 'men' is not allowed (use auto or one of not_Male, Male)"),
        (_with(data={"kind": "celeba_attributes", "target": "Smilling"}),
         "r.yaml: data.target: 'Smilling' is not a CelebA attribute (did you mean 'Smiling'? use "
         "one of the 40 names of list_attr_celeba.txt, e.g. Smiling, Male, Young)"),
        (_with(data={"kind": "celeba_attributes", "target": "Male"}),
         "r.yaml: sensitive.attribute: 'Male' is not allowed (it is also data.target: use two "
         "different attributes)"),
        (_with(data={"kind": "fitzpatrick17k", "root": "/d", "split": {"mode": "official"}}),
         "r.yaml: data.split.mode: 'official' is not allowed for data.kind fitzpatrick17k (use "
         "one of random, stratified)"),
        (_with(data={"kind": "celeba_attributes", "split": {"train": 0.7}}),
         "r.yaml: data.split: train + val + test add up to 1.1: make the fractions add up to 1"),
        (_with(data={"kind": "celeba", "root": "/d", "preprocessing": {"crop": 200}}),
         "r.yaml: data.preprocessing.crop: 200 is not allowed (use crop ≤ size = 128)"),
        (_with(data={"kind": "npz", "path": "/d.npz"}),
         "r.yaml: sensitive.groups: required for data.kind npz (map two group names to the values "
         "of 'group', e.g. {a: [0], b: [1]})"),
        (_with(export={"tolerances": {"atol": -1}}),
         "r.yaml: export.tolerances.atol: -1 is not allowed (use a number ≥ 0)"),
        (_with(report={"latency_batches": []}),
         "r.yaml: report.latency_batches: [] is not allowed (give at least one batch size, e.g. "
         "[1, 32])"),
        (_with(train={"gamma": 0}), "r.yaml: train.gamma: 0 is not allowed (use a number > 0)"),
        (_with(compare=["slr_w"], method={"name": "vanilla"}),
         "r.yaml: compare[0].layers: required for slr_w because the main method 'vanilla' lists "
         "no low-rank layers (give each layer and its rank)"),
    ],
)
def test_errors_are_one_line_with_key_path(data, expected):
    assert _error(data) == expected


def test_several_problems_report_the_first_and_count_the_rest():
    msg = _error(_with(model={"arch": 3, "num_classes": "x"}))
    assert msg.startswith("r.yaml: model.arch: 3 is not allowed (use a string)")
    assert msg.endswith("(and 1 more problem)")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "model:\n  arch: mlp\n  num_classes: [2\ndata: x\n")
    with pytest.raises(FairDeployError, match=rf"^{path}:4: invalid YAML \("):
        load_recipe(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FairDeployError, match=r"recipe .*nope\.yaml: no such file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(FairDeployError, match="must be a mapping of sections"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


def test_default_compare_list_uses_paper_slr_settings_and_the_method_itself():
    r = parse_recipe(_with(method={"name": "fairlrf", "beta": 0.5, "layers": [
        {"layer": "layers.2", "rank": 4, "sr": 0.3, "rr": 0.25}]}))
    plans = {c.method: c for c in r.compare}
    assert list(plans) == ["vanilla", "truncated_svd", "slr_w", "slr_a", "fairlrf"]
    assert plans["vanilla"] == Plan("vanilla")
    assert plans["truncated_svd"].layers == (LayerPlan("layers.2", 4),)
    assert plans["slr_a"].layers == (LayerPlan("layers.2", 4, 0.5, 0.5),)
    assert plans["fairlrf"] == r.to_plan()
    # a non-LRF method without layers compares against vanilla only
    r2 = parse_recipe(_with(method={"name": "fairprune", "prune_ratio": 0.35}))
    assert [c.method for c in r2.compare] == ["vanilla", "fairprune"]


def test_defaults_of_the_train_export_and_report_sections():
    r = parse_recipe(BASE)
    t = r.train
    assert (t.epochs, t.lr, t.step_epochs, t.gamma, t.batch_size) == (100, 0.01, 10, 0.57, 128)
    assert r.export.tolerances.atol == 1e-4 and r.export.tolerances.rtol == 1e-3
    assert r.method.scoring.samples_per_group == "auto"  # all for tabular data, else 1024
    assert r.sensitive.privileged == "auto"


def test_fitzpatrick_paths_resolve_under_root(tmp_path):
    r = parse_recipe(_with(model={"arch": "vgg11_paper", "num_classes": 114},
                           data={"kind": "fitzpatrick17k", "root": str(tmp_path)}))
    assert r.data.csv == tmp_path / "fitzpatrick17k.csv"
    assert r.data.images == tmp_path / "images"
    assert r.sensitive.attribute == "fitzpatrick_scale"
    assert r.sensitive.groups == {"light": [1, 2, 3], "dark": [4, 5, 6]}
