"""Time Hessian diagonals on the paper's VGG-11 FC-2 head against plain training steps.

Head: FactorizedLinear(4096→4096, k=64) → ReLU → Dropout → Linear(4096, 114) on 1,000
cached 4096-d features (random, ReLU'd), 114 classes, float32, 2 CPU threads. Every
time is the median of a few repeats, all measured in this process. Baselines: one
forward+backward (mean CE, gradients of every parameter) over the 1,000 samples, of the
factorized head and of the dense head (Linear(4096, 4096) in place of the factorized
layer). Run: ``python bench/bench_hessian.py [--repeats 3] [--samples 1000]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy.lrf import FactorizedLinear
from fairdeploy.scoring import hessian_diag


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``fn`` after one warm-up call.

    CPU time is printed too because the bench machine may be shared: other processes
    stretch wall time but barely change the CPU seconds the work itself needs.
    """
    fn()  # warm-up: allocator, thread pool, first-call dispatch, lazy imports
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _heads(din: int, dout: int, k: int, classes: int) -> tuple[nn.Module, nn.Module]:
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(din, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(dout, k, generator=g)).Q.T
    s = 40.0 * torch.exp(-torch.arange(k, dtype=torch.float32) / 16)
    bias = 0.01 * torch.randn(dout, generator=g)
    torch.manual_seed(0)
    out = nn.Linear(dout, classes)
    fact = nn.Sequential(FactorizedLinear(u, s, v, bias), nn.ReLU(), nn.Dropout(0.5), out)
    dense_fc = nn.Linear(din, dout)
    with torch.no_grad():
        dense_fc.weight.copy_(fact[0].dense_weight())
        dense_fc.bias.copy_(bias)
    dense = nn.Sequential(dense_fc, nn.ReLU(), nn.Dropout(0.5), out)
    return fact.eval(), dense.eval()


def _train_step(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    head.zero_grad(set_to_none=True)
    F.cross_entropy(head(x), y).backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-generic", action="store_true", help="skip the generic VJP path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    din = dout = 4096
    k, classes, n = 64, 114, args.samples
    fact, dense = _heads(din, dout, k, classes)
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(n, din, generator=g))
    y = torch.randint(0, classes, (n,), generator=g)

    t_fact = _median_time(lambda: _train_step(fact, x, y), args.repeats)
    t_dense = _median_time(lambda: _train_step(dense, x, y), args.repeats)
    rows: list[tuple[str, tuple[float, float]]] = []
    results: dict[str, dict[str, torch.Tensor]] = {}

    def run(name: str, **kw: object) -> None:
        def call() -> None:
            results[name] = hessian_diag(fact, "0", x, y, **kw)

        rows.append((name, _median_time(call, args.repeats)))

    run("exact (closed form, fast path)", estimator="exact")
    if not args.no_generic:
        run("exact (generic C-fold VJPs)", estimator="exact", fast=False)
    run("fisher", estimator="fisher")
    run("ggn_mc (1 draw)", estimator="ggn_mc", mc_samples=1)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={n}, FC-2 head "
        f"{din}->{dout} k={k} -> ReLU -> Dropout -> Linear({dout}, {classes}), float32, "
        f"median of {args.repeats}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'':36s} {'wall':>9s} {'CPU':>9s}   {'wall ratio vs fwd+bwd':>22s}"
          f"   {'CPU ratio vs fwd+bwd':>21s}")
    print(f"{'':36s} {'ms':>9s} {'ms':>9s}   {'factorized':>11s} {'dense':>10s}"
          f"   {'factorized':>11s} {'dense':>9s}")
    for name, (wall, cpu) in [
        ("reference: fwd+bwd, factorized head", t_fact),
        ("reference: fwd+bwd, dense head", t_dense),
        *rows,
    ]:
        print(
            f"{name:36s} {wall * 1e3:9.1f} {cpu * 1e3:9.1f}   {wall / t_fact[0]:10.2f}x "
            f"{wall / t_dense[0]:9.2f}x   {cpu / t_fact[1]:10.2f}x {cpu / t_dense[1]:8.2f}x"
        )

    exact = results["exact (closed form, fast path)"]
    if "exact (generic C-fold VJPs)" in results:
        gen = results["exact (generic C-fold VJPs)"]
        for key in ("U", "V"):
            rel = ((exact[key] - gen[key]).abs().max() / gen[key].abs().max()).item()
            print(f"fast vs generic exact, {key}: max |Δ| / max |h| = {rel:.2e}")
    for name in ("fisher", "ggn_mc (1 draw)"):
        for key in ("U", "V"):
            est, ref = results[name][key], exact[key]
            rel = ((est - ref).norm() / ref.norm()).item()
            print(f"{name} vs exact, {key}: relative error (Frobenius) {rel:.2f}")


if __name__ == "__main__":
    main()
