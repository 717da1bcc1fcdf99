"""Truncated SVD (factorize), sparse SVD (sparsify) and model-level application."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fairdeploy import LayerPlan, Plan
from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import (
    FactorizationWarning,
    FactorizedLinear,
    factorize,
    factorize_model,
    linear_layers,
    replace_module,
    sparsify,
    truncated_svd,
)
from fairdeploy.models import build_model


def _matrix(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """m×n float64 matrix with singular values ``sigma`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return (U * sigma) @ V.T


_I = torch.arange(1, 201, dtype=torch.float64)
SPECTRA = {
    "exp": torch.exp(-_I / 20),  # fast decay
    "power": _I**-0.5,  # slow, power-law decay
    "flat": 1 - 0.3 * _I / 200,  # nearly flat: gaps of 0.15 % near σ_k
}


def _sin_theta(P: torch.Tensor, Q: torch.Tensor) -> float:
    # ‖P Pᵀ − Q Qᵀ‖₂ for orthonormal columns: the sine of the largest principal angle.
    return float(torch.linalg.matrix_norm(P @ P.T - Q @ Q.T, ord=2))


def _linear_from(A: torch.Tensor, bias: bool = True) -> nn.Linear:
    """An nn.Linear whose Wᵀ is A (Din × Dout)."""
    din, dout = A.shape
    lin = nn.Linear(din, dout, bias=bias).to(torch.float64)
    with torch.no_grad():
        lin.weight.copy_(A.T)
    return lin


# --- truncated SVD against torch.linalg.svd -----------------------------------------


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("k", [5, 20, 50])
@pytest.mark.parametrize("solver", ["auto", "full", "propack", "arpack"])
def test_truncated_svd_matches_full_svd(spectrum: str, k: int, solver: str) -> None:
    A = _matrix(300, 200, SPECTRA[spectrum])
    ref_U, ref_S, ref_Vh = torch.linalg.svd(A, full_matrices=False)
    res = truncated_svd(A, k, solver=solver, seed=3)
    assert res.U.shape == (300, k) and res.S.shape == (k,) and res.Vh.shape == (k, 200)
    assert torch.all((res.S - ref_S[:k]).abs() <= 1e-4 * ref_S[:k])
    assert _sin_theta(res.U, ref_U[:, :k]) <= 1e-4
    assert _sin_theta(res.Vh.T, ref_Vh[:k].T) <= 1e-4
    # U diag(S) Vh is the best rank-k approximation (Eckart–Young).
    err = torch.linalg.matrix_norm(A - (res.U * res.S) @ res.Vh) ** 2
    assert err == pytest.approx(float((ref_S[k:] ** 2).sum()), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_auto_uses_propack_when_k_is_small(spectrum: str) -> None:
    # Flat spectra included: Lanczos converges where subspace iteration stalled.
    res = truncated_svd(_matrix(300, 200, SPECTRA[spectrum]), 20, solver="auto")
    assert res.solver == "propack" and not res.fell_back
    assert res.error_bound <= 1e-5


@pytest.mark.parametrize("solver", ["propack", "arpack"])
def test_wide_matrix_and_seed_independence(solver: str) -> None:
    # Din < Dout, and different seeds: same factors (deterministic signs), within 1e-4.
    A = _matrix(200, 300, SPECTRA["power"])
    ref_U, _, ref_Vh = torch.linalg.svd(A, full_matrices=False)
    a = truncated_svd(A, 12, solver=solver, seed=0)
    b = truncated_svd(A, 12, solver=solver, seed=1)
    assert a.solver == b.solver == solver
    assert _sin_theta(a.U, ref_U[:, :12]) <= 1e-4 and _sin_theta(a.Vh.T, ref_Vh[:12].T) <= 1e-4
    assert torch.allclose(a.U, b.U, atol=1e-4) and torch.allclose(a.Vh, b.Vh, atol=1e-4)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_auto_falls_back_to_full_svd_when_sigma_k_is_not_separated(shape) -> None:
    # σ_21 = σ_20 (1 − 1e-9): no subspace bound can hold at tol 1e-5, so the full SVD is used.
    sigma = SPECTRA["flat"].clone()
    sigma[20] = sigma[19] * (1 - 1e-9)
    A = _matrix(*shape, sigma)
    res = truncated_svd(A, 20, solver="auto")
    assert res.solver == "full" and res.fell_back
    ref = torch.linalg.svdvals(A)
    assert torch.allclose(res.S, ref[:20], rtol=1e-12)


def test_exactly_repeated_sigma_k_still_gives_a_best_rank_k_svd() -> None:
    # σ_20 = σ_21 exactly: the top-20 subspace is not unique. Whichever solver answers
    # (PROPACK may see the repeated value once), the singular values are exact and the
    # approximation is optimal.
    sigma = SPECTRA["flat"].clone()
    sigma[20] = sigma[19]
    A = _matrix(300, 200, sigma)
    ref = torch.linalg.svdvals(A)
    res = truncated_svd(A, 20, solver="auto")
    assert torch.allclose(res.S, ref[:20], rtol=1e-12)
    err = torch.linalg.matrix_norm(A - (res.U * res.S) @ res.Vh) ** 2
    assert float(err) == pytest.approx(float((ref[20:] ** 2).sum()), rel=1e-9)
    assert torch.allclose(res.U.T @ res.U, torch.eye(20, dtype=torch.float64), atol=1e-10)


def test_auto_uses_full_svd_for_large_rank() -> None:
    # k > min(Din, Dout) / 4: a full SVD is as cheap as a Krylov solver.
    res = truncated_svd(_matrix(300, 200, SPECTRA["exp"]), 51, solver="auto")
    assert res.solver == "full" and not res.fell_back


@pytest.mark.parametrize("solver", ["propack", "arpack"])
def test_named_solver_warns_when_its_bound_fails(solver: str) -> None:
    sigma = SPECTRA["flat"].clone()
    sigma[20] = sigma[19] * (1 - 1e-9)
    A = _matrix(300, 200, sigma)
    with pytest.warns(FactorizationWarning, match=f"solver='{solver}'.*used the full SVD"):
        res = truncated_svd(A, 20, solver=solver)
    assert res.solver == "full" and res.fell_back


@pytest.mark.parametrize("solver", ["propack", "arpack"])
def test_krylov_solvers_match_full_and_have_same_signs(solver: str) -> None:
    A = _matrix(300, 200, SPECTRA["exp"])
    fast = truncated_svd(A, 10, solver=solver, seed=1)
    full = truncated_svd(A, 10, solver="full")
    # Deterministic signs make the factors themselves agree, not only the subspaces.
    assert fast.solver == solver
    assert torch.allclose(fast.U, full.U, atol=1e-5)
    assert torch.allclose(fast.Vh, full.Vh, atol=1e-5)
    idx = full.U.abs().argmax(dim=0)
    assert torch.all(full.U[idx, torch.arange(10)] > 0)


@pytest.mark.parametrize("solver", ["propack", "arpack"])
def test_krylov_solvers_are_deterministic_per_seed(solver: str) -> None:
    A = _matrix(120, 90, SPECTRA["power"][:90])
    a = truncated_svd(A, 8, solver=solver, seed=7)
    b = truncated_svd(A, 8, solver=solver, seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_rank_deficient_zero_and_near_full_rank_matrices() -> None:
    low = _matrix(80, 60, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    res = truncated_svd(low, 2, solver="propack")
    assert res.solver == "propack"
    assert torch.allclose(res.S, torch.tensor([3.0, 2.0], dtype=torch.float64), rtol=1e-10)
    zero = truncated_svd(torch.zeros(80, 60, dtype=torch.float64), 3, solver="propack")
    assert torch.all(zero.S == 0) and zero.solver == "full"
    # k = min(m, n) − 1 leaves no room for the extra triplet the bound needs: full SVD.
    near = truncated_svd(_matrix(80, 60, SPECTRA["exp"][:60]), 59, solver="arpack")
    assert near.solver == "full" and not near.fell_back


# --- factorize ------------------------------------------------------------------------


def test_factorize_full_rank_reproduces_the_layer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    with pytest.warns(FactorizationWarning):  # k = 20 > break-even 12
        f = factorize(lin, 20)
    assert isinstance(f, FactorizedLinear)
    assert f.U.dtype == torch.float32 and f.U.shape == (30, 20) and f.V.shape == (20, 20)
    assert torch.allclose(f.dense_weight(), lin.weight, atol=1e-6)
    assert torch.equal(f.bias, lin.bias)
    x = torch.randn(7, 30)
    assert torch.allclose(f(x), lin(x), atol=1e-5)


def test_factorize_is_best_rank_k_and_keeps_dtype_and_bias() -> None:
    A = _matrix(40, 25, _I[:25] ** -1.0)
    lin = _linear_from(A)
    f = factorize(lin, 4)
    s = torch.linalg.svdvals(A)
    err = torch.linalg.matrix_norm(f.dense_weight() - lin.weight).detach() ** 2
    assert f.U.dtype == torch.float64
    assert float(err) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-8)
    assert torch.equal(f.bias, lin.bias) and f.bias.data_ptr() != lin.bias.data_ptr()
    assert torch.equal(lin.weight, A.T)  # the layer is not modified


def test_factorize_without_bias() -> None:
    f = factorize(nn.Linear(10, 8, bias=False), 2)
    assert f.bias is None


@pytest.mark.parametrize("rank", [0, 9, -1, True, 2.0])
def test_factorize_rejects_bad_rank(rank: object) -> None:
    with pytest.raises(FairDeployError, match=r"rank=.*in_features=10, out_features=8.*\[1, 8\]"):
        factorize(nn.Linear(10, 8), rank)  # type: ignore[arg-type]


def test_factorize_rejects_non_linear() -> None:
    with pytest.raises(FairDeployError, match="Conv2d"):
        factorize(nn.Conv2d(3, 4, 3), 1)  # type: ignore[arg-type]


def test_factorize_rejects_non_finite_weight() -> None:
    lin = nn.Linear(10, 8)
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    with pytest.raises(FairDeployError, match=r"Linear\(10, 8\) contains NaN or inf"):
        factorize(lin, 2)


def test_factorize_rejects_unknown_solver() -> None:
    with pytest.raises(FairDeployError, match="solver='lanczos'"):
        factorize(nn.Linear(10, 8), 2, solver="lanczos")


def test_factorize_warns_above_break_even_only() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factorize(nn.Linear(10, 10), 5)  # break-even 10·10/20 = 5: not above
    with pytest.warns(FactorizationWarning, match="break-even rank 5.0"):
        factorize(nn.Linear(10, 10), 6)


# --- sparsify -------------------------------------------------------------------------


def _factorized(din: int = 12, dout: int = 10, k: int = 4) -> FactorizedLinear:
    torch.manual_seed(1)
    return factorize(nn.Linear(din, dout), k, solver="full")


def test_sparsify_zeroes_trailing_entries_of_selected_rows_and_cols() -> None:
    f = _factorized()
    U0, V0 = f.U.detach().clone(), f.V.detach().clone()
    # sr = 0.25: ⌊3⌋ rows of 12, ⌊2.5⌋ = 2 columns of 10; rr = 0.5 keeps ⌊2⌋ of k = 4.
    g = sparsify(f, 0.25, 0.5, [7, 2, 0], torch.tensor([9, 4]))
    assert g is not f
    assert torch.equal(f.U, U0) and torch.equal(f.V, V0) and f.sparse_rows.numel() == 0
    assert g.sparse_rows.tolist() == [0, 2, 7] and g.sparse_cols.tolist() == [4, 9]
    assert g.keep == 2
    for i in range(12):
        for j in range(4):
            expected = 0.0 if (i in (0, 2, 7) and j >= 2) else float(U0[i, j])
            assert float(g.U.detach()[i, j]) == expected
    for j in range(4):
        for c in range(10):
            expected = 0.0 if (c in (4, 9) and j >= 2) else float(V0[j, c])
            assert float(g.V.detach()[j, c]) == expected
    x = torch.randn(5, 12)
    assert torch.allclose(g(x), ((x @ g.U) * g.S) @ g.V + g.bias)


def test_sparsify_rr_zero_zeroes_whole_rows_and_cols() -> None:
    g = sparsify(_factorized(), 0.5, 0.0, list(range(6)), list(range(5)))
    assert g.keep == 0
    assert torch.all(g.U[:6] == 0) and torch.all(g.U[6:] != 0)
    assert torch.all(g.V[:, :5] == 0) and torch.all(g.V[:, 5:] != 0)


def test_sparsified_layer_round_trips_through_state_dict() -> None:
    g = sparsify(_factorized(), 0.5, 0.5, list(range(6)), list(range(5)))
    h = _factorized()
    h.load_state_dict(g.state_dict())
    assert h.keep == 2 and torch.equal(h.sparse_rows, g.sparse_rows)
    assert torch.equal(h.U, g.U)


@pytest.mark.parametrize(
    ("sr", "rr", "rows", "cols", "match"),
    [
        (1.5, 0.0, [], [], r"sr=1\.5"),
        (0.25, -0.1, [0, 1, 2], [0, 1], r"rr=-0\.1"),
        (0.25, 0.5, [0, 1], [0, 1], r"rows has 2 indices.*⌊sr·12⌋ = 3"),
        (0.25, 0.5, [0, 1, 2], [0], r"cols has 1 indices.*⌊sr·10⌋ = 2"),
        (0.25, 0.5, [0, 1, 12], [0, 1], r"rows contains index 12, outside \[0, 11\]"),
        (0.25, 0.5, [0, 1, 1], [0, 1], r"rows contains repeated"),
        (0.25, 0.5, [0, 1, 2], [0.5, 1.0], r"cols must be a 1-D sequence of integer"),
    ],
)
def test_sparsify_validates(sr: float, rr: float, rows: list, cols: list, match: str) -> None:
    with pytest.raises(FairDeployError, match=match):
        sparsify(_factorized(), sr, rr, rows, cols)


def test_sparsify_rejects_already_sparsified_layer() -> None:
    g = sparsify(_factorized(), 0.25, 0.5, [0, 1, 2], [0, 1])
    with pytest.raises(FairDeployError, match="already sparsified"):
        sparsify(g, 0.25, 0.5, [0, 1, 2], [0, 1])


# --- model level ----------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", 3, in_features=12, widths=(16, 10))


def test_linear_layers_lists_linear_modules() -> None:
    assert linear_layers(_mlp()) == ["layers.0", "layers.2", "layers.4"]


def test_replace_module_returns_a_copy() -> None:
    model = _mlp()
    new = nn.Identity()
    out = replace_module(model, "layers.1", new)
    assert out.layers[1] is new and isinstance(model.layers[1], nn.ReLU)
    assert out.layers[0].weight.data_ptr() != model.layers[0].weight.data_ptr()
    with pytest.raises(FairDeployError, match=r"'layers\.9' does not exist"):
        replace_module(model, "layers.9", new)


def test_factorize_model_replaces_planned_layers_only() -> None:
    model = _mlp()
    plan = Plan("fairlrf", (LayerPlan("layers.0", 12), LayerPlan("layers.2", 3)))
    with pytest.warns(FactorizationWarning):  # layers.0 at full rank 12 > break-even
        out = factorize_model(model, plan)
    assert isinstance(model.layers[0], nn.Linear)  # original untouched
    assert isinstance(out.layers[0], FactorizedLinear) and out.layers[0].rank == 12
    assert isinstance(out.layers[2], FactorizedLinear) and out.layers[2].rank == 3
    assert torch.equal(out.layers[4].weight, model.layers[4].weight)
    assert out.layers[4].weight.data_ptr() != model.layers[4].weight.data_ptr()
    assert torch.allclose(out.layers[0].dense_weight(), model.layers[0].weight, atol=1e-6)


def test_factorize_model_errors_name_the_layer() -> None:
    model = _mlp()
    listing = r"layers\.0, layers\.2, layers\.4"
    with pytest.raises(FairDeployError, match=rf"'layers\.1' is a ReLU.*{listing}"):
        factorize_model(model, Plan("truncated_svd", (LayerPlan("layers.1", 1),)))
    with pytest.raises(FairDeployError, match=r"'nope' is no such module"):
        factorize_model(model, Plan("truncated_svd", (LayerPlan("nope", 1),)))
    with pytest.raises(FairDeployError, match=r"layer 'layers.2': rank=11 .*\[1, 10\]"):
        factorize_model(model, Plan("truncated_svd", (LayerPlan("layers.2", 11),)))
    with pytest.raises(FairDeployError, match="method 'fairprune'"):
        factorize_model(model, Plan("fairprune", prune_ratio=0.1))
