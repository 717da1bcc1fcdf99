"""The typed Python API (Experiment) and the bugs found where methods and recipes meet:
self-contained compare entries (their own β and scoring), the vanilla-export cache key,
data.num_workers, verify reading the privileged group from the metadata, one name per
public thing, and one writer's permissions for every file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _tiny_nets import three_class_arrays, three_class_recipe, trained_mlp
from click.testing import CliRunner
from torch import nn

from fairdeploy.cli import main
from fairdeploy.experiment import Experiment
from fairdeploy.metrics import group_metrics
from fairdeploy.plan import LayerPlan, Plan
from fairdeploy.recipe import parse_recipe


def _data(path: Path) -> dict[str, np.ndarray]:
    arrays = three_class_arrays()
    np.savez(path, **arrays)
    return arrays


def _recipe(tmp: Path, **sections) -> dict:
    return three_class_recipe(tmp / "data.npz", **{
        "export": {"verify_samples": 100},
        "report": {"latency_batches": [1], "latency_warmup": 1, "latency_iterations": 5},
        **sections,
    })


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    tmp = tmp_path_factory.mktemp("exp")
    model = trained_mlp(_data(tmp / "data.npz"))
    torch.save(model.state_dict(), tmp / "ckpt.pt")
    (tmp / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp)))
    return tmp, model


def test_in_memory_recipe_and_model_match_an_independent_evaluation(case) -> None:
    tmp, model = case
    exp = Experiment(parse_recipe(_recipe(tmp)), model)  # objects, no files but the data
    ctx = exp.prepare()
    assert ctx.first_layer == "layers.2"
    vanilla = exp.apply(Plan("vanilla"))
    # Independent: the full model on the raw test rows, scored by group_metrics directly.
    data = np.load(tmp / "data.npz")
    test = data["split"] == "test"
    with torch.no_grad():
        pred = model(torch.as_tensor(data["x"][test])).argmax(1).numpy()
    want = group_metrics(data["y"][test], pred, data["group"][test],
                         privileged=ctx.privileged, num_classes=3, group_names=["a", "b"])
    assert exp.evaluate(vanilla, "test").to_dict() == want.to_dict()
    # A processed head on cached features equals the full processed model on raw inputs.
    fair = exp.apply(exp.recipe.method)
    full = exp.model_of(fair)
    with torch.no_grad():
        direct = full(torch.as_tensor(data["x"][test]))
    torch.testing.assert_close(exp.logits(fair, "test"), direct, rtol=1e-5, atol=1e-5)
    assert exp.evaluate(full, "test").to_dict() == exp.evaluate(fair, "test").to_dict()


def test_an_in_memory_processed_model_is_hashed_with_its_extra_state(case) -> None:
    """A model holding a FactorizedLinear (optimize's model.pt, loaded by the user) has a
    non-tensor entry in its state_dict (``keep``); the in-memory cache key hashes it."""
    from fairdeploy.experiment import state_dict_sha256

    tmp, _ = case
    exp = Experiment(tmp / "r.yaml", tmp / "ckpt.pt")
    fair = exp.model_of(exp.apply(exp.recipe.method))
    assert any(not torch.is_tensor(v) for v in fair.state_dict().values())
    again = Experiment(parse_recipe(_recipe(tmp, method={"name": "vanilla"})), fair)
    ctx = again.prepare()
    direct = exp.evaluate(fair, "test").to_dict()
    assert again.evaluate(again.apply(Plan("vanilla")), "test").to_dict() == direct
    assert ctx.checkpoint_sha256 == state_dict_sha256(fair)
    other = exp.model_of(exp.apply(exp.recipe.method))
    layer = other.get_submodule("layers.2")
    layer.keep += 1  # the same tensors, another sparsity record: another key
    assert state_dict_sha256(other) != state_dict_sha256(fair)


def test_extra_state_is_hashed_by_content_and_other_objects_are_refused() -> None:
    """Tensors in extra state are hashed by their bytes (``str`` of a large tensor elides its
    middle: two models would share a cache key); an object without a content hash is a
    one-line refusal, not an address that changes every run."""
    from fairdeploy.errors import FairDeployError
    from fairdeploy.experiment import state_dict_sha256

    class Extra(nn.Module):
        def __init__(self, state) -> None:
            super().__init__()
            self.state = state

        def get_extra_state(self):
            return self.state

        def set_extra_state(self, state) -> None:
            self.state = state

    a = torch.zeros(5000)
    b = a.clone()
    b[2500] = 1.0
    assert str(a) == str(b)  # what a text-based hash would have seen
    assert state_dict_sha256(Extra({"t": a})) != state_dict_sha256(Extra({"t": b}))
    same = [Extra({"k": 3, "t": [a, np.arange(3)], "s": "x"}) for _ in range(2)]
    assert state_dict_sha256(same[0]) == state_dict_sha256(same[1])
    with pytest.raises(FairDeployError, match=r"_extra_state\.o' holds a value of type object"):
        state_dict_sha256(Extra({"o": object()}))


def test_export_and_verify_through_the_api(case, tmp_path: Path) -> None:
    tmp, _ = case
    exp = Experiment(tmp / "r.yaml", tmp / "ckpt.pt")
    fair = exp.apply(exp.recipe.method)
    result = exp.export(fair, tmp_path / "m.onnx")
    assert result.layers and (tmp_path / "m.verify.npz").is_file()
    verdict = exp.verify(tmp_path / "m.onnx")
    assert verdict and verdict.n_samples == 100
    from fairdeploy.export import read_metadata

    meta = read_metadata(tmp_path / "m.onnx")
    assert Plan(**meta["plan"]) == exp.recipe.method


def test_compare_entries_keep_their_own_beta_and_scoring(case) -> None:
    tmp, _ = case
    recipe = parse_recipe(_recipe(tmp, compare=[
        {"name": "fairlrf", "beta": 0.3},
        {"name": "fairlrf", "beta": 0.9},
        {"name": "fairlrf", "scoring": {"samples_per_group": 16, "seed": 5}},
        "slr_a",
    ]))
    low, high, drawn, slr_a = recipe.compare
    assert [lp.beta for lp in low.layers + high.layers] == [0.3, 0.9]
    assert low.layers[0].sr == 0.25 and low.layers[0].rank == 8  # from the main method
    assert (drawn.scoring.samples_per_group, drawn.scoring.seed) == (16, 5)
    assert drawn.layers[0].beta == pytest.approx(5 / 9)
    assert slr_a.scoring.samples_per_group == 64  # what the main method draws
    exp = Experiment(recipe, tmp / "ckpt.pt")
    runs = [exp.apply(p) for p in (low, high, drawn)]
    # Each entry is a complete plan: the same as that plan run on its own.
    for plan, run in zip((low, high, drawn), runs, strict=True):
        alone = Experiment(recipe, tmp / "ckpt.pt").apply(plan)
        assert alone.selections == run.selections
    assert runs[0].selections != runs[1].selections  # β is read
    assert (16, 5) in exp.context._scoring  # the entry's scoring sets were drawn
    main = exp.apply(recipe.method)
    assert main.selections != runs[2].selections  # ... and used


def test_a_plan_whose_layer_precedes_the_cut_moves_the_cut(case) -> None:
    tmp, _ = case
    exp = Experiment(tmp / "r.yaml", tmp / "ckpt.pt")
    assert exp.prepare([exp.recipe.method]).first_layer == "layers.2"
    early = exp.apply(Plan("truncated_svd", (LayerPlan("layers.0", 4),)))
    assert exp.context.first_layer == "layers.0" and early.head is not None


def _optimize(tmp: Path, recipe: dict, out: str) -> dict:
    (tmp / f"{out}.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, [
        "optimize", str(tmp / "ckpt.pt"), "--recipe", str(tmp / f"{out}.yaml"), "--out",
        str(tmp / out), "--exports", str(tmp / "exports"), "--no-latency",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((tmp / out / "report.json").read_text())


def test_the_vanilla_export_is_cached_across_method_settings(case) -> None:
    tmp, _ = case
    cache = tmp / "exports" / ".cache"
    _optimize(tmp, _recipe(tmp), "beta-default")
    (first,) = cache.glob("vanilla-*.onnx")
    # A new export is written under a temporary name and renamed: a new inode. (The
    # modification time is no proof: a cache hit refreshes it, for `cache prune`.)
    inode, data = first.stat().st_ino, first.read_bytes()
    other = _recipe(tmp)
    other["method"]["beta"] = 0.3
    report = _optimize(tmp, other, "beta-0.3")
    assert list(cache.glob("vanilla-*.onnx")) == [first]
    assert first.stat().st_ino == inode and first.read_bytes() == data
    assert report["methods"][1]["plan"]["layers"][0]["beta"] == 0.3


def test_data_num_workers_is_used(case, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, _ = case
    import fairdeploy.context as context  # where the context runs the trunk

    seen = []
    real = context.compute_features

    def spy(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "compute_features", spy)
    recipe = _recipe(tmp)
    recipe["data"]["num_workers"] = 2
    exp = Experiment(parse_recipe(recipe), tmp / "ckpt.pt")
    exp.prepare()
    assert seen and set(seen) == {2}
    plain = Experiment(tmp / "r.yaml", tmp / "ckpt.pt")
    torch.testing.assert_close(
        exp.context.features["test"].features, plain.context.features["test"].features
    )


def test_verify_takes_the_privileged_group_from_the_metadata(case, tmp_path: Path) -> None:
    tmp, _ = case
    for privileged in ("a", "b"):
        recipe = _recipe(tmp)
        recipe["sensitive"]["privileged"] = privileged
        exp = Experiment(parse_recipe(recipe), tmp / "ckpt.pt")
        path = tmp_path / f"{privileged}.onnx"
        exp.export(exp.apply(exp.recipe.method), path)
        result = CliRunner().invoke(main, ["verify", str(path), "--json", str(tmp_path / "v.json")])
        assert result.exit_code == 0, result.output
        fairness = json.loads((tmp_path / "v.json").read_text())["fairness"]
        groups = {g["name"]: g["privileged"] for g in fairness["groups"]}
        assert groups == {"a": privileged == "a", "b": privileged == "b"}


def test_verify_is_one_thing_whatever_the_import_order() -> None:
    import fairdeploy
    import fairdeploy.verification  # noqa: F401
    from fairdeploy import verify

    assert callable(verify) and verify.__module__ == "fairdeploy.verification"


def test_every_exported_file_gets_the_same_permissions(case, tmp_path: Path) -> None:
    tmp, _ = case
    exp = Experiment(tmp / "r.yaml", tmp / "ckpt.pt")
    old = os.umask(0o022)
    try:
        exp.export(exp.apply(exp.recipe.method), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"m.onnx": 0o644, "m.verify.npz": 0o644}


def test_optimize_ships_a_verified_int8_copy_with_its_fairness(case) -> None:
    """export.quantize: int8 — model.int8.onnx beside the float model, int8 weights in the
    file, verified, and its group fairness on the whole test split recomputed here from
    ONNX Runtime's own predictions."""
    import onnx
    import onnxruntime as ort

    tmp, _ = case
    recipe = _recipe(tmp)
    from fairdeploy.runtimes import runtime_available

    # Verified at export time in every runtime here (issue 19), the float and int8 files.
    runtimes = ["onnxruntime", "reference", *(["openvino"] if runtime_available("openvino")
                                               else [])]
    recipe["export"] = {"verify_samples": 100, "quantize": "int8", "int8": {"mode": "dynamic"},
                        "verify_runtimes": runtimes}
    report = _optimize(tmp, recipe, "int8")
    assert report["verify"]["verified_in"] == runtimes and report["verify"]["samples"] == 100
    assert report["int8"]["verify"]["verified_in"] == runtimes
    assert all(r["passed"] for r in report["int8"]["verify"]["runtimes"].values())
    int8_path = tmp / "int8" / "model.int8.onnx"
    kinds = {t.data_type for t in onnx.load(str(int8_path)).graph.initializer}
    assert onnx.TensorProto.INT8 in kinds
    block = report["int8"]
    assert block["verify"]["passed"] and block["export"]["mode"] == "dynamic"
    data = np.load(tmp / "data.npz")
    test = data["split"] == "test"
    sess = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {sess.get_inputs()[0].name: data["x"][test]})[0].argmax(1)
    privileged = report["task"]["privileged"]["id"]
    want = group_metrics(data["y"][test], pred, data["group"][test], privileged=privileged,
                         num_classes=3, group_names=["a", "b"]).to_dict()
    assert block["fairness"]["int8"]["fairness"] == want["fairness"]
    assert block["fairness"]["n_samples"] == int(test.sum())
    assert block["compression"]["measured_initializer_cr"] > report["onnx"]["initializer_cr"]
    text = (tmp / "int8" / "report.md").read_text()
    assert "## int8 model" in text and "verification PASSED" in text


def test_int8_settings_without_quantize_are_refused(case) -> None:
    from fairdeploy.errors import FairDeployError

    tmp, _ = case
    recipe = _recipe(tmp)
    recipe["export"] = {"int8": {"mode": "static"}}
    with pytest.raises(FairDeployError, match=r"export\.int8: only read with quantize: int8"):
        parse_recipe(recipe, source="r.yaml")
