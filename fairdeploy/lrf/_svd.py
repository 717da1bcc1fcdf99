"""Truncated SVD of a linear layer's weight: ``Wᵀ ≈ U diag(S) V``.

Two solvers compute the top-k singular triplets in float64:

- ``"full"``: ``torch.linalg.svd`` of the whole matrix, then the first k triplets.
- ``"randomized"``: randomized subspace iteration (Halko, Martinsson & Tropp 2011,
  Alg. 4.4) with a seeded Gaussian start, oversampling (p = max(10, 2k)) and
  re-orthonormalisation at every step, stopped by an a-posteriori error bound (Wedin)
  rather than a fixed iteration count. The first iterations run in float32 and the
  last ones, where convergence is judged, in float64 (see :func:`truncated_svd`).

``"auto"`` uses the randomized solver when ``k ≤ min(Din, Dout) / 4`` and, when that does
not reach its error bound (flat spectra, e.g. a randomly initialised layer), falls back
to the top eigenpairs of the Gram matrix (accepted under the same a-posteriori bound),
then to the full SVD, so its result is always as accurate as the full SVD's to ~1e-5
(relative) on the top-k singular values and subspaces.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf._factorized import FactorizedLinear

__all__ = [
    "SOLVERS",
    "FactorizationWarning",
    "SVDResult",
    "break_even_rank",
    "factorize",
    "truncated_svd",
]

#: Solver names accepted by :func:`factorize` and :func:`truncated_svd`.
SOLVERS = ("auto", "full", "randomized")

# "auto" picks the randomized solver when k ≤ min(Din, Dout) / _AUTO_FRACTION: beyond
# that the oversampled basis (k + p columns) is a large part of the matrix and a full
# SVD costs about as much as a few subspace iterations.
_AUTO_FRACTION = 4
# Target of the a-posteriori bound (Wedin): sin of the largest principal angle between
# the computed and the exact top-k subspaces. 10× below the 1e-4 that callers rely on,
# because the spectral gap in the bound is itself estimated.
_TOL = 1e-5
# At 4096×4096, k = 64 (basis 192) one iteration costs ~1/30–1/40 of a full float64
# SVD, so beyond ~40 iterations the full SVD is the faster route anyway.
_MAX_ITER = 40
# Steps over which the convergence rate is measured before giving up early.
_RATE_WINDOW = 4
# Error bound at which the randomized solver moves from float32 to float64 iterations.
_SWITCH = 1e-2


class FactorizationWarning(UserWarning):
    """A factorization that works but is probably not what was meant.

    Raised (as a warning) when the rank exceeds the break-even rank, so the factorized
    layer stores more parameters than the dense one, and when ``solver="randomized"``
    stops before reaching its error bound.
    """


def break_even_rank(din: int, dout: int) -> float:
    """Rank at which a factorized layer stores as many weights as the dense one.

    ``Din·k + k·Dout = Din·Dout`` at ``k = Din·Dout / (Din + Dout)``; above it the
    factorization is larger than the layer it replaces (S and bias aside).
    """
    return din * dout / (din + dout)


@dataclass(frozen=True)
class SVDResult:
    """Top-k singular triplets of a matrix ``A ≈ U diag(S) Vh`` and how they were found.

    Attributes
    ----------
    U : torch.Tensor
        (m, k) left singular vectors, float64, orthonormal columns.
    S : torch.Tensor
        (k,) singular values, float64, descending.
    Vh : torch.Tensor
        (k, n) right singular vectors as rows, float64.
    solver : str
        The solver that produced the result: ``"full"`` or ``"randomized"``.
    iterations : int
        Subspace iterations run by the randomized solver (0 for ``"full"``).
    converged : bool
        Whether the randomized solver met its error bound (True for ``"full"``).
    error_bound : float
        The randomized solver's final estimate of sin of the largest principal angle
        between the computed and exact top-k subspaces (0 for ``"full"``).
    fell_back : bool
        True when ``"auto"`` tried the randomized solver, it did not converge, and the
        full SVD was used instead.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    solver: str
    iterations: int = 0
    converged: bool = True
    error_bound: float = 0.0
    fell_back: bool = False


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Singular vectors are defined up to a joint sign flip (u, v) -> (-u, -v); make the
    # largest-|.| entry of each U column positive (first one on ties) so results do not
    # depend on the solver or the LAPACK build.
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs[signs == 0] = 1
    return U * signs, Vh * signs.unsqueeze(1)


