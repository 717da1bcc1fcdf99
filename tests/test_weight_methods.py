"""FairPrune and FairQuantize as registry methods: what the rows do, checked against an
independent reference (autograd Hessians of the full model on the raw scoring inputs,
a numpy quantizer, brute-force ranking), the packed int8 export against the PyTorch
weights, the compare table against each method run alone, determinism with fine-tuning,
and the recipes' paper settings."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from _tiny_nets import cnn
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from fairdeploy.cli import main
from fairdeploy.commands.compare import run_compare
from fairdeploy.experiment import Experiment, first_samples
from fairdeploy.models import build_model
from fairdeploy.plan import LayerPlan, Plan
from fairdeploy.recipe import load_recipe
from fairdeploy.report import fairness_table, rank_pairs
from fairdeploy.verification import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# --------------------------------------------------------------------------- data, models


def _images(path: Path, n: int = 480, seed: int = 0) -> None:
    """(2, 6, 6) inputs, 3 classes; group 1's labels are noisier."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2, 6, 6)).astype(np.float32)
    w = rng.normal(size=(72, 3))
    y = (x.reshape(n, -1) @ w + rng.normal(scale=2 + 6 * group[:, None], size=(n, 3))).argmax(1)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    np.savez(path, x=x, y=y, group=group, split=split)


