"""Selection strategies: scores against brute force, argmin selection, registry, inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import (
    FactorizedLinear,
    SelectionInputs,
    activation_abs_sums,
    factorize,
    following_activation,
    list_strategies,
    register_strategy,
    select_rows_cols,
    sparsify,
    strategy_scores,
)
from fairdeploy.lrf._selection import _STRATEGIES
from fairdeploy.models import build_model

DIN, DOUT, K = 8, 6, 3


@pytest.fixture
def layer() -> tuple[nn.Linear, FactorizedLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(DIN, DOUT)
    return lin, factorize(lin, K, solver="full")


def _inputs(lin: nn.Linear, beta: float = 0.5, row_score: str = "removed") -> SelectionInputs:
    g = torch.Generator().manual_seed(1)
    return SelectionInputs(
        weight=lin.weight.detach(),
        input_abs_sum=torch.rand(DIN, generator=g),
        output_abs_sum=torch.rand(DOUT, generator=g),
        hessians={
            c: {"U": torch.rand(DIN, K, generator=g), "V": torch.rand(K, DOUT, generator=g)}
            for c in (0, 1)
        },
        beta=beta,
        row_score=row_score,
    )


def test_builtin_strategies_are_registered() -> None:
    assert {"slr_w", "slr_a", "fairlrf"} <= set(list_strategies())


@pytest.mark.parametrize("strategy", list_strategies())
@pytest.mark.parametrize(("sr", "rr"), [(0.0, 0.0), (0.4, 0.5), (0.5, 0.0), (1.0, 0.25)])
def test_selection_is_the_lowest_scoring_set(strategy: str, sr: float, rr: float, layer) -> None:
    lin, f = layer
    inputs = _inputs(lin)
    rows, cols = select_rows_cols(strategy, f, sr=sr, rr=rr, inputs=inputs)
    row_scores, col_scores = strategy_scores(strategy, f, rr=rr, inputs=inputs)
    for idx, scores, dim in ((rows, row_scores, DIN), (cols, col_scores, DOUT)):
        n = int(sr * dim)
        assert idx.dtype == torch.long and idx.tolist() == sorted(set(idx.tolist()))
        assert len(idx) == n
        # Brute force: of all n-subsets, the selected one has the smallest total score.
        best = min(itertools.combinations(range(dim), n), key=lambda s: sum(scores[list(s)]))
        assert float(scores[idx].sum()) == pytest.approx(float(scores[list(best)].sum()))
    # Deterministic, and usable by sparsify as is.
    again = select_rows_cols(strategy, f, sr=sr, rr=rr, inputs=inputs)
    assert torch.equal(again[0], rows) and torch.equal(again[1], cols)
    sparsify(f, sr, rr, rows, cols)


@pytest.mark.parametrize("strategy", list_strategies())
def test_missing_input_names_the_field(strategy: str, layer) -> None:
    with pytest.raises(FairDeployError, match=rf"'{strategy}' needs SelectionInputs\.\w+"):
        select_rows_cols(strategy, layer[1], sr=0.5, rr=0.0, inputs=SelectionInputs())


def test_unknown_strategy() -> None:
    with pytest.raises(FairDeployError, match="'magnitude' is unknown: use one of fairlrf"):
        select_rows_cols("magnitude", None, sr=0.5, rr=0.0, inputs=SelectionInputs())  # type: ignore[arg-type]


def test_selection_needs_a_factorized_layer() -> None:
    lin = nn.Linear(3, 2)
    with pytest.raises(FairDeployError, match=r"needs a FactorizedLinear.*got Linear"):
        select_rows_cols("slr_w", lin, sr=0.5, rr=0.0, inputs=SelectionInputs())  # type: ignore[arg-type]


def test_ties_go_to_the_lower_index(layer) -> None:
    f = layer[1]
    inputs = SelectionInputs(weight=torch.zeros(DOUT, DIN))
    rows, cols = select_rows_cols("slr_w", f, sr=0.5, rr=0.0, inputs=inputs)
    assert rows.tolist() == [0, 1, 2, 3] and cols.tolist() == [0, 1, 2]


def test_slr_w_scores_by_hand(layer) -> None:
    lin, f = layer
    W = lin.weight.detach().double()
    Wt = W.T  # Din × Dout: row i of Wᵀ is input node i
    rows, cols = strategy_scores("slr_w", f, rr=0.5, inputs=_inputs(lin))
    for i in range(DIN):
        assert float(rows[i]) == pytest.approx(sum(abs(float(Wt[i, j])) for j in range(DOUT)))
    for j in range(DOUT):
        assert float(cols[j]) == pytest.approx(sum(abs(float(Wt[i, j])) for i in range(DIN)))


def test_slr_a_scores_are_the_activation_sums(layer) -> None:
    lin, f = layer
    inputs = _inputs(lin)
    rows, cols = strategy_scores("slr_a", f, rr=0.0, inputs=inputs)
    assert torch.equal(rows, inputs.input_abs_sum.double())
    assert torch.equal(cols, inputs.output_abs_sum.double())


def test_shape_mismatch_is_reported(layer) -> None:
    with pytest.raises(FairDeployError, match=r"weight has shape \(8, 6\), expected \(6, 8\)"):
        strategy_scores("slr_w", layer[1], rr=0.0, inputs=SelectionInputs(weight=torch.ones(8, 6)))


# --- fairlrf: the Taylor estimate ΔE0 − βΔE1 of exactly the removal ---------------------


@pytest.mark.parametrize("rr", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("beta", [0.0, 5 / 9, 2.0])
def test_fairlrf_scores_equal_loss_change_of_the_removal(rr: float, beta: float, layer) -> None:
    """Group losses quadratic around the current U, V, with Hessians from autograd.

    For ``E_c(U, V) = ½ Σ a_c (U − U*)² + ½ Σ b_c (V − V*)²`` the gradient at (U*, V*)
    is zero and the second-order Taylor expansion is exact, so a row's score must equal
    ``E_0(removed) − E_0 − β (E_1(removed) − E_1)`` computed by evaluating the losses.
    """
    _, f = layer
    U0, V0 = f.U.detach().double(), f.V.detach().double()
    g = torch.Generator().manual_seed(5)
    coef = {c: (torch.rand(DIN, K, generator=g), torch.rand(K, DOUT, generator=g)) for c in (0, 1)}

    def loss(c: int, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        a, b = coef[c]
        return 0.5 * (a * (U - U0) ** 2).sum() + 0.5 * (b * (V - V0) ** 2).sum()

    hessian = torch.autograd.functional.hessian
    hessians = {}
    for c in (0, 1):
        hU = hessian(lambda u, c=c: loss(c, u.view(DIN, K), V0), U0.flatten())
        hV = hessian(lambda v, c=c: loss(c, U0, v.view(K, DOUT)), V0.flatten())
        hessians[c] = {"U": hU.diagonal().view(DIN, K), "V": hV.diagonal().view(K, DOUT)}
    inputs = SelectionInputs(hessians=hessians, beta=beta)
    rows, cols = strategy_scores("fairlrf", f, rr=rr, inputs=inputs)

    keep = int(rr * K)
    for i in range(DIN):
        U = U0.clone()
        U[i, keep:] = 0
        dE = [float(loss(c, U, V0) - loss(c, U0, V0)) for c in (0, 1)]
        assert float(rows[i]) == pytest.approx(dE[0] - beta * dE[1], abs=1e-12)
    for j in range(DOUT):
        V = V0.clone()
        V[keep:, j] = 0
        dE = [float(loss(c, U0, V) - loss(c, U0, V0)) for c in (0, 1)]
        assert float(cols[j]) == pytest.approx(dE[0] - beta * dE[1], abs=1e-12)


def test_fairlrf_full_row_score_sums_every_entry(layer) -> None:
    lin, f = layer
    inp = _inputs(lin, beta=0.3, row_score="full")
    rows, cols = strategy_scores("fairlrf", f, rr=0.5, inputs=inp)
    h0, h1 = inp.hessians[0], inp.hessians[1]
    U = f.U.detach().double()
    for i in range(DIN):
        ref = sum(
            0.5 * float(U[i, j]) ** 2 * (float(h0["U"][i, j]) - 0.3 * float(h1["U"][i, j]))
            for j in range(K)
        )
        assert float(rows[i]) == pytest.approx(ref)
    removed = strategy_scores("fairlrf", f, rr=0.0, inputs=_inputs(lin, beta=0.3))
    assert torch.allclose(removed[0], rows) and torch.allclose(removed[1], cols)


def test_fairlrf_validates_hessians_and_row_score(layer) -> None:
    lin, f = layer
    inp = _inputs(lin)
    with pytest.raises(FairDeployError, match=r"hessians\[0\] and \[1\].*got groups \[0\]"):
        strategy_scores("fairlrf", f, rr=0.0, inputs=SelectionInputs(hessians={0: inp.hessians[0]}))
    bad = {0: inp.hessians[0], 1: {"U": torch.ones(DIN, K + 1), "V": inp.hessians[1]["V"]}}
    with pytest.raises(FairDeployError, match=r"hessians\[1\]\['U'\] has shape \(8, 4\)"):
        strategy_scores("fairlrf", f, rr=0.0, inputs=SelectionInputs(hessians=bad))
    with pytest.raises(FairDeployError, match="row_score='partial'"):
        strategy_scores("fairlrf", f, rr=0.0, inputs=_inputs(lin, row_score="partial"))
    nan_u = torch.full((DIN, K), float("nan"))
    nan = {0: {"U": nan_u, "V": inp.hessians[0]["V"]}, 1: inp.hessians[1]}
    with pytest.raises(FairDeployError, match="non-finite row scores"):
        strategy_scores("fairlrf", f, rr=0.0, inputs=SelectionInputs(hessians=nan))


def test_register_strategy_adds_to_registry(layer) -> None:
    @register_strategy("test_reverse_index")
    def _reverse(factorized, *, rr, inputs):
        return (
            -torch.arange(factorized.in_features, dtype=torch.float64),
            -torch.arange(factorized.out_features, dtype=torch.float64),
        )

    try:
        assert "test_reverse_index" in list_strategies()
        rows, cols = select_rows_cols(
            "test_reverse_index", layer[1], sr=0.25, rr=0.0, inputs=SelectionInputs()
        )
        assert rows.tolist() == [6, 7] and cols.tolist() == [5]
        with pytest.raises(ValueError, match="registered twice"):
            register_strategy("test_reverse_index")(_reverse)
    finally:
        _STRATEGIES.pop("test_reverse_index")


# --- activation sums for slr_a --------------------------------------------------------


def test_activation_abs_sums_match_a_manual_forward() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 3, in_features=6, widths=(8, 5))
    model.train()
    batches = [torch.randn(4, 6), (torch.randn(3, 6), torch.zeros(3))]
    xs = torch.cat([batches[0], batches[1][0]])
    s_in, s_out = activation_abs_sums(model, "layers.2", batches)
    with torch.no_grad():
        h = torch.relu(model.layers[0](xs))
        out = torch.relu(model.layers[2](h))
    assert torch.allclose(s_in, h.abs().sum(0).double(), atol=1e-5)
    assert torch.allclose(s_out, out.abs().sum(0).double(), atol=1e-5)
    assert model.training  # mode restored
    # The last layer has no activation after it: its own output is summed.
    _, s_head = activation_abs_sums(model, "layers.4", batches)
    with torch.no_grad():
        logits = model.layers[4](torch.relu(model.layers[2](h)))
    assert torch.allclose(s_head, logits.abs().sum(0).double(), atol=1e-5)


def test_activation_abs_sums_with_inplace_relu_and_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(7, 2))
    x = torch.randn(10, 5)
    s_in, s_out = activation_abs_sums(model, "0", [x])
    with torch.no_grad():
        pre = model[0](x)
    assert torch.allclose(s_in, x.abs().sum(0).double(), atol=1e-5)
    assert torch.allclose(s_out, torch.relu(pre).sum(0).double(), atol=1e-5)
    assert following_activation(model, "0") == "1" and following_activation(model, "3") is None
    msg = r"'1' is a ReLU, not an nn.Linear.*Linear layers are 0, 3"
    with pytest.raises(FairDeployError, match=msg):
        activation_abs_sums(model, "1", [x])
