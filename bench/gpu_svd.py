"""Truncated SVD of a CUDA weight: on the GPU (full SVD, randomized) or on the CPU (PROPACK).

Times, for a 4096×4096 float64 matrix with a power-law spectrum and k=64:
``torch.linalg.svd`` on the GPU, the hand-written randomized solver on the GPU (when this
version still has it), and ``truncated_svd(..., solver="propack")`` on the CPU including
the copies, with the accuracy of each against the GPU full SVD. Needs a CUDA device.

Usage: ``python bench/gpu_svd.py [--n 4096] [--k 64]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_svd import make_matrix, subspace_error

from fairdeploy.lrf._svd import SOLVERS, truncated_svd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CPU threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()}")
    A = make_matrix(args.n, "power").cuda()
    torch.linalg.svd(A[:256, :256])  # warm up cuSOLVER
    torch.cuda.synchronize()
    rows = []
    t0 = time.perf_counter()
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    torch.cuda.synchronize()
    rows.append(("torch.linalg.svd (GPU)", time.perf_counter() - t0, U[:, : args.k],
                 S[: args.k], Vh[: args.k]))
    ref_U, ref_S, ref_V = rows[0][2], rows[0][3], rows[0][4].T
    for solver, device in (("randomized", "cuda"), ("propack", "cpu"), ("auto", "cpu")):
        if solver not in SOLVERS:
            continue
        truncated_svd(A[:256, :256].to(device), 8, solver=solver)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = truncated_svd(A.to(device), args.k, solver=solver)
        Uc = r.U.cuda()
        torch.cuda.synchronize()
        rows.append((f"truncated_svd({solver!r}) on {device}", time.perf_counter() - t0, Uc,
                     r.S.cuda(), r.Vh.cuda()))
    for name, t, U_, S_, Vh_ in rows:
        print(f"{name:>36}: {t:7.2f} s  σ rel err {float(((S_ - ref_S).abs() / ref_S).max()):.1e}"
              f"  sinθ U {subspace_error(ref_U, U_):.1e}  V {subspace_error(ref_V, Vh_.T):.1e}")


if __name__ == "__main__":
    main()
