"""Truncated SVD of a linear layer's weight: ``Wᵀ ≈ U diag(S) V``.

Solvers of the top-k singular triplets, all in float64:

- ``"full"``: ``torch.linalg.svd`` of the whole matrix, then the first k triplets.
- ``"propack"``, ``"arpack"``: SciPy's ``scipy.sparse.linalg.svds`` (PROPACK's Lanczos
  bidiagonalization with partial reorthogonalization; ARPACK's implicitly restarted
  Lanczos on the smaller Gram operator), seeded, asked for k + 1 triplets, and accepted
  only under an a-posteriori bound computed from the matrix itself (see
  :func:`truncated_svd`); otherwise the full SVD is used.

``"auto"`` uses PROPACK when ``k ≤ min(Din, Dout) / 4`` and the full SVD otherwise, so its
result is as accurate as the full SVD's to ~1e-5 (relative) on the top-k singular values
and subspaces. Signs are fixed (largest-|.| entry of each column of U positive), so every
solver gives the same factors.

Why these (``bench/bench_svd.py``, docs/svd.md): measured in one
process against the hand-written randomized subspace iteration (with its Gram-eigenpair
fallback for flat spectra) that this module used before, PROPACK was faster on every
spectrum and size measured and more accurate; ARPACK is kept as an alternative (same
code path, more robust to exactly repeated singular values, slower).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
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
SOLVERS = ("auto", "full", "propack", "arpack")

# "auto" uses PROPACK when k ≤ min(Din, Dout) / _AUTO_FRACTION; beyond, the Krylov basis
# is a large part of the matrix and the full SVD costs about as much.
_AUTO_FRACTION = 4
# Target of the a-posteriori bound: sin of the largest principal angle between the
# computed and the exact top-k subspaces. 10× below the 1e-4 that callers rely on,
# because the spectral gap in the bound is itself estimated.
_TOL = 1e-5
# Lanczos steps PROPACK may take (its default, 10·k, is too few for small k on flat
# spectra): at least _MIN_KRYLOV, at most min(m, n), where the Krylov space is exact.
_MIN_KRYLOV = 300


class FactorizationWarning(UserWarning):
    """A factorization that works but is probably not what was meant.

    Raised (as a warning) when the rank exceeds the break-even rank, so the factorized
    layer stores more parameters than the dense one, and when a named iterative solver
    (``propack``, ``arpack``) misses its error bound and the full SVD is used instead.
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
        The solver that produced the result: ``"full"``, ``"propack"`` or ``"arpack"``.
    error_bound : float
        The a-posteriori bound on sin of the largest principal angle between the
        computed and the exact top-k subspaces (0 for ``"full"``).
    fell_back : bool
        True when an iterative solver was tried, missed its bound (or did not
        converge), and the full SVD was used instead.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    solver: str
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


def _full_svd(A: torch.Tensor, k: int, *, fell_back: bool = False) -> SVDResult:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    U, Vh = _fix_signs(U[:, :k], Vh[:k])
    return SVDResult(U=U, S=S[:k], Vh=Vh, solver="full", fell_back=fell_back)


def _svds(A: torch.Tensor, k: int, *, solver: str, seed: int) -> tuple[SVDResult, float] | None:
    """Top-k triplets from ``scipy.sparse.linalg.svds`` and their a-posteriori bound.

    Asks for k + 1 triplets: σ_{k+1} estimates the gap ``δ = σ_k − σ_{k+1}``. The
    generalized Wedin bound ``sqrt(‖A V − U Σ‖²_F + ‖Aᵀ U − V Σ‖²_F) / δ`` bounds sin of
    the principal angles of both subspaces (and the singular values' relative error);
    its residuals come from A itself, so the check does not trust the solver. The
    returned bound is inf when the vectors are not orthonormal to 1e-8, or δ ≤ 0.
    None when the solver raises (no convergence within its iteration budget).
    """
    import scipy.sparse.linalg as sla

    a = A.cpu().numpy()
    krylov = min(min(a.shape), max(10 * (k + 1), _MIN_KRYLOV))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence is judged by the bound below
            u, s, vt = sla.svds(
                a,
                k=k + 1,
                solver=solver,
                tol=0,
                rng=np.random.default_rng(int(seed)),
                maxiter=krylov if solver == "propack" else None,
            )
    except (sla.ArpackNoConvergence, sla.ArpackError, np.linalg.LinAlgError):
        return None
    order = np.argsort(-s, kind="stable")
    U = torch.from_numpy(np.ascontiguousarray(u[:, order[:k]]))
    S = torch.from_numpy(np.ascontiguousarray(s[order[:k]]))
    Vh = torch.from_numpy(np.ascontiguousarray(vt[order[:k]]))
    At = A.cpu()
    res = math.hypot(
        float(torch.linalg.matrix_norm(At @ Vh.T - U * S)),
        float(torch.linalg.matrix_norm(At.T @ U - Vh.T * S)),
    )
    eye = torch.eye(k, dtype=torch.float64)
    ortho = max(
        float(torch.linalg.matrix_norm(U.T @ U - eye)),
        float(torch.linalg.matrix_norm(Vh @ Vh.T - eye)),
    )
    gap = float(s[order[k - 1]] - s[order[k]])
    bound = res / gap if gap > 0 and ortho <= 1e-8 else math.inf
    return SVDResult(U=U, S=S, Vh=Vh, solver=solver, error_bound=bound), bound


