"""Settings a command would ignore are refused, not accepted in silence (issue 21 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _reliability import check_contract, invoke, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_compare_refuses_export_quantize_int8(tiny, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    text = tiny.recipe.read_text().replace("export: {", "export: {quantize: int8, ")
    recipe.write_text(text.replace("path: data.npz", f"path: {tiny.data}"))
    out = invoke("compare", tiny.ckpt, "--recipe", recipe, "--out", tmp_path / "cmp",
                 "--exports", tmp_path / "exports")
    assert check_contract(out) == "error", out.text
    assert "export.quantize: int8 is read by optimize only" in out.text
    assert not (tmp_path / "cmp").exists()


# ------------------------------------------------------- keys a configuration never reads
#
# Each was accepted and made no difference (checked by running both values before the fix).
# Only values other than the defaults are refused: a resolved recipe spells every key out.


def _recipe(**changes) -> dict:
    from _tiny_nets import three_class_recipe

    recipe = three_class_recipe(Path("/nonexistent/data.npz"))
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = recipe
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data__split": {"mode": "column", "train": 0.8, "val": 0.1, "test": 0.1}},
         r"data\.split\.train: split\.mode column takes the split from the data and reads no "
         r"fractions"),
        ({"data__split": {"mode": "column", "test": 0.4, "train": 0.4}},
         r"data\.split\.train: .*reads no fractions"),
        ({"data__split": {"mode": "column", "seed": 7}},
         r"data\.split\.seed: split\.mode column draws nothing"),
        ({"method": {"name": "fairquantize", "quantize_ratio": 0.3, "finetune": {"lr": 0.5}}},
         r"finetune\.lr: read only when fine-tuning \(finetune_epochs ≥ 1; it is 0\)"),
        ({"method": {"name": "fairquantize", "quantize_ratio": 0.3, "finetune_epochs": 2,
                     "finetune": {"gamma": 0.1}}},
         r"finetune\.gamma: never applied: the lr steps every 4 epochs and each fine-tuning "
         r"runs 2"),
        ({"sweep": {"guard": False, "guard_tolerance": 0.05}},
         r"guard_tolerance: read only by the collapse guard, which guard: false turns off"),
    ],
    ids=["split-fractions", "split-fractions-2", "split-seed", "finetune-off", "gamma-never",
         "guard-off"],
)
def test_a_setting_the_configuration_never_reads_is_refused(changes, message) -> None:
    from fairdeploy.errors import FairDeployError
    from fairdeploy.recipe import parse_recipe

    with pytest.raises(FairDeployError, match=message):
        parse_recipe(_recipe(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"data__split": {"mode": "column", "train": 0.6, "val": 0.2, "test": 0.2,
                         "seed": 4242}},  # the defaults, as a resolved recipe writes them
        {"data__split": {"mode": "column", "seed": 7}, "data__max_samples": 50},  # draws them
        {"data__split": {"mode": "stratified", "train": 0.8, "val": 0.1, "test": 0.1,
                         "seed": 7}},
        {"method": {"name": "fairquantize", "quantize_ratio": 0.3, "finetune_epochs": 5,
                    "finetune": {"lr": 0.5, "gamma": 0.1}}},
        {"method": {"name": "fairquantize", "quantize_ratio": 0.3, "finetune_epochs": 2,
                    "finetune": {"gamma": 0.1, "step_epochs": 1}}},
        {"sweep": {"guard": True, "guard_tolerance": 0.05}},
    ],
    ids=["split-defaults", "split-seed-max-samples", "stratified", "finetune-on",
         "gamma-steps", "guard-on"],
)
def test_the_same_settings_where_they_are_read_are_accepted(changes) -> None:
    from fairdeploy.recipe import parse_recipe

    parse_recipe(_recipe(**changes))


def test_no_guard_with_a_guard_tolerance_on_the_command_line_is_refused(tiny,
                                                                       tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny.recipe.read_text().replace("path: data.npz", f"path: {tiny.data}"))
    out = invoke("sweep", tiny.ckpt, "--recipe", recipe, "--out", tmp_path / "sw",
                 "--grid", "sr=0.2", "--no-guard", "--guard-tolerance", "0.05",
                 "--exports", tmp_path / "exports")
    assert check_contract(out) == "error", out.text
    assert "--guard-tolerance is read only by the collapse guard" in out.text
    assert not (tmp_path / "sw").exists()


_LRF = {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}]}
_SLR_A = {"name": "slr_a", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}]}
_FQ = {"name": "fairquantize", "quantize_ratio": 0.3}


@pytest.mark.parametrize(
    ("plan", "read"),
    [({**_LRF, "scoring": {"samples_per_group": "all", "seed": 3}}, False),
     ({**_SLR_A, "scoring": {"samples_per_group": "all", "seed": 3}}, False),
     ({**_FQ, "scoring": {"samples_per_group": "all", "seed": 3}}, False),
     ({**_LRF, "scoring": {"samples_per_group": "all", "seed": 3, "estimator": "ggn_mc"}},
      True),  # the label draws
     ({**_FQ, "finetune_epochs": 1, "scoring": {"samples_per_group": "all", "seed": 3}},
      True),  # fine-tuning's shuffling
     ({**_LRF, "scoring": {"samples_per_group": 64, "seed": 3}}, True),  # the draw
     ({**_LRF, "scoring": {"samples_per_group": "all", "seed": 0}}, True)],  # the default
    ids=["fairlrf", "slr_a", "fairquantize", "ggn_mc", "finetuned", "drawn", "default"],
)
def test_a_scoring_seed_that_draws_nothing_is_refused(plan: dict, read: bool) -> None:
    from fairdeploy.errors import FairDeployError
    from fairdeploy.plan import Plan

    if read:
        Plan(**plan)
    else:
        with pytest.raises(FairDeployError, match=r"scoring\.seed: samples_per_group: all "
                                                  r"takes every sample, so the seed 3"):
            Plan(**plan)


def test_compare_entries_drop_a_main_seed_they_would_not_read() -> None:
    """A main FairLRF plan with every sample, ggn_mc and seed 1 reads its seed; an SLR-a
    entry derived from it would not (it draws nothing), so it takes seed 0, while a FairPrune
    entry (ggn_mc too) keeps 1."""
    from fairdeploy.recipe import parse_recipe

    main = {**_LRF, "scoring": {"samples_per_group": "all", "estimator": "ggn_mc", "seed": 1}}
    recipe = parse_recipe(_recipe(method=main, compare=[
        "slr_a", {"name": "fairprune", "prune_ratio": 0.3}, "fairlrf"]))
    seeds = {p.method: p.scoring.seed for p in recipe.plans}
    assert seeds == {"slr_a": 0, "fairprune": 1, "fairlrf": 1}


def test_compare_says_which_report_settings_only_optimize_reads(tiny, tmp_path: Path) -> None:
    """compare times no latency, but a recipe is shared with optimize, which does: the
    settings are said (on the terminal and in the report), not refused."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny.recipe.read_text().replace("path: data.npz", f"path: {tiny.data}"))
    out = invoke("compare", tiny.ckpt, "--recipe", recipe, "--out", tmp_path / "cmp",
                 "--exports", tmp_path / "exports")
    assert check_contract(out) == "ok", out.text
    said = ("report.latency_batches, report.latency_warmup, report.latency_iterations: read "
            "by optimize, which times latency; compare times none")
    assert f"note: {said}" in out.text
    notes = json.loads((tmp_path / "cmp" / "report.json").read_text())["notes"]
    assert any(n.startswith(said) for n in notes)
