"""The one structure analysis: the elementwise table against numbers, links on tiny
graphs, and the four readers (feature cut, scoring, export, slr_a) agreeing."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from test_scoring import _autograd_diag
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.export import export_onnx
from fairdeploy.features import split_model
from fairdeploy.lrf import FactorizedLinear, following_activation
from fairdeploy.scoring import HessianApproximationWarning, _prepare_head, hessian_diag
from fairdeploy.structure import (
    ELEMENTWISE_MODULES,
    analyze_structure,
    elementwise_module,
)

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# --------------------------------------------------------------------------- the table

# Every table entry, instantiated (several settings where flags depend on them).
TABLE_MODULES = [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.PReLU(), nn.PReLU(7, init=0.3), nn.RReLU(),
    nn.Hardtanh(), nn.Hardtanh(0.5, 2.0), nn.Threshold(0.1, 20.0), nn.Threshold(-0.5, 3.0),
    nn.Hardshrink(), nn.Softshrink(), nn.Hardsigmoid(), nn.ELU(), nn.CELU(), nn.SELU(),
    nn.GELU(), nn.SiLU(), nn.Mish(), nn.Tanh(), nn.Softsign(), nn.Tanhshrink(),
    nn.Hardswish(), nn.Sigmoid(), nn.Softplus(), nn.LogSigmoid(), nn.Identity(),
    nn.Dropout(0.5), nn.Dropout1d(0.5), nn.Dropout2d(0.5), nn.Dropout3d(0.5),
    nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5),
    nn.BatchNorm1d(7), nn.Flatten(),
]  # fmt: skip


def _prepared(module: nn.Module) -> nn.Module:
    module = module.double().eval()
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-0.5, 0.8, module.num_parameters))
    if isinstance(module, nn.BatchNorm1d):
        g = torch.Generator().manual_seed(0)
        module.running_mean = torch.randn(7, generator=g, dtype=D64)
        module.running_var = torch.rand(7, generator=g, dtype=D64) + 0.5
        with torch.no_grad():
            module.weight.copy_(torch.randn(7, generator=g, dtype=D64))
            module.bias.copy_(torch.randn(7, generator=g, dtype=D64))
    return module


def test_every_table_type_is_exercised():
    assert {type(m) for m in TABLE_MODULES} == set(ELEMENTWISE_MODULES)


@pytest.mark.filterwarnings("ignore:dropout[23]d")
@pytest.mark.parametrize("module", TABLE_MODULES, ids=lambda m: repr(m))
def test_table_flags_match_numbers(module: nn.Module):
    m = _prepared(module)
    entry = elementwise_module(m)
    assert entry is not None
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(400, 7, generator=g, dtype=D64)
    with torch.no_grad():
        y = m(x)
        # Elementwise: column j of the output depends on column j of the input only.
        x2 = x.clone()
        x2[:, 3] += 1.0
        changed = (m(x2) != y).any(0)
        assert changed.nonzero().flatten().tolist() in ([], [3])
        # Identical across features unless it holds one parameter per feature.
        perm = torch.randperm(7, generator=g)
        commutes = torch.allclose(m(x[:, perm]), y[:, perm], rtol=1e-12, atol=1e-12)
        assert commutes == (not entry.feature_params)
        # f(0) = 0, as the table says.
        assert bool((m(torch.zeros(1, 7, dtype=D64)) == 0).all()) == entry.zero_to_zero
        # Piecewise linear: second differences vanish except at the rare kink or jump.
        h = 1e-3
        second = (m(x + h) - 2 * y + m(x - h)).abs() / h**2
        flat = (second < 1e-6).double().mean().item()
    if entry.piecewise_linear:
        assert flat > 0.97, flat
    else:
        assert flat < 0.9, flat


def test_mode_and_settings_decide_membership():
    assert elementwise_module(nn.Dropout().train(), eval_mode=False) is None
    assert elementwise_module(nn.Dropout().train()).kind == "noop"  # judged in eval mode
    assert elementwise_module(nn.BatchNorm1d(4, track_running_stats=False)) is None
    assert elementwise_module(nn.Softmax(-1)) is None  # mixes features
    assert elementwise_module(nn.Linear(2, 2)) is None
    assert elementwise_module(nn.PReLU()).feature_params is False
    assert elementwise_module(nn.PReLU(3)).feature_params is True


class _Between(nn.Module):
    """Linear → fn → Linear, with fn written as a function call in forward."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn(self.a(x)))


