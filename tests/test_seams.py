"""Bugs that lived between two copies of one concept (issue 18), each reproduced at unit
level with its corner cases, checked against an independent computation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _tiny_nets import rows_and_vanilla, three_class_arrays, trained_mlp
from test_export import make_factorized
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.export import ExportOptions, export_onnx
from fairdeploy.lrf import activation_abs_sums
from fairdeploy.plan import LayerPlan, Plan
from fairdeploy.recipe import parse_recipe
from fairdeploy.scoring import group_hessians
from fairdeploy.sweep import guard_reasons, parse_selection
from fairdeploy.weight_hessian import group_weight_hessians


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# --------------------------------------------------------------------------- a tiny experiment


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    tmp = tmp_path_factory.mktemp("seams")
    arrays = three_class_arrays(360)
    np.savez(tmp / "data.npz", **arrays)
    return tmp, trained_mlp(arrays)


def _experiment(tmp: Path, model: nn.Module, method: dict) -> Experiment:
    recipe = {
        "model": {"arch": "mlp", "num_classes": 3,
                  "kwargs": {"in_features": 8, "widths": [32, 32]}},
        "data": {"kind": "npz", "path": str(tmp / "data.npz"), "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": method,
    }
    return Experiment(parse_recipe(recipe), model, cache_dir=tmp / "cache", progress=False)


# --------------------------------------------------------------------------- bug 1: seed


def _fairlrf(seed: int) -> dict:
    return {"name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}],
            "scoring": {"samples_per_group": "all", "estimator": "ggn_mc", "seed": seed}}


def _fairprune(seed: int) -> dict:
    return {"name": "fairprune", "layers": ["layers.2"], "prune_ratio": 0.3,
            "scoring": {"samples_per_group": "all", "estimator": "ggn_mc", "seed": seed}}


def _lrf_hessians(exp: Experiment, plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
    impl = plan.implementation
    head = impl.factorized_head(plan, exp.context)
    got = impl.selection_inputs(plan, exp.context, head, 0, {})
    return got.hessians


def _lrf_reference(exp: Experiment, plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
    ctx = exp.context
    head = plan.implementation.factorized_head(plan, ctx)
    s = ctx.scoring_set(plan.scoring).features
    h = group_hessians(head, "layers.2", s.features, s.targets, s.groups,
                       group_ids=(ctx.unprivileged, ctx.privileged), estimator="ggn_mc",
                       batch_size=plan.scoring.batch_size, mc_samples=plan.scoring.mc_samples,
                       seed=plan.scoring.seed)
    return {role: h[g] for role, g in enumerate((ctx.unprivileged, ctx.privileged))}


def _weight_hessians(exp: Experiment, plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
    return plan.implementation.hessians(plan, exp.context, full_model=False)


def _weight_reference(exp: Experiment, plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
    ctx = exp.context
    s = ctx.scoring_set(plan.scoring).features
    h = group_weight_hessians(ctx.head, ["layers.2.weight"], s.features, s.targets, s.groups,
                              group_ids=(ctx.unprivileged, ctx.privileged), estimator="ggn_mc",
                              batch_size=plan.scoring.batch_size,
                              mc_samples=plan.scoring.mc_samples, seed=plan.scoring.seed)
    return {role: h[g] for role, g in enumerate((ctx.unprivileged, ctx.privileged))}


@pytest.mark.parametrize(
    ("method", "cached", "reference"),
    [(_fairlrf, _lrf_hessians, _lrf_reference),
     (_fairprune, _weight_hessians, _weight_reference)],
    ids=["fairlrf", "fairprune"],
)
def test_hessian_cache_keys_the_ggn_mc_seed_with_every_sample(
    tabular, method, cached, reference
) -> None:
    """``samples_per_group: all`` draws nothing, but ``ggn_mc`` draws labels with the
    seed: seeds 0 and 1 must not share a cache entry (in memory or on disk)."""
    tmp, model = tabular
    exp = _experiment(tmp, model, method(0))
    exp.prepare()
    plans = {s: exp.recipe.method.model_copy(
        update={"scoring": exp.recipe.method.scoring.model_copy(update={"seed": s})})
        for s in (0, 1)}
    first = cached(exp, plans[0])
    second = cached(exp, plans[1])
    for s, got in ((0, first), (1, second)):
        want = reference(exp, plans[s])
        for role in (0, 1):
            for p, t in want[role].items():
                torch.testing.assert_close(got[role][p].double(), t.double(), rtol=1e-6,
                                           atol=1e-12)
    # The seeds really differ (else the test could not fail).
    assert any(not torch.equal(first[r][p], second[r][p]) for r in (0, 1) for p in first[r])
    # A new experiment over the same cache folder reads seed 1's own entry.
    again = _experiment(tmp, model, method(1))
    again.prepare()
    for role in (0, 1):
        for p, t in cached(again, again.recipe.method)[role].items():
            torch.testing.assert_close(t, second[role][p])


@pytest.mark.parametrize(
    ("method", "cached", "reference"),
    [(_fairlrf, _lrf_hessians, _lrf_reference),
     (_fairprune, _weight_hessians, _weight_reference)],
    ids=["fairlrf", "fairprune"],
)
def test_hessians_reach_the_estimator_with_mc_samples(tabular, method, cached, reference) -> None:
    """Every estimator setting of the scoring spec reaches the Hessian function (one
    ``estimator_inputs`` for all methods, FairLRF's ``mc_samples`` included): ``mc_samples``
    1 and 4 give each their own reference's numbers, and they differ."""
    tmp, model = tabular
    exp = _experiment(tmp, model, method(0))
    exp.prepare()
    base = exp.recipe.method
    got = {}
    for mc in (1, 4):
        plan = base.model_copy(
            update={"scoring": base.scoring.model_copy(update={"mc_samples": mc})})
        got[mc] = cached(exp, plan)
        want = reference(exp, plan)
        for role in (0, 1):
            for p, t in want[role].items():
                torch.testing.assert_close(got[mc][role][p].double(), t.double(),
                                           rtol=1e-6, atol=1e-12)
    assert any(not torch.equal(got[1][0][p], got[4][0][p]) for p in got[1][0])


@pytest.mark.parametrize("method", ["fairlrf", "fairprune", "fairquantize"])
@pytest.mark.parametrize("estimator", ["exact", "fisher"])
def test_mc_samples_without_ggn_mc_is_refused_not_ignored(method: str, estimator: str) -> None:
    raw = Plan(method, **_example_settings(method)).model_dump(by_alias=True)
    raw["scoring"] |= {"estimator": estimator, "mc_samples": 1}  # the neutral value: fine
    assert Plan(**raw).scoring.mc_samples == 1
    raw["scoring"]["mc_samples"] = 4
    with pytest.raises(FairDeployError, match=r"mc_samples: 4 is read only by estimator ggn_mc"):
        Plan(**raw)
    raw["scoring"]["estimator"] = "ggn_mc"
    assert Plan(**raw).scoring.mc_samples == 4


def _example_settings(method: str) -> dict:
    return {"fairlrf": {"layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}]},
            "fairprune": {"prune_ratio": 0.3},
            "fairquantize": {"quantize_ratio": 0.3}}[method]


# --------------------------------------------------------------------------- bug 2: dry run


def _stored_floats(path: Path) -> int:
    m = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize(
    ("first_bias", "cols_a", "act"),
    [(True, [3, 6, 8, 10], nn.ReLU),  # the issue's case: counted 4 fewer than stored
     (True, [3, 6], nn.ReLU),
     (False, [3, 6, 8, 10], nn.ReLU),
     (True, [3, 6, 8, 10], nn.Sigmoid)],  # φ(0) ≠ 0: the last layer needs its bias
)
def test_dry_run_count_equals_the_export_when_folding_gives_a_bias_free_layer_a_bias(
    tmp_path, exporter, first_bias, cols_a, act
) -> None:
    """Linear → ReLU → Linear(bias=False) → φ → Linear(bias=False), the first two
    factorized with rr = 0: folding the first layer's constant outputs gives the second a
    bias; that bias is exactly zero on the second layer's own constant outputs, so the
    last layer needs a bias only where φ(0) ≠ 0. The count from shapes, the export's count
    and what the ONNX file stores agree."""
    from fairdeploy.export import deployed_params

    a = make_factorized(8, 16, 4, [1, 2], cols_a, 0, bias=first_bias, seed=1)
    b = make_factorized(16, 16, 4, [3, 6], [3, 6], 0, bias=False, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(a, nn.ReLU(), b, act(), nn.Linear(16, 4, bias=False)).eval()
    x = torch.randn(20, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_onnx(model, x[:4], tmp_path / "b.onnx",
                          options=ExportOptions(eliminate_dead=True, exporter=exporter))
    vanilla, rows = rows_and_vanilla(model)
    shape = deployed_params(vanilla, rows, example_input=x[:2])
    stored = _stored_floats(tmp_path / "b.onnx")
    assert res.deployed_params == stored
    assert shape.params_min <= stored <= shape.params
    with torch.no_grad():
        ref = model(x).numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-5,
                               atol=2e-5)


# --------------------------------------------------------------------------- bug 4: reuse


class _SharedAct(nn.Module):
    """One activation module called after two layers (``self.act`` twice)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class _SharedActDropout(_SharedAct):
    """The same, with a Dropout (a no-op in eval mode) between a layer and the act."""

    def __init__(self, inplace: bool) -> None:
        super().__init__(inplace)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.drop(self.fc1(x)))
        return self.fc3(self.act(self.drop(self.fc2(h))))


@pytest.mark.parametrize("net", [_SharedAct, _SharedActDropout])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_activation_sums_count_only_the_call_after_the_layer(net, inplace, layer) -> None:
    torch.manual_seed(0)
    model = net(inplace).eval()
    x = torch.randn(11, 5)
    s_in, s_out = activation_abs_sums(model, layer, [x[:6], x[6:]])
    with torch.no_grad():
        h1 = torch.relu(model.fc1(x))
        h2 = torch.relu(model.fc2(h1))
    want_in, want_out = (x, h1) if layer == "fc1" else (h1, h2)
    torch.testing.assert_close(s_in, want_in.abs().sum(0).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_out, want_out.abs().sum(0).double(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bug 5: guard


@pytest.mark.parametrize(
    ("rule", "tolerance"),
    [("min eodd", 0.01),
     ("min eodd s.t. eopp1 >= vanilla - 0.3", 0.01),  # a fairness metric: not accuracy
     ("min eodd s.t. eodd >= vanilla - 1", 0.01),
     ("min eodd s.t. cr >= vanilla - 0.5", 0.01),
     ("min eodd s.t. accuracy >= vanilla - 0.05", 0.05),
     ("min eodd s.t. balanced_accuracy >= vanilla - 0.04 and eopp0 >= vanilla - 0.9", 0.04),
     ("min eodd s.t. avg_precision >= vanilla - 0.02", 0.02),
     ("min eodd s.t. avg_f1 >= vanilla - 0.03 and accuracy >= vanilla - 0.02", 0.03)],
)
def test_only_accuracy_like_constraints_set_the_guard_tolerance(rule, tolerance) -> None:
    assert parse_selection(rule).guard_tolerance() == pytest.approx(tolerance)


def _metrics(acc: float, rates: list[list[float]]) -> dict:
    return {"accuracy": acc, "balanced_accuracy": acc, "predicted_rates": rates}


@pytest.mark.parametrize(
    ("point", "rejected"),
    [(_metrics(0.8, [[0.5, 0.5], [0.4, 0.6]]), False),
     (_metrics(0.8, [[0.5, float("nan")], [0.4, 0.6]]), True),  # the point's own rate
     (_metrics(0.8, [[0.5, None], [0.4, 0.6]]), True),
     (_metrics(float("nan"), [[0.5, 0.5], [0.4, 0.6]]), True),
     (_metrics(0.8, [[0.5, 0.2], [0.4, 0.6]]), True)],
)
def test_collapse_guard_rejects_an_undefined_value_of_the_point(point, rejected) -> None:
    vanilla = _metrics(0.8, [[0.5, 0.5], [0.4, 0.6]])
    reasons = guard_reasons([point], vanilla, tolerance=0.01, class_names=["x", "y"],
                            group_names=["a", "b"])
    assert bool(reasons) == rejected


# --------------------------------------------------------------------------- bug 6: SLR-a


def test_slr_a_scores_every_layer_on_the_vanilla_activations(tabular) -> None:
    """Decided: SLR-a scores each layer of a multi-layer plan on the VANILLA model's
    activations (as SLR-w scores the original weights), so a layer's selection does not
    depend on the layers before it in the plan. Checked against a manual forward."""
    tmp, model = tabular
    layers = [{"layer": "layers.0", "rank": 6, "sr": 0.5, "rr": 0.0},
              {"layer": "layers.2", "rank": 8, "sr": 0.25, "rr": 0.0}]
    exp = _experiment(tmp, model, {"name": "slr_a", "layers": layers,
                                   "scoring": {"samples_per_group": 40, "seed": 3}})
    ctx = exp.prepare()
    both = exp.apply(exp.recipe.method)
    alone = exp.apply(Plan("slr_a", [LayerPlan("layers.2", 8, 0.25, 0.0)],
                           scoring=exp.recipe.method.scoring))
    assert both.selections["layers.2"] == alone.selections["layers.2"]
    # Independent: the vanilla model's activations on the scoring rows, by hand.
    x = ctx.scoring_set(exp.recipe.method.scoring).features.features
    with torch.no_grad():
        h1 = torch.relu(model.layers[0](x))
        h2 = torch.relu(model.layers[2](h1))
    for name, (inp, out), sr in (("layers.0", (x, h1), 0.5), ("layers.2", (h1, h2), 0.25)):
        rows = torch.sort(inp.abs().double().sum(0), stable=True).indices
        cols = torch.sort(out.abs().double().sum(0), stable=True).indices
        n_rows, n_cols = int(sr * inp.shape[1]), int(sr * out.shape[1])
        assert both.selections[name]["rows"] == sorted(rows[:n_rows].tolist())
        assert both.selections[name]["cols"] == sorted(cols[:n_cols].tolist())


def test_context_keys_hessians_by_everything_they_depend_on(tabular) -> None:
    """The one place keys are built: the same draw and estimator share an entry (the
    seed of an ``all`` draw with a deterministic estimator changes nothing), anything
    that changes the value gets its own."""
    from fairdeploy.plan import ScoringSpec

    tmp, model = tabular
    ctx = _experiment(tmp, model, _fairlrf(0)).prepare()
    calls: list[tuple] = []

    def compute(data, ids):
        calls.append((len(data.indices), ids))
        return {g: {"w": torch.full((2,), float(len(calls)))} for g in ids}

    def ask(of="a", inputs="features", **spec):
        full = {"samples_per_group": "all", "estimator": "exact", "seed": 0} | spec
        return ctx.hessians(ScoringSpec(**full), compute, of={"layer": of}, inputs=inputs)

    first = ask()
    again = ask(seed=1)  # exact on every sample: the seed draws nothing
    assert len(calls) == 1 and torch.equal(again[0]["w"], first[0]["w"])
    ask(estimator="ggn_mc")
    ask(estimator="ggn_mc", seed=1)  # ggn_mc draws labels with the seed
    ask(estimator="fisher")
    ask(samples_per_group=20)
    ask(samples_per_group=20, seed=1)  # another draw of samples
    ask(of="b")
    ask(inputs="model")
    ask(batch_size=7)
    assert len(calls) == 9
    assert set(first) == {0, 1} and calls[0][1] == (ctx.unprivileged, ctx.privileged)
    with pytest.raises(ValueError, match="privileged"):
        ctx.hessians(ScoringSpec(), compute, of={"privileged": 0})