def _fit(model: nn.Module, path: Path, steps: int = 60) -> nn.Module:
    d = np.load(path)
    train = d["split"] == "train"
    x, y = torch.as_tensor(d["x"][train]), torch.as_tensor(d["y"][train])
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _recipe(tmp: Path, arch: dict, method: dict, **sections) -> dict:
    recipe = {
        "model": arch,
        "data": {"kind": "npz", "path": str(tmp / "data.npz"), "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": method,
        "export": {"verify_samples": 60},
        "report": {"latency_batches": [1], "latency_warmup": 1, "latency_iterations": 3},
    }
    recipe.update(sections)
    return recipe


CNN = {"arch": "_tiny_nets:cnn", "num_classes": 3}


@pytest.fixture(scope="module", autouse=True)
def _trusted_recipes():
    """The recipes here import tests/_tiny_nets.py: trusted (issue 21 item 15)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")
        yield


@pytest.fixture(scope="module")
def cnn_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    tmp = tmp_path_factory.mktemp("cnn")
    _images(tmp / "data.npz")
    torch.manual_seed(0)
    model = _fit(cnn(3), tmp / "data.npz")
    torch.save(model.state_dict(), tmp / "ckpt.pt")
    return tmp, model


# --------------------------------------------------------------------------- reference


def _reference_hessians(exp: Experiment, plan: Plan, layers: list[str]) -> dict[int, dict]:
    """Per role (0 unprivileged, 1 privileged), the exact diagonal of the Hessian of the
    mean CE over that group's scoring samples w.r.t. each layer's weight: autograd on the
    FULL model (float64) fed the raw inputs, whatever path the method took."""
    ctx = exp.context
    draw = ctx.scoring_set(plan.scoring)  # only the indices: which training samples
    train = ctx.splits["train"]
    x_all = train.features[torch.as_tensor(draw.indices)].double()
    y_all = torch.as_tensor(np.asarray(train.targets)[draw.indices]).long()
    g_all = np.asarray(train.groups)[draw.indices]
    net = copy.deepcopy(ctx.model).double().eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    out: dict[int, dict] = {}
    for role, gid in enumerate((ctx.unprivileged, ctx.privileged)):
        sel = torch.as_tensor(g_all == gid)
        x, y = x_all[sel], y_all[sel]
        out[role] = {}
        for layer in layers:
            name = f"{layer}.weight"

            def loss(
                w: torch.Tensor, name: str = name, x: torch.Tensor = x, y: torch.Tensor = y
            ) -> torch.Tensor:
                logits = torch.func.functional_call(net, {**params, name: w}, (x,))
                return F.cross_entropy(logits, y)

            w0 = params[name]
            h = torch.autograd.functional.hessian(loss, w0)
            out[role][layer] = h.reshape(w0.numel(), w0.numel()).diagonal().reshape(w0.shape)
    return out


def _assert_lowest(chosen: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """``chosen`` holds exactly ``count`` entries, and they are the lowest of ``scores``
    (up to float noise at the boundary)."""
    assert int(chosen.sum()) == count
    if 0 < count < chosen.numel():
        tol = 1e-6 * float(scores.abs().max())
        assert float(scores[chosen].max()) <= float(scores[~chosen].min()) + tol


def _np_dequantized(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel in numpy float32 (scale = max|w_o| / 127)."""
    flat = w.reshape(w.shape[0], -1).astype(np.float32)
    scale = (np.abs(flat).max(1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    s = scale.reshape(-1, *([1] * (w.ndim - 1)))
    q = np.clip(np.round(w.astype(np.float32) / s), -127, 127)
    return (q.astype(np.float32) * s).astype(np.float32)


# --------------------------------------------------------------------------- the rows


@pytest.mark.parametrize(
    ("layers", "ran_on"), [("all", "model"), (["4", "6", "8"], "head")]
)
def test_fairprune_zeroes_exactly_the_lowest_saliencies_per_layer(cnn_case, layers, ran_on):
    tmp, model = cnn_case
    method = {"name": "fairprune", "prune_ratio": 0.3, "beta": 3 / 7, "layers": layers,
              "scoring": {"samples_per_group": 48}}
    exp = Experiment(_recipe(tmp, CNN, method), model)
    plan = exp.recipe.method
    processed = exp.apply(plan)
    assert processed.details["ran_on"] == ran_on
    assert bool(processed.notes) == (ran_on == "model")  # the report says it ran the model
    names = ["0", "4", "6", "8"] if layers == "all" else layers
    ref = _reference_hessians(exp, plan, names)
    pruned = exp.model_of(processed)
    for layer in names:
        w0 = model.get_submodule(layer).weight.detach().double()
        w1 = pruned.get_submodule(layer).weight.detach()
        saliency = 0.5 * w0**2 * (ref[0][layer] - 3 / 7 * ref[1][layer])
        chosen = w1 == 0
        _assert_lowest(chosen, saliency, math.floor(0.3 * w0.numel()))
        assert torch.equal(w1[~chosen], model.get_submodule(layer).weight.detach()[~chosen])
        bias = pruned.get_submodule(layer).bias
        assert torch.equal(bias, model.get_submodule(layer).bias)  # biases are not pruned


def test_fairquantize_quantizes_exactly_the_lowest_rounding_scores(cnn_case):
    tmp, model = cnn_case
    method = {"name": "fairquantize", "quantize_ratio": 0.4, "beta": 5 / 9,
              "scoring": {"samples_per_group": 48}}
    exp = Experiment(_recipe(tmp, CNN, method), model)
    plan = exp.recipe.method
    processed = exp.apply(plan)
    names = ["0", "4", "6", "8"]
    ref = _reference_hessians(exp, plan, names)
    quantized = exp.model_of(processed)
    for layer in names:
        w = model.get_submodule(layer).weight.detach()
        dq = torch.from_numpy(_np_dequantized(w.numpy()))
        delta = (dq - w).double()
        score = 0.5 * delta**2 * (ref[0][layer] - 5 / 9 * ref[1][layer])
        mask = processed.details["masks"][layer]
        _assert_lowest(mask, score, math.floor(0.4 * w.numel()))
        w1 = quantized.get_submodule(layer).weight.detach()
        assert torch.equal(w1[mask], dq[mask])  # bit for bit: q · scale in float32
        assert torch.equal(w1[~mask], w[~mask])
    # The paper's C.R. counts 8 of 32 bits per quantized weight, of the whole model.
    total = sum(p.numel() for p in model.parameters())
    nq = sum(math.floor(0.4 * model.get_submodule(n).weight.numel()) for n in names)
    cr = plan.implementation.theoretical_cr(plan, model)
    assert cr == pytest.approx(32 * total / (32 * total - 24 * nq), rel=1e-12)


def test_fine_tuned_fairquantize_is_deterministic_and_holds_int8_weights(cnn_case):
    tmp, model = cnn_case
    method = {"name": "fairquantize", "quantize_ratio": 0.3, "layers": ["4", "6"], "steps": 2,
              "finetune_epochs": 1, "finetune": {"lr": 0.01, "batch_size": 32},
              "scoring": {"samples_per_group": 32}}
    runs = []
    for _ in range(2):
        exp = Experiment(_recipe(tmp, CNN, method), model)
        p = exp.apply(exp.recipe.method)
        runs.append((exp.model_of(p).state_dict(), p, exp.evaluate(p, "test").to_dict()))
    (sd_a, pa, ma), (sd_b, _, mb) = runs
    assert pa.details["ran_on"] == "model"  # fine-tuning trains the whole model
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert ma == mb
    # Fine-tuning moved float weights (the trunk's convolution too), never int8 ones.
    assert not torch.equal(sd_a["0.weight"], model.state_dict()["0.weight"])
    for layer in ("4", "6"):
        mask = pa.details["masks"][layer]
        values = pa.details["int8_values"][layer].float()
        scales = pa.details["scales"][layer][:, None]
        assert torch.equal(sd_a[f"{layer}.weight"][mask], (values * scales)[mask])


def test_int8_export_round_trips_to_the_dequantized_pytorch_weights(tmp_path: Path):
    _images(tmp_path / "data.npz")
    torch.manual_seed(1)
    model = _fit(cnn(3, width=96), tmp_path / "data.npz", steps=20)
    method = {"name": "fairquantize", "quantize_ratio": 0.5, "layers": ["6"],
              "scoring": {"samples_per_group": 32}}
    exp = Experiment(_recipe(tmp_path, CNN | {"kwargs": {"width": 96}}, method), model)
    processed = exp.apply(exp.recipe.method)
    res = exp.export(processed, tmp_path / "q.onnx")
    (packed,) = [t for t in res.packing.tensors if t.stored == "packed"]
    assert packed.parameter == "6.weight" and packed.int8 == math.floor(0.5 * 96 * 96)
    proto = onnx.load(tmp_path / "q.onnx")
    sizes = {onnx.TensorProto.INT8: 0, onnx.TensorProto.FLOAT: 0}
    for t in proto.graph.initializer:
        if t.name.startswith("6.weight") and t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    # The int8 entries once, the float ones once (+1 padding entry each, and the scales):
    # no float copy of the quantized entries.
    assert packed.int8 <= sizes[onnx.TensorProto.INT8] <= packed.int8 + 1
    assert sizes[onnx.TensorProto.FLOAT] <= packed.float + 1 + 96
    # ONNX Runtime folds the rebuild at load: the weight it runs is PyTorch's, bit for bit.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    folded = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "folded.onnx")
              .graph.initializer}
    w = exp.model_of(processed).get_submodule("6").weight.detach().numpy()
    assert any(a.shape in (w.shape, w.T.shape) and (np.array_equal(a, w) or
               np.array_equal(a, w.T)) for a in folded.values())
    assert not any(t.op_type in ("BitwiseAnd", "CumSum") for t in
                   onnx.load(tmp_path / "folded.onnx").graph.node)
    assert exp.verify(tmp_path / "q.onnx")  # against the de-quantized model's outputs


# --------------------------------------------------------------------------- compare


ALL_SEVEN = [
    "vanilla", "truncated_svd", "slr_w", "slr_a",
    {"name": "fairprune", "prune_ratio": 0.5, "beta": 3 / 7},
    {"name": "fairquantize", "quantize_ratio": 0.2, "layers": ["4", "6", "8"]},
    "fairlrf",
]  # fmt: skip


def test_compare_over_all_seven_rows_deploys_and_matches_each_method_alone(
    cnn_case, tmp_path, monkeypatch
):
    tmp, _ = cnn_case
    method = {"name": "fairlrf", "layers": [{"layer": "6", "rank": 4, "sr": 0.25}],
              "scoring": {"samples_per_group": 48}}
    recipe = _recipe(tmp, CNN, method, compare=ALL_SEVEN)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    exported: list[str] = []  # the real export, its order recorded
    real_export = Experiment.export
    monkeypatch.setattr(Experiment, "export", lambda self, processed, path, **kw: (
        exported.append(Path(path).parent.name) or real_export(self, processed, path, **kw)))
    result = CliRunner().invoke(
        main,
        ["compare", str(tmp / "ckpt.pt"), "--recipe", str(tmp_path / "r.yaml"), "--out",
         str(tmp_path / "cmp"), "--exports", str(tmp_path / "exports")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    rows = {m["name"]: m for m in report["methods"]}
    assert list(rows) == ["vanilla", "truncated_svd", "slr_w", "slr_a", "fairprune",
                          "fairquantize", "fairlrf"]
    assert "exported and verified: 7 of 7 rows PASSED" in result.output
    # Exported vanilla first, then the packed rows (slowest to verify), then table order.
    assert exported == ["vanilla", "fairprune", "fairquantize", "truncated_svd", "slr_w",
                        "slr_a", "fairlrf"]
    for name, m in rows.items():
        art = m["artifact"]
        assert (tmp_path / "cmp" / art["path"]).is_file() and art["verify"]["passed"]
        assert (tmp_path / "cmp" / name / "model.verify.npz").is_file()
        assert m["compression"]["measured"]["initializer_cr"] > 0
    assert rows["fairprune"]["compression"]["theoretical_cr"] == 1.0
    assert rows["fairprune"]["compression"]["packing"]["measured_initializer_cr"] > 1.0
    # Each row equals its method run alone (a fresh experiment, nothing shared).
    for name, m in rows.items():
        alone = Experiment(tmp_path / "r.yaml", tmp / "ckpt.pt")
        got = alone.evaluate(alone.apply(Plan(**m["plan"])), "test").to_dict()
        assert m["metrics"] == json.loads(json.dumps(got)), name
    # Paired intervals against vanilla and against truncated SVD at the same rank.
    rank = report["bootstrap_rank"]
    assert rank["pairs"]["fairlrf"] == {"baseline": "truncated_svd", "same_ranks": True}
    assert rank["pairs"]["fairprune"]["same_ranks"] is False
    assert set(rank["differences"]) == set(rows) - {"truncated_svd"}
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Paired change against truncated SVD at the same rank" in md
    assert "## Packed weights" in md and "**" in md
    png = (tmp_path / "cmp" / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and report["plot"] == "tradeoff.png"


def test_a_row_that_fails_verification_stops_compare_and_writes_nothing(
    cnn_case, tmp_path, monkeypatch
):
    """Rows are verified in a background thread while the next row exports; a failed one
    still ends the command with its one line, and no run folder is left."""
    tmp, _ = cnn_case
    method = {"name": "fairlrf", "layers": [{"layer": "6", "rank": 4, "sr": 0.25}],
              "scoring": {"samples_per_group": 48}}
    recipe = _recipe(tmp, CNN, method, compare=["vanilla", "truncated_svd", "slr_w", "fairlrf"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    real_verify = Experiment.verify_all  # each runtime of export.verify_runtimes

    def verify_against_shifted_outputs(self, path, **kwargs):
        # A real ONNX Runtime verification of the SLR-w row, against outputs moved by 1.
        if Path(path).parent.name == "slr_w":
            with np.load(Path(path).with_name("model.verify.npz")) as npz:
                arrays = dict(npz)
            arrays["outputs"] = arrays["outputs"] + 1.0
            np.savez(tmp_path / "shifted.npz", **arrays)
            kwargs["reference"] = tmp_path / "shifted.npz"
        return real_verify(self, path, **kwargs)

    monkeypatch.setattr(Experiment, "verify_all", verify_against_shifted_outputs)
    result = CliRunner().invoke(
        main,
        ["compare", str(tmp / "ckpt.pt"), "--recipe", str(tmp_path / "r.yaml"), "--out",
         str(tmp_path / "cmp"), "--exports", str(tmp_path / "exports")],
    )
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "SLR-w" in errors[0] and "does not match PyTorch" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "cmp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_row_whose_reused_graph_computes_something_else_is_exported_again(
    cnn_case, tmp_path, monkeypatch
):
    """A deferred row that fails verification is exported again with every check: a reused
    graph that no longer matches (simulated: the cached graph's first Relu made a Sigmoid)
    fails the parity check there, is traced afresh, and the row verifies."""
    import fairdeploy.commands.compare as compare_module
    import fairdeploy.export._onnx as export_module

    tmp, _ = cnn_case
    method = {"name": "fairprune", "prune_ratio": 0.5, "beta": 3 / 7,
              "scoring": {"samples_per_group": 32}}
    recipe = _recipe(tmp, CNN, method, compare=["vanilla", "fairprune"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    real_skeleton, real_trace = export_module._skeleton, export_module._export_graph
    traces = []

    def stale_skeleton(proto, ready):
        out = real_skeleton(proto, ready)
        if out is not None:
            next(n for n in out.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
        return out

    def counted_trace(*args, **kwargs):
        traces.append(1)
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(export_module, "_skeleton", stale_skeleton)
    monkeypatch.setattr(export_module, "_export_graph", counted_trace)
    monkeypatch.setattr(compare_module, "_IN_FLIGHT_BYTES", 0)  # one row at a time: same result
    said: list[str] = []
    res = run_compare(tmp / "ckpt.pt", tmp_path / "r.yaml", out=tmp_path / "cmp",
                      exports_dir=tmp_path / "exports", progress=False, echo=said.append)
    # vanilla traced; FairPrune reused the stale graph, failed, and was traced again.
    assert len(traces) == 2
    (redo,) = [ln for ln in said if "exporting it again with every check" in ln]
    assert redo.startswith("FairPrune") and "output logits: max |Δ|" in redo, redo
    for name in ("vanilla", "fairprune"):
        entry = next(m for m in res.report["methods"] if m["name"] == name)
        assert entry["artifact"]["verify"]["passed"], name
        assert verify(tmp_path / "cmp" / name / "model.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "cmp" / "fairprune" / "model.onnx").graph.node}
    assert "Sigmoid" not in ops


def test_test_inputs_are_decoded_once_and_returned_as_copies(cnn_case, tmp_path,
                                                              monkeypatch):
    tmp, _ = cnn_case
    method = {"name": "fairlrf", "layers": [{"layer": "6", "rank": 4, "sr": 0.25}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp, CNN, method)))
    exp = Experiment(tmp_path / "r.yaml", tmp / "ckpt.pt")
    exp.prepare()
    test = exp.context.splits["test"]
    reads = []
    real_getitem = type(test).__getitem__
    monkeypatch.setattr(type(test), "__getitem__",
                        lambda self, i: reads.append(i) or real_getitem(self, i))
    x, y, _ = exp.test_inputs(10)
    x[:] = 0.0  # the caller's copy: the next call is not affected
    y[:] = -1
    x2, y2, g2 = exp.test_inputs(10)
    assert reads == list(range(10))
    monkeypatch.undo()
    ref = first_samples(test, 10)
    assert torch.equal(x2, ref[0]) and np.array_equal(y2, ref[1]) and np.array_equal(g2, ref[2])


def test_rank_pairs_match_layers_and_ranks() -> None:
    plans = {
        "vanilla": Plan("vanilla"),
        "truncated_svd": Plan("truncated_svd", [LayerPlan("a", 4)]),
        "truncated_svd-2": Plan("truncated_svd", [LayerPlan("a", 8)]),
        "fairlrf": Plan("fairlrf", [LayerPlan("a", 8, sr=0.5)]),
        "slr_w": Plan("slr_w", [LayerPlan("b", 8, sr=0.5)]),
        "fairprune": Plan("fairprune", prune_ratio=0.5),
    }
    assert rank_pairs(plans) == {
        "vanilla": {"baseline": "truncated_svd", "same_ranks": False},
        "fairlrf": {"baseline": "truncated_svd-2", "same_ranks": True},
        "fairprune": {"baseline": "truncated_svd", "same_ranks": False},
    }
    assert rank_pairs({"vanilla": Plan("vanilla")}) == {}


def test_the_best_fairness_is_bold_in_every_column_that_reaches_it() -> None:
    def entry(name: str, eopp1: float, eopp0: float, eodd: float) -> dict:
        group = {"name": "g", "privileged": False, "precision": 0.5, "recall": 0.5, "f1": 0.5}
        avg = {"avg": 0.5, "diff": 0.0}
        return {"name": name, "label": name, "compression": {}, "metrics": {
            "groups": [group, group | {"privileged": True}], "precision": avg, "recall": avg,
            "f1": avg, "fairness": {"eopp1": eopp1, "eopp0": eopp0, "eodd": eodd}}}

    report = {"methods": [entry("a", 0.0321, 0.05, 0.2), entry("b", 0.0324, 0.04, 0.1),
                          entry("c", 0.04, 0.04, float("nan"))]}
    _, rows = fairness_table(report, bold=True)
    firsts = [r for r in rows if r[0]]
    assert [r[6:9] for r in firsts] == [  # after Method, Group, Accuracy, P, R, F1
        ["**0.032**", "0.050", "0.200"],
        ["**0.032**", "**0.040**", "**0.100**"],
        ["0.040", "**0.040**", "n/a"],
    ]
    assert "**" not in str(fairness_table(report)[1])  # the terminal table has no markup


# --------------------------------------------------------------------------- optimize, recipes


def test_optimize_fairprune_on_the_trunk_ships_a_packed_verified_model(cnn_case, tmp_path):
    tmp, _ = cnn_case
    method = {"name": "fairprune", "prune_ratio": 0.5, "scoring": {"samples_per_group": 32}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp, CNN, method)))
    result = CliRunner().invoke(
        main,
        ["optimize", str(tmp / "ckpt.pt"), "--recipe", str(tmp_path / "r.yaml"), "--out",
         str(tmp_path / "run"), "--exports", str(tmp_path / "exports"), "--no-latency"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    comp = report["methods"][-1]["compression"]
    assert comp["theoretical_cr"] == 1.0 and report["verify"]["passed"]
    assert comp["measured"]["initializer_cr"] > 1.0  # the pruned weights really shrink it
    assert any("cannot serve" in n for n in report["notes"])
    assert "## Packed weights" in (tmp_path / "run" / "report.md").read_text()
    verify = CliRunner().invoke(main, ["verify", str(tmp_path / "run" / "model.onnx")])
    assert verify.exit_code == 0 and "PASSED" in verify.output
    # The pruned weights saved beside it (model.pt) are what the packed ONNX model computes.
    again = CliRunner().invoke(main, [
        "verify", str(tmp_path / "run" / "model.onnx"), "--checkpoint",
        str(tmp_path / "run" / "model.pt"), "--recipe", str(tmp_path / "r.yaml")])
    assert again.exit_code == 0 and "PASSED" in again.output, again.output


def test_dry_run_prints_every_compare_rows_paper_cr(cnn_case, tmp_path):
    tmp, _ = cnn_case
    method = {"name": "fairlrf", "layers": [{"layer": "6", "rank": 4, "sr": 0.25}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp, CNN, method,
                                                            compare=ALL_SEVEN)))
    result = CliRunner().invoke(main, ["optimize", str(tmp / "ckpt.pt"), "--recipe",
                                       str(tmp_path / "r.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("truncated_svd", "slr_w", "slr_a", "fairprune", "fairquantize", "fairlrf"):
        assert any(line.startswith(name + " ") for line in lines), name
    fq = next(line for line in lines if line.startswith("fairquantize "))
    model = cnn(3)
    total = sum(p.numel() for p in model.parameters())
    nq = sum(math.floor(0.2 * model.get_submodule(n).weight.numel()) for n in ("4", "6", "8"))
    assert f"{32 * total / (32 * total - 24 * nq):.3f}×" in fq
    assert "1.000×" in next(line for line in lines if line.startswith("fairprune "))


@pytest.mark.parametrize(
    ("recipe", "classes", "prune", "beta", "quantize", "cr"),
    [("celeba", 2, 0.55, 3 / 7, 0.10, 1.081), ("fitz", 114, 0.35, 1 / 3, 0.20, 1.176)],
)
def test_shipped_recipes_carry_the_papers_baseline_rows(recipe, classes, prune, beta, quantize,
                                                        cr):
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    with torch.device("meta"):
        vgg = build_model("vgg11_paper", classes)
    rows = {p.method: p for p in r.plans}
    fp, fq = rows["fairprune"], rows["fairquantize"]
    assert (fp.prune_ratio, fp.layers, fp.scope) == (prune, "all", "layer")
    assert fp.beta == pytest.approx(beta)
    assert (fq.quantize_ratio, fq.layers, fq.steps, fq.finetune_epochs) == (quantize, "all", 1, 0)
    assert fq.beta == pytest.approx(5 / 9)
    assert fp.implementation.theoretical_cr(fp, vgg) == 1.0
    assert fq.implementation.theoretical_cr(fq, vgg) == pytest.approx(cr, abs=1e-3)
    # The packed file's theory: one mask bit per chosen weight.
    assert fq.implementation.stored_cr(fq, vgg) == pytest.approx(
        32 / (32 - 24 * quantize + 1), abs=2e-3)
    # Compare entries inherit the scoring draw, not FairLRF's feature batch size.
    assert fp.scoring.samples_per_group == r.method.scoring.samples_per_group
    assert fp.scoring.batch_size == 64


def test_compare_entries_take_the_scoring_batch_only_from_a_weight_method(tmp_path):
    from fairdeploy.recipe import parse_recipe

    main_fp = {"name": "fairprune", "prune_ratio": 0.5,
               "scoring": {"batch_size": 16, "samples_per_group": 40, "seed": 3}}
    r = parse_recipe(_recipe(tmp_path, CNN, main_fp,
                             compare=[{"name": "fairquantize", "quantize_ratio": 0.2}]))
    fq = next(p for p in r.plans if p.method == "fairquantize")
    assert (fq.scoring.batch_size, fq.scoring.samples_per_group, fq.scoring.seed) == (16, 40, 3)
    main_lrf = {"name": "fairlrf", "layers": [{"layer": "6", "rank": 4, "sr": 0.25}],
                "scoring": {"batch_size": 512, "samples_per_group": 40, "seed": 3}}
    r = parse_recipe(_recipe(tmp_path, CNN, main_lrf,
                             compare=[{"name": "fairprune", "prune_ratio": 0.5}]))
    fp = next(p for p in r.plans if p.method == "fairprune")
    assert (fp.scoring.batch_size, fp.scoring.samples_per_group, fp.scoring.seed) == (64, 40, 3)