def _full_svd(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def _gram_svd(A: torch.Tensor, k: int, tol: float) -> tuple[torch.Tensor, ...] | None:
    """Top-k triplets from the k largest eigenpairs of the smaller Gram matrix.

    A direct method (no iteration count to tune), so it handles the flat spectra where
    subspace iteration stalls (a randomly initialised layer): the Gram product plus a
    partial symmetric eigensolver (LAPACK ``syevr`` via SciPy, only the wanted
    eigenpairs) cost ~5–10× less than a full SVD at 4096². Squaring the matrix loses
    accuracy for small σ, so the result is accepted only when Wedin's a-posteriori
    bound ‖Aᵀ U − V S‖ / (σ_k − σ_{k+1}) — computed from A itself — is below ``tol``;
    otherwise None (the caller runs the full SVD).
    """
    try:
        import scipy.linalg
    except ImportError:  # pragma: no cover - scipy is a dependency
        return None
    m, n = A.shape
    if k + 1 > min(m, n):
        return None
    At = A if m >= n else A.T  # tall: Gram matrix of the smaller side
    G = (At.T @ At).numpy()
    size = G.shape[0]
    w, v = scipy.linalg.eigh(G, subset_by_index=[size - k - 1, size - 1], driver="evr")
    w, v = torch.from_numpy(w[::-1].copy()), torch.from_numpy(v[:, ::-1].copy())
    if w[k - 1] <= 0:
        return None
    S = w[:k].sqrt()
    right = v[:, :k]
    left = (At @ right) / S
    gap = float(S[-1] - w[k].clamp_min(0).sqrt())
    if gap <= 0:
        return None
    resid = torch.linalg.matrix_norm(At.T @ left - right * S)
    if float(resid) / gap > tol:
        return None
    U, Vh = (left, right.T) if m >= n else (right, left.T)
    return U, S, Vh


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a tall matrix Y (m × l, l ≪ m).

    CholeskyQR2 (two passes of ``Q = Y R⁻¹`` with ``R`` from ``Cholesky(YᵀY)``): a
    matrix product and an l×l factorization, several times faster than Householder QR
    for tall-skinny matrices and as orthogonal after the second pass when
    ``cond(Y)² · eps < 1``. Householder QR is the fall-back when Cholesky fails
    (rank-deficient or badly conditioned Y).
    """
    Q = Y
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.T @ Q)
        if int(info) != 0:
            return torch.linalg.qr(Y)[0]
        Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T
    return Q


def _tall_svd(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Thin SVD of a tall matrix via Z = Qz Rz and the SVD of the small l×l factor:
    # LAPACK's thin SVD of a 4096×128 matrix is ~10× slower than this route.
    Qz = _orth(Z)
    Ur, sig, Wt = torch.linalg.svd(Qz.T @ Z)
    return Qz @ Ur, sig, Wt


def _randomized_svd(
    A: torch.Tensor, k: int, *, seed: int, oversample: int, max_iter: int, tol: float
) -> SVDResult:
    """Randomized subspace iteration with an a-posteriori stopping rule.

    Each step keeps an orthonormal basis Q (m × l) of the current subspace and does
    a Rayleigh–Ritz projection: ``Z = Aᵀ Q = (Qᵀ A)ᵀ``, ``Z = V Σ Wᵀ`` (small SVD), Ritz
    triplets ``(Q W, Σ, V)``. For those, ``Aᵀ u_i = σ_i v_i`` holds exactly and the
    other residual ``R = A V_k − U_k Σ_k`` is what is left; Wedin's theorem bounds sin
    of the principal angles of both top-k subspaces by ``‖R‖_F / δ`` with
    ``δ = σ_k − σ_{k+1}`` (estimated from the Ritz values), and the singular values'
    relative error by the same quantity. ``A V`` is also the next power step
    (``Q ← orth(A Aᵀ Q)``), so one step costs two products with A.

    The loop stops when the bound is below ``tol``, when the basis spans the whole
    column space (exact), when the bound stops shrinking, or when its observed rate
    predicts it would not reach ``tol`` within ``max_iter`` steps (slowly decaying
    spectra, where the full SVD is the faster route).
    """
    m, n = A.shape
    min_dim = min(m, n)
    l = min(k + oversample, min_dim)  # noqa: E741  (the basis size, as in the literature)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, l, generator=gen, dtype=torch.float64).to(A.device)
    # The first iterations only steer the subspace: run them in float32 (matrix
    # products about twice as fast) until the bound reaches _SWITCH, well above
    # float32's rounding floor, then finish in float64, where convergence is judged.
    # Continuing from the float32 basis costs nothing: subspace iteration forgets its
    # starting point.
    work = A.to(torch.float32) if l < min_dim else A
    Q = _orth(work @ omega.to(work.dtype))
    history: list[float] = []
    it = 0
    while True:
        precise = work.dtype == torch.float64
        Vz, sig, Wt = _tall_svd(work.T @ Q)  # Aᵀ Q = Vz diag(sig) Wt, so Qᵀ A = Wtᵀ Σ Vzᵀ
        Y = work @ Vz  # (m, l): residual for the top k, and the next power step
        U_k = Q @ Wt.T[:, :k]
        R = Y[:, :k] - U_k * sig[:k]
        bound = _wedin_bound(R, sig, k, l)
        history.append(bound)
        exact = precise and l == min_dim  # Q spans the column space: Rayleigh–Ritz is exact
        converged = exact or (precise and bound <= tol)
        # The rate-based give-up is valid in float32 too: the switch comes before the
        # float32 rounding floor, so the bound still shrinks at the true rate there.
        if converged or it >= max_iter or _hopeless(history, tol, it, max_iter):
            return SVDResult(
                U=U_k.to(torch.float64),
                S=sig[:k].to(torch.float64),
                Vh=Vz[:, :k].T.to(torch.float64).contiguous(),
                solver="randomized",
                iterations=it,
                converged=converged,
                error_bound=0.0 if exact else bound,
            )
        if not precise and bound <= _SWITCH:
            work, history = A, []
            Y = Y.to(torch.float64)
        Q = _orth(Y)
        it += 1


def _wedin_bound(R: torch.Tensor, sig: torch.Tensor, k: int, l: int) -> float:  # noqa: E741
    """``‖R‖_F / (σ_k − σ_{k+1})`` from Ritz values, less the rounding floor of R."""
    # R can't go below rounding: ~eps·‖A‖ per entry of a product.
    floor = 64 * torch.finfo(R.dtype).eps
    s1 = float(sig[0])
    gap = float(sig[k - 1] - sig[k]) if k < l else float(sig[k - 1])
    if s1 == 0.0:
        return 0.0  # A is zero: any orthonormal basis is exact
    if gap <= floor * s1:
        return math.inf  # σ_k ≈ σ_{k+1}: the subspace is not determined by k
    res = float(torch.linalg.matrix_norm(R))
    return max(res - floor * s1 * math.sqrt(k), 0.0) / gap


def _hopeless(history: list[float], tol: float, done: int, max_iter: int) -> bool:
    # Subspace iteration converges linearly, at a rate set by σ_{l+1}/σ_k, after a
    # start-up transient (plateaus of a step or two are common). Estimate the rate over
    # the last _RATE_WINDOW steps and give up when the remaining steps cannot reach tol:
    # better to spend the time on a full SVD.
    if len(history) <= _RATE_WINDOW + 1:
        return False
    first, last = history[-1 - _RATE_WINDOW], history[-1]
    if not math.isfinite(last):
        return True  # still no gap between σ_k and σ_{k+1} after several steps
    if not (math.isfinite(first) and first > 0 and last > 0):
        return False
    rate = (last / first) ** (1.0 / _RATE_WINDOW)
    if rate >= 1.0:
        return True
    steps_needed = math.log(tol / last) / math.log(rate)
    return done + steps_needed > max_iter


def truncated_svd(
    A: torch.Tensor,
    k: int,
    *,
    solver: str = "auto",
    seed: int = 0,
    oversample: int | None = None,
    max_iter: int = _MAX_ITER,
    tol: float = _TOL,
) -> SVDResult:
    """Top-k singular triplets of a matrix, in float64, with deterministic signs.

    Parameters
    ----------
    A : torch.Tensor
        (m, n) matrix; converted to float64.
    k : int
        Number of triplets, ``1 ≤ k ≤ min(m, n)``.
    solver : {"auto", "full", "randomized"}
        ``"full"``: ``torch.linalg.svd``. ``"randomized"``: seeded subspace iteration
        stopped when Wedin's a-posteriori bound on sin of the principal angles is below
        ``tol`` (it warns with :class:`FactorizationWarning` if it stops before).
        ``"auto"``: randomized when ``k ≤ min(m, n) / 4``, with a fall-back to the full
        SVD when the randomized solver does not converge (slowly decaying spectra, or
        ``σ_k ≈ σ_{k+1}``); full otherwise.
    seed : int
        Seed of the randomized solver's Gaussian start.
    oversample : int, optional
        Extra basis columns p of the randomized solver (default ``max(10, 2k)``); each
        iteration shrinks the error by about ``(σ_{k+p+1} / σ_k)²``, so a wide basis
        pays for itself on slowly decaying spectra (measured at 4096², k = 64,
        σ_i = i^-0.5: p = 32, 64, 128 took 37, 23, 15 iterations; 12.5 s at p = 128
        against 31 s at p = 64).
    max_iter : int
        Most subspace iterations of the randomized solver.
    tol : float
        Target of the randomized solver's error bound.

    Returns
    -------
    SVDResult
        ``U`` (m, k), ``S`` (k,), ``Vh`` (k, n), float64, with the largest-|.| entry of
        each column of ``U`` positive; plus which solver produced them.
    """
    if solver not in SOLVERS:
        raise FairDeployError(f"solver={solver!r} is unknown: use one of {', '.join(SOLVERS)}")
    A = A.detach().to(torch.float64)
    min_dim = min(A.shape)
    if solver == "full" or (solver == "auto" and k * _AUTO_FRACTION > min_dim):
        U, S, Vh = _full_svd(A, k)
        U, Vh = _fix_signs(U, Vh)
        return SVDResult(U=U, S=S, Vh=Vh, solver="full")
    p = max(10, 2 * k) if oversample is None else int(oversample)
    res = _randomized_svd(A, k, seed=seed, oversample=p, max_iter=max_iter, tol=tol)
    if not res.converged:
        if solver == "auto":
            gram = _gram_svd(A, k, tol)
            U, S, Vh = gram if gram is not None else _full_svd(A, k)
            U, Vh = _fix_signs(U, Vh)
            return SVDResult(
                U=U,
                S=S,
                Vh=Vh,
                solver="gram" if gram is not None else "full",
                iterations=res.iterations,
                fell_back=True,
            )
        warnings.warn(
            f"randomized SVD (k={k}, matrix {tuple(A.shape)}) stopped after "
            f"{res.iterations} iterations with error bound {res.error_bound:.2e} > {tol:.0e}: "
            "the spectrum decays too slowly near σ_k; use solver='auto' or 'full' for an "
            "exact result",
            FactorizationWarning,
            stacklevel=2,
        )
    U, Vh = _fix_signs(res.U, res.Vh)
    return SVDResult(
        U=U,
        S=res.S,
        Vh=Vh,
        solver=res.solver,
        iterations=res.iterations,
        converged=res.converged,
        error_bound=res.error_bound,
    )


def factorize(
    linear: nn.Linear, rank: int, *, solver: str = "auto", seed: int = 0
) -> FactorizedLinear:
    """Replace a linear layer by its rank-k truncated SVD.

    ``nn.Linear`` computes ``x Wᵀ + b`` with ``W`` (Dout, Din). This factors
    ``Wᵀ`` (Din × Dout) ``≈ U diag(S) V`` (float64 decomposition, factors cast back
    to the layer's dtype and kept on its device) and copies the bias. By Eckart–Young
    the result is the best rank-k approximation of ``W`` in Frobenius and spectral norm;
    at ``k = min(Din, Dout)`` it reproduces the layer up to rounding.

    Parameters
    ----------
    linear : nn.Linear
        The layer; it is not modified.
    rank : int
        k, ``1 ≤ k ≤ min(Din, Dout)``. Above the break-even rank
        ``Din·Dout / (Din + Dout)`` the factors are larger than the dense weight and a
        :class:`FactorizationWarning` is issued.
    solver : {"auto", "full", "randomized"}
        See :func:`truncated_svd`.
    seed : int
        Seed of the randomized solver.

    Returns
    -------
    FactorizedLinear
        A new layer with ``U`` (Din, k), ``S`` (k,), ``V`` (k, Dout) and the bias.
    """
    if not isinstance(linear, nn.Linear):
        raise FairDeployError(
            f"factorize needs an nn.Linear layer, got {type(linear).__name__}: only Linear "
            "layers can be factorized"
        )
    dout, din = linear.weight.shape
    min_dim = min(din, dout)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min_dim:
        raise FairDeployError(
            f"rank={rank!r} is not allowed for Linear(in_features={din}, out_features={dout}) "
            f"(weight {dout}×{din}): use an integer in [1, {min_dim}]"
        )
    weight = linear.weight.detach()
    if weight.is_meta:
        raise FairDeployError(
            "factorize got a layer on the meta device, which has no weight values: "
            "load the checkpoint first"
        )
    if not bool(torch.isfinite(weight).all()):
        raise FairDeployError(
            f"the weight of Linear({din}, {dout}) contains NaN or inf: check the checkpoint"
        )
    if rank > break_even_rank(din, dout):
        warnings.warn(
            f"rank {rank} exceeds the break-even rank {break_even_rank(din, dout):.1f} of a "
            f"{dout}×{din} weight: the factorized layer stores {din * rank + rank * dout} "
            f"weights, more than the dense layer's {din * dout}",
            FactorizationWarning,
            stacklevel=2,
        )
    # float64 decompositions are unsupported on some accelerators (MPS): use the CPU there.
    work_device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    res = truncated_svd(weight.to(work_device).T, rank, solver=solver, seed=seed)
    dtype, device = weight.dtype, weight.device
    bias = None if linear.bias is None else linear.bias.detach()
    return FactorizedLinear(
        res.U.to(device=device, dtype=dtype),
        res.S.to(device=device, dtype=dtype),
        res.Vh.to(device=device, dtype=dtype),
        bias,
    )
