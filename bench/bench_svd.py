"""Truncated SVD: the full float64 SVD against fairdeploy's randomized solver.

Builds an n×n matrix ``A = U diag(σ) Vᵀ`` with random orthogonal U, V and a chosen
spectrum, times ``torch.linalg.svd`` (float64, the baseline) and
``truncated_svd(..., solver=...)`` in the same process, and prints the speed ratio and
the accuracy reached against the full SVD: the largest relative error of the top-k
singular values and ‖P_k − P̂_k‖₂ of the top-k left and right subspace projectors (sin of
the largest principal angle).

Spectra: ``power`` σ_i = i^-0.5 (a slowly, power-law decaying spectrum such as trained
layers show), ``exp`` σ_i = exp(-i/256) + 0.01, ``gaussian`` an i.i.d. Gaussian matrix
(Marchenko–Pastur bulk: the worst case, where ``auto`` falls back to the full SVD).

Usage: ``python bench/bench_svd.py [--n 4096] [--k 64] [--spectrum power] [--solver auto]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from fairdeploy.lrf._svd import truncated_svd


def make_matrix(n: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    """An n×n float64 matrix with the named singular-value spectrum."""
    gen = torch.Generator().manual_seed(seed)
    if spectrum == "gaussian":
        return torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    i = torch.arange(1, n + 1, dtype=torch.float64)
    sigma = {"power": i**-0.5, "exp": torch.exp(-i / 256) + 0.01}[spectrum]
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (U * sigma) @ V.T


def subspace_error(P: torch.Tensor, Q: torch.Tensor) -> float:
    """‖P Pᵀ − Q Qᵀ‖₂ for orthonormal columns P, Q: sin of the largest principal angle."""
    # Without forming n×n projectors: for equal-rank subspaces ‖PPᵀ − QQᵀ‖₂ equals
    # ‖(I − PPᵀ) Q‖₂, which keeps full precision for tiny angles.
    return float(torch.linalg.matrix_norm(Q - P @ (P.T @ Q), ord=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--spectrum", choices=["power", "exp", "gaussian"], default="power")
    ap.add_argument("--solver", choices=["auto", "randomized"], default="auto")
    ap.add_argument("--oversample", type=int, default=None)
    args = ap.parse_args()

    A = make_matrix(args.n, args.spectrum)
    print(f"matrix {args.n}×{args.n} float64, spectrum={args.spectrum}, k={args.k}, "
          f"threads={torch.get_num_threads()}")

    t0 = time.perf_counter()
    full = truncated_svd(A, args.k, solver="full")
    t_full = time.perf_counter() - t0

    t0 = time.perf_counter()
    fast = truncated_svd(A, args.k, solver=args.solver, oversample=args.oversample)
    t_fast = time.perf_counter() - t0

    sv_err = float(((fast.S - full.S).abs() / full.S).max())
    u_err = subspace_error(full.U, fast.U)
    v_err = subspace_error(full.Vh.T, fast.Vh.T)
    print(f"full SVD (torch.linalg.svd)     : {t_full:8.2f} s")
    print(f"truncated_svd(solver={args.solver!r}): {t_fast:8.2f} s  -> used {fast.solver!r}, "
          f"{fast.iterations} iterations, converged={fast.converged}, "
          f"fell_back={fast.fell_back}, error bound={fast.error_bound:.1e}")
    print(f"speed-up (full / truncated)     : {t_full / t_fast:8.1f}×")
    print(f"max rel. error of top-{args.k} σ      : {sv_err:.1e}")
    print(f"sin θ_max, left / right subspace: {u_err:.1e} / {v_err:.1e}")


if __name__ == "__main__":
    main()