ELEMENTWISE_CALLS = {
    "F.relu": lambda h: F.relu(h),
    "torch.relu": lambda h: torch.relu(h),
    "method relu_": lambda h: h.relu_(),
    "F.leaky_relu": lambda h: F.leaky_relu(h, 0.1),
    "F.gelu": lambda h: F.gelu(h),
    "F.selu": lambda h: F.selu(h),
    "F.mish": lambda h: F.mish(h),
    "torch.sigmoid": lambda h: torch.sigmoid(h),
    "F.hardtanh": lambda h: F.hardtanh(h, -2.0, 3.0),
    "F.dropout eval": lambda h: F.dropout(h, 0.5, training=False),
    "h * 2": lambda h: h * 2.0,
    "3 - h": lambda h: 3.0 - h,
    "h / 4": lambda h: h / 4,
    "-h": lambda h: -h,
    "clamp": lambda h: h.clamp(min=0.0),
    "chain": lambda h: torch.tanh(F.relu(h) * 0.5).contiguous(),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE_CALLS))
def test_function_calls_are_steps_with_correct_flags(name: str):
    fn = ELEMENTWISE_CALLS[name]
    model = _Between(fn).double().eval()
    st = analyze_structure(model)
    link = st.following("a")
    assert link.neighbour == "b", link.reason
    assert st.preceding("b").neighbour == "a"
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(300, 6, generator=g, dtype=D64)
    with torch.no_grad():
        np.testing.assert_array_equal(link.apply(x.clone()).numpy(), fn(x.clone()).numpy())
        zero = fn(torch.zeros(1, 6, dtype=D64))
        assert link.zero_to_zero == bool((zero == 0).all())
        h = 1e-3
        second = (fn(x + h) - 2 * fn(x.clone()) + fn(x - h)).abs() / h**2
    assert link.piecewise_linear == bool((second < 1e-6).double().mean() > 0.97)


NOT_ELEMENTWISE = {
    "softmax": (lambda h: h.softmax(-1), "softmax"),
    "square": (lambda h: h * h, "mul"),
    "reciprocal": (lambda h: 1.0 / h, "truediv"),
    "dropout in training": (lambda h: F.dropout(h, 0.5, training=True), "dropout"),
    "view": (lambda h: h.view(-1, 6), "view"),
    "cumsum": (lambda h: h.cumsum(-1), "cumsum"),
}


@pytest.mark.parametrize("name", sorted(NOT_ELEMENTWISE))
def test_other_calls_stop_the_link_with_a_reason(name: str):
    fn, op = NOT_ELEMENTWISE[name]
    st = analyze_structure(_Between(fn))
    link = st.following("a")
    assert link.neighbour is None and f"{op} (" in link.reason and "not elementwise" in link.reason
    assert st.preceding("b").neighbour is None


# --------------------------------------------------------------------------- links


class _FanOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


