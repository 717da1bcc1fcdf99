"""Truncated SVD solvers against the full float64 SVD, timed interleaved in one process.

Builds an n×n matrix ``A = U diag(σ) Vᵀ`` with random orthogonal U, V and a chosen
spectrum, then times, round by round (the order rotates each round so load drifts hit
every solver alike), ``torch.linalg.svd`` (float64, the baseline and the accuracy
reference) and ``truncated_svd(A, k, solver=...)`` for each named solver, plus SciPy's
LOBPCG ``svds`` called directly (not offered by fairdeploy: it is here to show why). For
each it prints the median and the fastest time (on a shared machine the fastest run is the
least disturbed; the ratios use it), the speed-up over the full SVD and over ``auto``, which
solver ``auto`` ended up using, the largest relative error of the top-k singular values
and sin of the largest principal angle between the computed and the exact top-k left and
right subspaces.

Spectra: ``power`` σ_i = i^-0.5 (a slowly, power-law decaying spectrum such as trained
layers show), ``exp`` σ_i = exp(-i/256) + 0.01, ``gaussian`` an i.i.d. Gaussian matrix
(Marchenko–Pastur bulk: a randomly initialised layer, the flat worst case).

History: the hand-written randomized subspace iteration (with a Gram-eigenpair fallback for
flat spectra) that ``auto`` used before lost to PROPACK in every regime measured with this
script (docs/svd.md; the figures in CHANGELOG.md) and was removed; ``git show`` the commit before
its removal (05f6a21: fairdeploy/lrf/_svd.py) to rerun the comparison.

Usage::

    python bench/bench_svd.py                      # 4096² and 1024², k=64, all spectra
    python bench/bench_svd.py --quick              # 1024² only, one round (~1 min)
    python bench/bench_svd.py --n 2048 --spectra power --solvers auto propack arpack --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fairdeploy.lrf._svd import SOLVERS, truncated_svd


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


def _lobpcg(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    import warnings

    import scipy.sparse.linalg as sla

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u, s, vt = sla.svds(A.numpy(), k=k, solver="lobpcg", rng=np.random.default_rng(0))
    o = np.argsort(-s)
    return (torch.from_numpy(np.ascontiguousarray(u[:, o])), torch.from_numpy(s[o].copy()),
            torch.from_numpy(np.ascontiguousarray(vt[o])), "lobpcg")


def _runner(name: str, k: int) -> Callable[[torch.Tensor], tuple]:
    if name == "lobpcg":
        return lambda A: _lobpcg(A, k)

    def run(A: torch.Tensor) -> tuple:
        r = truncated_svd(A, k, solver=name, seed=0)
        return r.U, r.S, r.Vh, r.solver + (" (fell back)" if r.fell_back else "")

    return run


def bench_one(n: int, k: int, spectrum: str, solvers: list[str], rounds: int) -> None:
    """Time and check every solver on one matrix; print one table."""
    A = make_matrix(n, spectrum)
    names = ["full", *[s for s in solvers if s != "full"]]
    warm = make_matrix(128, spectrum, seed=1)
    for name in names:  # first calls pay for imports and thread pools: not timed
        _runner(name, min(k, 16))(warm)
    times: dict[str, list[float]] = {s: [] for s in names}
    last: dict[str, tuple] = {}
    # The accuracy reference is the first timed run of the full SVD.
    t0 = time.perf_counter()
    last["full"] = _runner("full", k)(A)
    times["full"].append(time.perf_counter() - t0)
    ref_U, ref_S, ref_Vh = last["full"][:3]
    ref_V = ref_Vh.T
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name == "full" and r == 0:
                continue  # already timed above
            run = _runner(name, k)
            t0 = time.perf_counter()
            last[name] = run(A)
            times[name].append(time.perf_counter() - t0)
    med = {s: statistics.median(t) for s, t in times.items()}
    # The fastest run is the least disturbed by other processes on a shared machine.
    best = {s: min(t) for s, t in times.items()}
    print(f"\nmatrix {n}×{n} float64, spectrum={spectrum}, k={k}, rounds={rounds}, "
          f"torch threads={torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"{'solver':>10} {'used':>20} {'median s':>9} {'min s':>7} {'full/x':>7} "
          f"{'auto/x':>7} {'σ rel err':>9} {'sinθ U':>8} {'sinθ V':>8}   (ratios of min times)")
    for name in names:
        U, S, Vh, used = last[name]
        sv = float(((S - ref_S).abs() / ref_S).max())
        su, sv_ = subspace_error(ref_U, U), subspace_error(ref_V, Vh.T)
        auto = f"{best['auto'] / best[name]:7.2f}" if "auto" in best else "      -"
        print(f"{name:>10} {used:>20} {med[name]:9.2f} {best[name]:7.2f} "
              f"{best['full'] / best[name]:7.2f} {auto} {sv:9.1e} {su:8.1e} {sv_:8.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--spectra", nargs="+", choices=["power", "exp", "gaussian"],
                    default=["power", "exp", "gaussian"])
    ap.add_argument("--solvers", nargs="+", choices=[*SOLVERS, "lobpcg"],
                    default=[s for s in SOLVERS if s != "full"])
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per solver (median)")
    ap.add_argument("--quick", action="store_true", help="1024² only, one round")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = [1024], 1
    print(f"uptime load at start: {os.getloadavg()}")
    for n in args.n:
        for spectrum in args.spectra:
            bench_one(n, args.k, spectrum, args.solvers, args.rounds)
    print(f"\nuptime load at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
