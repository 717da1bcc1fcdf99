"""Dead-neuron elimination at export: exact against the un-eliminated model, counted
against hand counts, and the shape-only count against what the ONNX file stores."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from _tiny_nets import rows_and_vanilla
from test_export import initializers, make_factorized, mlp_with, ort_run
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export import ExportOptions, deployed_params, export_onnx, read_metadata
from fairdeploy.lrf import FactorizedLinear


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _exact(path, model, x, atol=2e-5):
    """ONNX Runtime on the eliminated graph equals PyTorch on the original model."""
    got = ort_run(path, x)
    ref = model(x).detach().numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol)


def _stored(path) -> int:
    m = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


def _shape_only(model, x, **kw):
    vanilla, rows = rows_and_vanilla(model)
    return deployed_params(vanilla, rows, example_input=x[:2], **kw)


@pytest.mark.parametrize("layout", ["blocks", "zeros"])
def test_elimination_is_exact_and_removes_neighbour_neurons(tmp_path, layout):
    rows, cols = [1, 5, 7], [0, 3, 8, 2]
    fact = make_factorized(12, 9, 4, rows, cols, 0)
    model = mlp_with(fact)  # Linear(10,12) ReLU Dropout fact ReLU Linear(9,3)
    x = torch.randn(64, 10)
    res = export_onnx(model, x[:4], tmp_path / "e.onnx",
                      options=ExportOptions(eliminate_dead=True, sparse_layout=layout))
    _exact(tmp_path / "e.onnx", model, x)
    inits, ops = initializers(tmp_path / "e.onnx")
    # FC before: 3 output neurons gone; factors: dead rows/cols gone; FC after: 4 inputs gone.
    assert inits["0.weight"] == (9, 10) and inits["0.bias"] == (9,)
    assert inits["3.u"] == (9, 4) and inits["3.v"] == (4, 5) and inits["3.bias"] == (5,)
    assert inits["5.weight"] == (3, 5) and inits["5.bias"] == (3,)
    assert ops == Counter({"Gemm": 2, "Relu": 2, "MatMul": 2, "Add": 1})  # no Slice/Concat
    lay = res.layers[0]
    assert (lay.eliminated_inputs, lay.eliminated_outputs) == (3, 4)
    assert (lay.input_elimination, lay.output_elimination) == ("removed:0", "removed:5")
    assert (lay.input_perm, lay.output_perm) == ("none", "none")
    # By hand: 9·10 + 9  +  9·4 + 4·5 + 5  +  3·5 + 3 = 178; vanilla 12·10+12 + 12·9+9 + 9·3+3.
    assert res.deployed_params == res.stored_elements == _stored(tmp_path / "e.onnx") == 178
    assert res.vanilla_params == 132 + 117 + 30
    assert res.deployed_cr == pytest.approx(279 / 178)
    shape = _shape_only(model, x, sparse_layout=layout)
    assert shape.exact and shape.params == 178 and shape.vanilla_params == 279
    meta = read_metadata(tmp_path / "e.onnx")
    assert meta["sparse_layout"] == layout
    assert meta["deployed"] == {"vanilla_params": 279, "deployed_params": 178,
                                "deployed_cr": pytest.approx(279 / 178),
                                "stored_float_elements": 178, "eliminate_dead": True}
    assert meta["layers"][0]["eliminated_outputs"] == 4


def test_batchnorm_and_per_feature_prelu_between_are_sliced(tmp_path):
    torch.manual_seed(0)
    fact = make_factorized(12, 9, 4, [0, 4, 11], [2, 6], 0, seed=3)
    model = nn.Sequential(
        nn.Linear(10, 12), nn.BatchNorm1d(12), nn.PReLU(12), nn.Dropout(0.2), fact,
        nn.BatchNorm1d(9), nn.PReLU(9), nn.Linear(9, 3),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model[1], model[5]):
            n = bn.num_features
            bn.running_mean = torch.randn(n, generator=g)
            bn.running_var = torch.rand(n, generator=g) + 0.5
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
        model[2].weight.copy_(torch.linspace(-0.4, 0.9, 12))
        model[6].weight.copy_(torch.linspace(0.7, -0.2, 9))
    model.eval()
    x = torch.randn(64, 10)
    # Exact with either exporter; the names and op counts below are the TorchScript
    # graph's (the dynamo optimizer folds a BatchNorm after a Linear into its Gemm and
    # turns PReLU slopes into anonymous constants).
    export_onnx(model, x[:4], tmp_path / "bn-dynamo.onnx",
                options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "bn-dynamo.onnx", model, x)
    res = export_onnx(model, x[:4], tmp_path / "bn.onnx",
                      options=ExportOptions(eliminate_dead=True, exporter="torchscript"))
    _exact(tmp_path / "bn.onnx", model, x)
    lay = res.layers[0]
    assert (lay.input_elimination, lay.output_elimination) == ("removed:0", "removed:7")
    inits, ops = initializers(tmp_path / "bn.onnx")
    assert inits["1.weight"] == (9,) and inits["2.weight"] == (9,)
    assert inits["5.weight"] == (7,) and inits["6.weight"] == (7,)
    assert ops["BatchNormalization"] == 2
    # Parameters: the shape-only count; ONNX also stores the running statistics.
    shape = _shape_only(model, x)
    assert shape.exact and res.deployed_params == shape.params
    assert shape.ratio == pytest.approx(res.deployed_cr)
    assert res.stored_elements == _stored(tmp_path / "bn.onnx") == shape.params + 2 * (9 + 7)
    # Without an example the BatchNorm cannot be proved elementwise: nothing is removed.
    vanilla, rows = rows_and_vanilla(model)
    blind = deployed_params(vanilla, rows)
    assert blind.layers[0].input_elimination.startswith("dropped at input: BatchNorm1d")
    assert blind.layers[0].output_elimination.startswith("refused: BatchNorm1d")


@pytest.mark.parametrize(("rows", "op"), [([9, 10, 11], "Slice"), ([0, 5, 11], "Gather")])
def test_first_layer_keeps_the_model_input(tmp_path, rows, op):
    fact = make_factorized(12, 9, 4, rows, [1, 2], 0, seed=5)
    torch.manual_seed(2)
    model = nn.Sequential(fact, nn.ReLU(), nn.Linear(9, 3)).eval()
    x = torch.randn(50, 12)
    res = export_onnx(model, x[:4], tmp_path / "f.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "f.onnx", model, x)
    lay = res.layers[0]
    assert lay.input_elimination == "dropped at input: its input is the model's input"
    assert lay.output_elimination == "removed:2"
    assert (lay.eliminated_inputs, lay.eliminated_outputs) == (3, 2)
    proto = onnx.load(str(tmp_path / "f.onnx"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 12  # the model's input signature is unchanged
    inits, ops = initializers(tmp_path / "f.onnx")
    assert inits["0.u"] == (9, 4) and inits["2.weight"] == (3, 7)
    assert ops[op] == 1 and ops["Concat"] == 0
    shape = _shape_only(model, x)
    assert shape.params == res.deployed_params == _stored(tmp_path / "f.onnx")
    assert shape.layers[0].input_elimination == lay.input_elimination


def test_last_layer_keeps_the_logits(tmp_path):
    fact = make_factorized(12, 6, 3, [3, 4], [0, 5], 0, seed=6)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), fact).eval()
    x = torch.randn(50, 8)
    res = export_onnx(model, x[:4], tmp_path / "l.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "l.onnx", model, x)
    lay = res.layers[0]
    assert lay.input_elimination == "removed:0"
    assert lay.output_elimination == "refused: it feeds the model's output"
    assert lay.eliminated_outputs == 0 and lay.output_perm == "gather"
    assert ort_run(tmp_path / "l.onnx", x).shape == (50, 6)
    assert _shape_only(model, x).params == res.deployed_params == _stored(tmp_path / "l.onnx")


class _Cumsum(nn.Module):
    """Something that is not elementwise between the factorized layer and the next."""

    def __init__(self, fact: FactorizedLinear) -> None:
        super().__init__()
        self.pre, self.fact, self.out = nn.Linear(6, 12), fact, nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fact(torch.relu(self.pre(x)))).cumsum(-1))


class _FanOut(nn.Module):
    def __init__(self, fact: FactorizedLinear) -> None:
        super().__init__()
        self.pre, self.fact, self.out = nn.Linear(6, 12), fact, nn.Linear(9, 3)
        self.side = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        return self.out(torch.relu(self.fact(h))) + self.side(h)


@pytest.mark.parametrize(
    ("build", "why_in", "why_out"),
    [
        (_Cumsum, None, "cumsum ('cumsum') is not elementwise"),
        (_FanOut, "the result of relu ('relu') is used 2 times (fan-out)", None),
    ],
)
def test_refusal_is_a_reason_not_an_error(tmp_path, build, why_in, why_out):
    torch.manual_seed(4)
    model = build(make_factorized(12, 9, 4, [2, 3, 8], [0, 4, 5], 0, seed=7)).eval()
    x = torch.randn(40, 6)
    res = export_onnx(model, x[:4], tmp_path / "r.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "r.onnx", model, x)
    lay = res.layers[0]
    if why_in:
        assert lay.input_elimination == f"dropped at input: {why_in}"
    else:
        assert lay.input_elimination == "removed:pre"
    if why_out:
        assert lay.output_elimination == f"refused: {why_out}"
    else:
        assert lay.output_elimination == "removed:out"
    assert _shape_only(model, x).params == res.deployed_params == _stored(tmp_path / "r.onnx")


@pytest.mark.parametrize(("act", "bias_created"), [(nn.ReLU, False), (nn.Sigmoid, True)])
def test_zero_constants_need_no_bias(tmp_path, act, bias_created):
    """A factorized layer without bias outputs exactly 0 on a dead column: through ReLU
    that stays 0 (no bias needed next), through Sigmoid it is 0.5 (a bias is created)."""
    fact = make_factorized(10, 8, 3, [1, 2], [3, 6], 0, bias=False, seed=8)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), fact, act(),
                          nn.Linear(8, 2, bias=False)).eval()
    x = torch.randn(40, 5)
    res = export_onnx(model, x[:4], tmp_path / "z.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "z.onnx", model, x)
    inits, _ = initializers(tmp_path / "z.onnx")
    assert ("4.bias" in inits) == bias_created
    # Without a bias the exporter stores the weight transposed for a MatMul.
    assert inits.get("4.weight", (2, 6)) == (2, 6) and (8, 2) not in inits.values()
    assert (2, 6) in inits.values() or (6, 2) in inits.values()
    assert _shape_only(model, x).params == res.deployed_params == _stored(tmp_path / "z.onnx")


def _adjacent(rows_b: list[int], cols_a: list[int], keep_a: int = 0) -> nn.Module:
    torch.manual_seed(6)
    a = make_factorized(10, 12, 4, [0, 1], cols_a, keep_a, seed=9)
    b = make_factorized(12, 8, 3, rows_b, [2, 5], 0, seed=10)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), a, nn.ReLU(), b, nn.ReLU(),
                         nn.Linear(8, 3)).eval()


@pytest.mark.parametrize(
    ("rows_b", "cols_a", "bound"),
    [([0, 1, 2, 3], [4, 5, 6, 7], "params_min"),  # disjoint: the union is largest
     ([0, 1, 2, 3], [0, 1, 2, 3], "params"),  # the same features: the union is smallest
     ([0, 1, 2, 3], [2, 3, 9, 10], None)],
)
def test_adjacent_factorized_layers_remove_the_union(tmp_path, rows_b, cols_a, bound):
    model = _adjacent(rows_b, cols_a)
    x = torch.randn(40, 6)
    res = export_onnx(model, x[:4], tmp_path / "a.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "a.onnx", model, x)
    lay = {r.layer: r for r in res.layers}
    union = len(set(rows_b) | set(cols_a))
    assert lay["2"].output_elimination == "removed:4" and lay["2"].eliminated_outputs == union
    assert lay["4"].input_elimination == "removed:2" and lay["4"].eliminated_inputs == union
    inits, _ = initializers(tmp_path / "a.onnx")
    assert inits["2.v"] == (4, 12 - union) and inits["4.u"] == (12 - union, 3)
    # Which rows/columns were chosen decides the count: the shapes give its range.
    shape = _shape_only(model, x)
    assert not shape.exact
    assert shape.params_min <= res.deployed_params <= shape.params
    assert res.deployed_params == _stored(tmp_path / "a.onnx")
    assert shape.layers[0].eliminated_outputs_range == (4, 8)
    if bound:
        assert res.deployed_params == getattr(shape, bound)


def test_elimination_composes_with_permutation_folding(tmp_path):
    """A keeps part of its sparsified columns (rr > 0): only B's dead rows go from A's
    outputs, and A's column permutation then folds into B, whose input order is free."""
    model = _adjacent([0, 1, 2, 3], [2, 3, 9, 10], keep_a=2)
    x = torch.randn(40, 6)
    res = export_onnx(model, x[:4], tmp_path / "c.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "c.onnx", model, x)
    lay = {r.layer: r for r in res.layers}
    assert lay["2"].output_elimination == "removed:4" and lay["2"].eliminated_outputs == 4
    assert lay["2"].output_perm == "folded:4" and lay["2"].input_perm == "folded:0"
    inits, ops = initializers(tmp_path / "c.onnx")
    # A's sparse columns left after removal: 9 and 10 (2 and 3 went with B's dead rows).
    assert inits["2.v_head"] == (2, 2) and inits["2.v_kept"] == (4, 6)
    assert "Gather" not in ops
    shape = _shape_only(model, x)
    assert shape.params_min <= res.deployed_params <= shape.params


def test_partial_rows_make_elimination_a_no_op(tmp_path):
    fact = make_factorized(12, 9, 4, [1, 5, 7], [0, 3, 8, 2], 2)
    model = mlp_with(fact)
    x = torch.randn(20, 10)
    on = export_onnx(model, x[:4], tmp_path / "on.onnx", options=ExportOptions(eliminate_dead=True))
    off = export_onnx(model, x[:4], tmp_path / "off.onnx")
    assert initializers(tmp_path / "on.onnx") == initializers(tmp_path / "off.onnx")
    assert (on.layers[0].input_elimination, on.layers[0].output_elimination) == ("none", "none")
    assert (off.layers[0].input_elimination, off.layers[0].output_elimination) == ("off", "off")
    assert on.deployed_params == off.deployed_params == _shape_only(model, x).params


def test_every_row_sparsified_is_refused_not_emptied(tmp_path):
    fact = make_factorized(6, 5, 2, range(6), [1], 0, seed=11)
    model = mlp_with(fact, din=4)
    x = torch.randn(10, 4)
    res = export_onnx(model, x[:2], tmp_path / "all.onnx",
                      options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "all.onnx", model, x)
    assert res.layers[0].input_elimination == (
        "refused: every input feature is sparsified (sr = 1)"
    )
    assert _shape_only(model, x).params == res.deployed_params


def test_vgg11_paper_fitzpatrick_setting_from_shapes():
    """DESIGN §4: FC-2 k=64, sr 0.4, rr 0 on vgg11_paper (114 classes): paper C.R. 1.570,
    deployed ≈ 2.144 — FC-1 loses 1,638 outputs, FC-3 1,638 inputs."""
    from fairdeploy import LayerPlan, Plan
    from fairdeploy.compression import layer_table, theoretical_cr
    from fairdeploy.models import build_model

    with torch.device("meta"):
        model = build_model("vgg11_paper", 114)
    plan = Plan("fairlrf", layers=(LayerPlan("classifier.3", 64, 0.4, 0.0, 5 / 9),))
    rows = layer_table(model, plan)
    got = deployed_params(model, rows, example_input=torch.empty(1, 3, 112, 112, device="meta"))
    # By hand: 1,638 = ⌊0.4·4096⌋ dead on each side of FC-2.
    conv = sum(p.numel() for p in model.features.parameters())
    dead, live = 1638, 4096 - 1638
    fc1 = live * 4608 + live
    fc2 = live * 64 + 64 * live + live
    fc3 = 114 * live + 114
    assert got.vanilla_params == conv + 4608 * 4096 + 4096 + 4096 * 4096 + 4096 + 114 * 4097
    assert got.exact and got.params == conv + fc1 + fc2 + fc3
    assert round(theoretical_cr(model, plan), 3) == 1.570
    assert round(got.ratio, 3) == 2.144
    assert got.layers[0].eliminated_inputs_range == (dead, dead)
    off = deployed_params(model, rows, eliminate=False)
    assert off.params == got.vanilla_params - (4096 * 4096 - 64 * 8192 + 2 * dead * 64)
    zeros = deployed_params(model, rows, eliminate=False, sparse_layout="zeros")
    assert zeros.params == got.vanilla_params - (4096 * 4096 - 64 * 8192)


def test_bad_options_and_rows_are_user_errors(tmp_path):
    model = mlp_with(make_factorized(12, 9, 4))
    with pytest.raises(FairDeployError, match="sparse_layout='sparse' is not allowed"):
        export_onnx(model, torch.randn(2, 10), tmp_path / "m.onnx",
                    options=ExportOptions(sparse_layout="sparse"))
    vanilla, rows = rows_and_vanilla(model)
    with pytest.raises(FairDeployError, match="sparse_layout='dense' is not allowed"):
        deployed_params(vanilla, rows, sparse_layout="dense")
    with pytest.raises(FairDeployError, match="lacks keep"):
        deployed_params(vanilla, [{k: v for k, v in rows[0].items() if k != "keep"}])
    with pytest.raises(FairDeployError, match=r"'9' is not an nn\.Linear"):
        deployed_params(vanilla, [{**rows[0], "name": "9"}])
    with pytest.raises(FairDeployError, match="its row says din=7"):
        deployed_params(vanilla, [{**rows[0], "din": 7}])


def test_vanilla_export_is_unchanged_by_the_options(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = export_onnx(model, torch.randn(3, 6), tmp_path / "v.onnx",
                          options=ExportOptions(eliminate_dead=True, sparse_layout="zeros"))
    assert res.layers == [] and res.deployed_params == res.vanilla_params == 6 * 8 + 8 + 18
    assert res.stored_elements == res.deployed_params and res.deployed_cr == 1.0


@pytest.mark.parametrize(
    ("rows_b", "cols_a"),
    [(list(range(6)), list(range(6, 12))),  # the union is the width, disjoint halves
     (list(range(8)), list(range(4, 12))),  # the union is the width, overlapping
     (list(range(11)), list(range(1, 12))),  # the union is the width, one side nearly all
     (list(range(6)), list(range(6, 11))),  # neighbour: one feature left between
     (list(range(5)), list(range(6, 11)))],  # neighbour: two features left between
)
def test_union_up_to_the_width_exports_exactly(tmp_path, rows_b, cols_a):
    """Issue 19 item 6: when B's dead rows and A's constant columns cover every feature
    between them, the junction is refused (nothing may empty it) and B drops its dead
    inputs itself; A's full-width column permutation then folds into B's input selection,
    not into B's already narrowed U (it crashed with an IndexError)."""
    model = _adjacent(rows_b, cols_a)
    x = torch.randn(40, 6)
    res = export_onnx(model, x[:4], tmp_path / "u.onnx",
                      options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "u.onnx", model, x)
    lay = {r.layer: r for r in res.layers}
    union = len(set(rows_b) | set(cols_a))
    if union == 12:
        assert lay["2"].output_elimination.startswith("refused: it would remove all 12")
        assert lay["4"].input_elimination.startswith("dropped at input")
        assert lay["4"].eliminated_inputs == len(rows_b)
        assert lay["2"].output_perm == "folded:4"
    else:
        assert lay["2"].output_elimination == "removed:4"
        assert lay["2"].eliminated_outputs == lay["4"].eliminated_inputs == union
    assert res.deployed_params == _stored(tmp_path / "u.onnx")
    shape = _shape_only(model, x)
    assert shape.params_min <= res.deployed_params <= shape.params


@pytest.mark.parametrize("sr", [0.97, 0.9])
def test_slr_w_on_both_layers_of_the_mlp_exports(tmp_path, sr):
    """The reported case: SLR-w, rr 0, on ``layers.0`` and ``layers.2`` of the tests'
    MLP (8 → 32 → 32 → 3); at sr 0.97 the two selections cover every feature between."""
    from fairdeploy.lrf import SelectionInputs, factorize, select_rows_cols, sparsify
    from fairdeploy.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", 3, in_features=8, widths=(32, 32)).eval()
    out = copy.deepcopy(model)
    chosen = {}
    for name in ("layers.0", "layers.2"):
        lin = model.get_submodule(name)
        f = factorize(lin, 4)
        rows, cols = select_rows_cols("slr_w", f, sr=sr, rr=0.0,
                                      inputs=SelectionInputs(weight=lin.weight.detach()))
        out.set_submodule(name, sparsify(f, sr, 0.0, rows, cols))
        chosen[name] = (rows, cols)
    union = set(chosen["layers.0"][1].tolist()) | set(chosen["layers.2"][0].tolist())
    x = torch.randn(30, 8)
    res = export_onnx(out, x[:4], tmp_path / "m.onnx", options=ExportOptions(eliminate_dead=True))
    _exact(tmp_path / "m.onnx", out, x)
    assert res.deployed_params == _stored(tmp_path / "m.onnx")
    assert (len(union) == 32) == (sr == 0.97)  # 31 + 31 of 32 cover them all here
    if len(union) == 32:
        assert res.layers[0].output_elimination.startswith("refused: it would remove all 32")
    else:
        assert res.layers[0].output_elimination == "removed:layers.2"