def truncated_svd(
    A: torch.Tensor,
    k: int,
    *,
    solver: str = "auto",
    seed: int = 0,
    tol: float = _TOL,
) -> SVDResult:
    """Top-k singular triplets of a matrix, in float64, with deterministic signs.

    Parameters
    ----------
    A : torch.Tensor
        (m, n) matrix; converted to float64. Iterative solvers run on the CPU; the
        result is returned on A's device.
    k : int
        Number of triplets, ``1 ≤ k ≤ min(m, n)``.
    solver : {"auto", "full", "propack", "arpack"}
        ``"full"``: ``torch.linalg.svd``. ``"propack"``/``"arpack"``: SciPy's ``svds``
        with that solver, seeded, accepted when the a-posteriori bound
        ``sqrt(‖A V − U Σ‖²_F + ‖Aᵀ U − V Σ‖²_F) / (σ_k − σ_{k+1})`` on sin of the
        principal angles is below ``tol`` (σ_{k+1} from one extra triplet); otherwise,
        or when the solver does not converge, the full SVD is used with a
        :class:`FactorizationWarning`. ``"auto"``: PROPACK when
        ``k ≤ min(m, n) / 4``, falling back to the full SVD silently; the full SVD
        otherwise. At ``k ≥ min(m, n) − 1`` (no room for the extra triplet) and for a
        zero matrix the full SVD is used whatever the solver.
    seed : int
        Seed of the iterative solvers' random start (same seed, same result).
    tol : float
        Target of the a-posteriori bound.

    Returns
    -------
    SVDResult
        ``U`` (m, k), ``S`` (k,), ``Vh`` (k, n), float64, with the largest-|.| entry of
        each column of ``U`` positive; plus which solver produced them.

    Notes
    -----
    Lanczos methods start from one vector, so an exactly repeated singular value
    (σ_k = σ_{k+1} to rounding) can be seen once: PROPACK then returns a valid top-k SVD
    (the singular values are right and the approximation is optimal) but, the top-k
    subspace not being unique, not necessarily the one LAPACK picks. Near-repeats
    (relative gaps of 1e-9 and up) are resolved and fall back to the full SVD through
    the bound. ARPACK's restarts also resolve exact repeats.
    """
    if solver not in SOLVERS:
        raise FairDeployError(f"solver={solver!r} is unknown: use one of {', '.join(SOLVERS)}")
    device = A.device
    A = A.detach().to(torch.float64)
    min_dim = min(A.shape)
    if solver == "auto":
        solver = "propack" if k * _AUTO_FRACTION <= min_dim else "full"
        named = False
    else:
        named = True
    if solver == "full" or k + 2 > min_dim or not bool(A.any()):
        return _full_svd(A, k)
    found = _svds(A.cpu(), k, solver=solver, seed=seed)
    if found is None or not found[1] <= tol:
        if named:
            why = "did not converge" if found is None else f"error bound {found[1]:.1e} > {tol:.0e}"
            warnings.warn(
                f"solver={solver!r} (k={k}, matrix {tuple(A.shape)}) {why} (σ_k ≈ σ_(k+1)?): "
                "used the full SVD instead",
                FactorizationWarning,
                stacklevel=2,
            )
        return _full_svd(A, k, fell_back=True)
    res = found[0]
    U, Vh = _fix_signs(res.U, res.Vh)
    return SVDResult(
        U=U.to(device), S=res.S.to(device), Vh=Vh.to(device), solver=solver,
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
    solver : {"auto", "full", "propack", "arpack"}
        See :func:`truncated_svd`.
    seed : int
        Seed of the iterative solvers' random start.

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