class _Shared(nn.Module):
    """The first Linear is called twice: its weights cannot be changed for one call."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x) + self.seq[0](x)[:, :3]


class _Rank3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 5), nn.BatchNorm1d(3), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, 4)
        return self.b(self.bn(self.a(x))).mean(1)


def test_links_fan_out_shared_first_last():
    st = analyze_structure(_FanOut())
    out = st.following("a")
    assert out.neighbour is None and "used 2 times (fan-out)" in out.reason
    assert [s.target for s in out.steps] == ["relu"]
    assert st.preceding("b").neighbour is None and "fan-out" in st.preceding("b").reason

    shared = analyze_structure(_Shared())
    assert shared.following("seq.0").neighbour is None
    assert shared.preceding("seq.2").reason == "'seq.0' is called 2 times in forward()"

    seq = analyze_structure(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    first = seq.preceding("0")
    assert first.neighbour is None and first.reason == "its input is the model's input"
    last = seq.following("2")
    assert last.neighbour is None and last.to_output
    assert seq.chain_to_output("0")[1] == "2" and seq.chain_to_output("2") == ((), None)


class _SharedActivation(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_shared_module_with_per_feature_parameters_stops_a_link():
    # On (N, C) rows (the example says so: PReLU's slopes act on axis 1).
    st = analyze_structure(_SharedActivation(nn.PReLU(5)), example_input=torch.randn(3, 4))
    assert st.following("a").neighbour is None
    assert st.following("a").reason == (
        "'act' holds one parameter per feature and is called 2 times in forward()"
    )
    assert st.preceding("c").neighbour is None
    # The same module without per-feature parameters acts identically at both calls.
    shared = analyze_structure(_SharedActivation(nn.PReLU(1)))
    assert shared.following("a").neighbour == "b" and shared.preceding("c").neighbour == "b"


@pytest.mark.parametrize("slopes", [1, 5])
def test_per_feature_prelu_links_on_rows_only(slopes: int) -> None:
    """PReLU with one slope per channel acts on axis 1: the Linear's features on (N, C)
    rows, the tokens on (N, T, C). One slope acts alike on every axis."""
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(slopes), nn.Linear(5, 2))
    rows = analyze_structure(model, example_input=torch.randn(3, 4))
    tokens = analyze_structure(model, example_input=torch.randn(3, 5, 4))
    assert rows.following("0").neighbour == "2"
    if slopes == 1:
        assert tokens.following("0").neighbour == "2"
    else:
        assert tokens.following("0").neighbour is None
        assert "PReLU ('_1') is not elementwise" in tokens.following("0").reason


def test_a_product_of_the_layer_with_itself_is_not_piecewise_linear() -> None:
    """``h * h`` names ``h`` twice: the Gauss–Newton diagonal is not the exact one there,
    so the exact estimator must warn (it counted ``h`` once and called ``mul`` linear)."""

    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(h * h)

    class Scaled(Square):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(h * 3.0)

    assert analyze_structure(Square(), leaves=["fc"]).not_piecewise_linear_after("fc") == ["mul"]
    assert analyze_structure(Scaled(), leaves=["fc"]).not_piecewise_linear_after("fc") == []


def test_rank_dependent_ops_need_a_2d_example():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Flatten(), nn.Linear(5, 2))
    without = analyze_structure(model)
    assert without.following("0").neighbour is None
    assert "BatchNorm1d ('_1') is not elementwise" in without.following("0").reason
    st = analyze_structure(model, example_input=torch.randn(3, 4))
    link = st.following("0")
    assert link.neighbour == "3" and [s.target for s in link.steps] == ["1", "2"]
    assert [s.target for s in link.feature_modules] == ["1"]
    # BatchNorm1d on (N, C, L) normalizes C, not the Linear's feature axis.
    rank3 = analyze_structure(_Rank3(), example_input=torch.randn(2, 3, 4))
    assert rank3.following("a").neighbour is None


def test_untraceable_model_is_a_user_error():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.sum() > 0 else -self.a(x)

    with pytest.raises(FairDeployError, match=r"torch\.fx cannot trace the model"):
        analyze_structure(Branchy())


def test_analysis_restores_modes_and_does_not_copy():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    st = analyze_structure(model)
    assert st.following("0").neighbour == "2"  # dropout judged in eval mode
    assert all(m.training for m in model.modules())
    assert st.following("0").steps[0].module is model[1]


def test_following_activation_reads_the_graph():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.ReLU(), nn.Linear(4, 2))
    assert following_activation(seq, "0") == "2"  # past Dropout
    assert following_activation(seq, "3") is None
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    assert following_activation(bn, "0") is None  # BatchNorm comes first
    assert following_activation(_Between(F.relu), "a") is None  # no module to hook
    assert following_activation(_FanOut(), "a") is None

    class Custom(nn.Module):  # not a Sequential: the graph still shows what follows
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.fc(x)))

    assert following_activation(Custom(), "fc") == "act"
    with pytest.raises(FairDeployError, match="'nope' is not a module"):
        following_activation(seq, "nope")


# ------------------------------------------------------------- the four readers agree


def _fact(din, dout, k, rows, cols, keep, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    f = FactorizedLinear(
        torch.randn(din, k, generator=g, dtype=dtype),
        torch.rand(k, generator=g, dtype=dtype) + 0.5,
        torch.randn(k, dout, generator=g, dtype=dtype),
        torch.randn(dout, generator=g, dtype=dtype),
    )
    with torch.no_grad():
        f.U[list(rows), keep:] = 0
        f.V[keep:, list(cols)] = 0
    f.sparse_rows, f.sparse_cols, f.keep = torch.tensor(rows), torch.tensor(cols), keep
    return f


ACTIVATIONS = {
    "Mish": (lambda n: nn.Mish(), False),
    "SELU": (lambda n: nn.SELU(), False),
    "GELU": (lambda n: nn.GELU(), False),
    "PReLU": (lambda n: nn.PReLU(init=0.2), True),
    "PReLU per feature": (lambda n: nn.PReLU(n, init=0.2), True),
}


def _head_model(act, dtype=torch.float32):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(10, 12),
        act(12),
        _fact(12, 9, 4, [1, 5, 7], [0, 3, 8], 2, seed=4, dtype=dtype),
        act(9),
        nn.Linear(9, 3),
    ).to(dtype).eval()
    if isinstance(model[1], nn.PReLU) and model[1].num_parameters > 1:
        with torch.no_grad():  # distinct per-feature slopes, so a wrong order would show
            model[1].weight.copy_(torch.linspace(-0.5, 0.8, 12))
            model[3].weight.copy_(torch.linspace(0.9, -0.3, 9))
    return model


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_four_readers_agree(name: str, tmp_path):
    act, pl = ACTIVATIONS[name]
    model = _head_model(act)
    x = torch.randn(40, 10)

    # 1. Feature cut: the factorized layer's input is the only value crossing the cut.
    trunk, head = split_model(model, "2")
    torch.testing.assert_close(head(trunk(x)), model(x))

    # 2. Scoring: elementwise → Linear is the fast path; the approximation warning
    # appears exactly for the activations that are not piecewise linear.
    trunk64, h64 = split_model(_head_model(act, D64), "2")
    head64 = _head_model(act, D64)
    feats = trunk64(x.double())
    y = torch.randint(0, 3, (40,))
    prepared = _prepare_head(h64, "2", feats[:4])
    assert prepared.chain is not None
    assert [type(s.module).__name__ for s in prepared.chain[0]] == [type(head64[3]).__name__]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = hessian_diag(h64, "2", feats, y, batch_size=16)
    warned = [w for w in caught if issubclass(w.category, HessianApproximationWarning)]
    assert bool(warned) == (not pl)
    if warned:
        assert type(head64[3]).__name__ in str(warned[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HessianApproximationWarning)
        generic = hessian_diag(h64, "2", feats, y, batch_size=16, fast=False)
    for key in ("U", "V"):
        torch.testing.assert_close(fast[key], generic[key], rtol=1e-9, atol=1e-14)

    # 3. Export: both permutations fold into the neighbouring Linears (no Gather).
    res = export_onnx(model, x[:4], tmp_path / "m.onnx")
    lay = res.layers[0]
    assert (lay.input_perm, lay.output_perm) == ("folded:0", "folded:4")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Gather" not in ops
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0],
                               model(x).detach().numpy(), rtol=1e-4, atol=1e-5)

    # 4. slr_a: the activation after each layer.
    assert following_activation(model, "0") == "1"
    assert following_activation(model, "2") == "3"


def test_non_plain_heads_are_handled_as_before(tmp_path):
    """A shared first Linear (called twice): no fold, no fast path; still exact."""
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(6, 12)
            self.seq = nn.Sequential(
                nn.ReLU(), _fact(12, 9, 4, [2, 3], [1], 1, seed=1), nn.ReLU(), nn.Linear(9, 3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.pre(x)
            return self.seq(h) + self.pre(x)[:, :3]

    model = Shared().eval()
    x = torch.randn(20, 6)
    res = export_onnx(model, x[:2], tmp_path / "s.onnx")
    assert res.layers[0].input_perm == "gather"  # 'pre' cannot take a permutation
    assert res.layers[0].output_perm == "folded:seq.3"
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0],
                               model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    prepared = _prepare_head(model, "seq.1", x[:4])
    assert prepared.chain is None  # the logits add a second path: generic VJPs


def test_untraceable_head_scores_on_the_generic_path_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fl = _fact(6, 5, 3, [], [], 3, seed=0, dtype=D64)
            self.out = nn.Linear(5, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fl(x))
            return self.out(h) if h.shape[0] > 0 and x.sum() > -1e9 else self.out(-h)

    head = Branchy()
    x = torch.randn(11, 6, dtype=D64)
    y = torch.randint(0, 3, (11,))
    with pytest.warns(HessianApproximationWarning, match="what follows it is unknown"):
        got = hessian_diag(head, "fl", x, y)
    ref = _autograd_diag(head, "fl", x, y)  # ReLU and Linear after it: GGN = Hessian
    for key in ("U", "V"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-12)
