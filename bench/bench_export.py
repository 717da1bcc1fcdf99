"""Export sizes and ONNX Runtime latency of factorized and structured-sparse layers.

Run: ``python bench/bench_export.py [--threads 2] [--iters 30] [--skip-vgg] [--json out.json]``

Measures, with the baseline timed in the same process (interleaved runs, worker-thread
spinning off, ``session.intra_op.allow_spinning = 0``):

1. a 4096×4096 Linear vs its k=64 factorization: latency ratio dense/factorized at batch
   1 and 128 against the theoretical FLOP ratio (4096² / (2·4096·64) = 32×);
2. the same layer structured-sparse (sr=0.4, rr=0.5) in the real-smaller-blocks layout
   (permutations folded into the neighbouring Linears) against the same factors stored
   whole with their zeros, and against the run-time Gather layout; stored parameters;
3. the whole vgg11_paper model (112×112) with FC-2 factorized at k=64 against vanilla,
   batch 1 and 32, plus FC-2's own sub-graph; file and initializer sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from fairdeploy.bench import measure_latency, measure_layer_latency
from fairdeploy.export import ExportOptions, export_onnx, layer_table, measured_cr, onnx_sizes
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.plan import kept_entries, num_selected


def factors(din: int, dout: int, k: int, seed: int = 0) -> FactorizedLinear:
    g = torch.Generator().manual_seed(seed)
    return FactorizedLinear(
        torch.randn(din, k, generator=g) / din**0.5,
        torch.rand(k, generator=g) + 0.5,
        torch.randn(k, dout, generator=g) / k**0.5,
        torch.randn(dout, generator=g) * 0.01,
    )


def sparsify_by_hand(f: FactorizedLinear, sr: float, rr: float, seed: int = 1) -> FactorizedLinear:
    """Zero the entries a sparse SVD would (random rows/cols: timing does not depend on which)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(f.in_features, generator=g)[: num_selected(sr, f.in_features)]
    cols = torch.randperm(f.out_features, generator=g)[: num_selected(sr, f.out_features)]
    q = kept_entries(rr, f.rank)
    out = FactorizedLinear(f.U, f.S, f.V, f.bias)
    with torch.no_grad():
        out.U[rows[:, None], torch.arange(q, f.rank)[None]] = 0
        out.V[torch.arange(q, f.rank)[:, None], cols[None]] = 0
    out.sparse_rows, out.sparse_cols, out.keep = rows, cols, q
    return out


def line(msg: str) -> None:
    print(msg, flush=True)


def bench_layer(tmp: Path, threads: int, iters: int) -> dict:
    d = 4096
    k = 64
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(d, d)).eval()
    fact = nn.Sequential(factors(d, d, k)).eval()
    x = torch.randn(2, d)
    export_onnx(dense, x, tmp / "dense.onnx")
    export_onnx(fact, x, tmp / "fact.onnx")
    theory = d * d / (2 * d * k)
    res = measure_latency(tmp / "fact.onnx", tmp / "dense.onnx", batches=(1, 128),
                          threads=threads, warmup=5, iters=iters, label="4096x4096 k=64")
    for s in res.summary_lines():
        line(s)
    # Blocks mode with spinning on: how the ratio reads when sessions are timed apart.
    blocks = measure_latency(tmp / "fact.onnx", tmp / "dense.onnx", batches=(1, 128),
                             threads=threads, warmup=5, iters=iters, interleaved=False,
                             spinning=True, label="4096x4096 k=64 (blocks, spinning on)")
    for s in blocks.summary_lines():
        line(s)
    out = {
        "theoretical_flop_ratio": theory,
        "interleaved_no_spin": {str(b): r for b, r in res.ratios.items()},
        "blocks_spinning": {str(b): r for b, r in blocks.ratios.items()},
    }
    line(f"theoretical FLOP ratio {theory:.1f}x; measured at batch 128: "
         f"{res.ratios[128]:.1f}x ({res.ratios[128] / theory:.0%} of theory)")
    return out


def bench_sparse(tmp: Path, threads: int, iters: int, sr: float = 0.4, rr: float = 0.5) -> dict:
    d, k = 4096, 64
    torch.manual_seed(0)
    sp = sparsify_by_hand(factors(d, d, k), sr, rr)
    model = nn.Sequential(nn.Linear(256, d), nn.ReLU(), sp, nn.ReLU(), nn.Linear(d, 16)).eval()
    x = torch.randn(2, 256)
    paths = {
        "blocks_folded": tmp / "sp_folded.onnx",
        "blocks_gather": tmp / "sp_gather.onnx",
        "dense_with_zeros": tmp / "sp_zeros.onnx",
    }
    export_onnx(model, x, paths["blocks_folded"])
    export_onnx(model, x, paths["blocks_gather"], options=ExportOptions(fold_permutations=False))
    export_onnx(model, x, paths["dense_with_zeros"], options=ExportOptions(sparse_layout=False))
    stored = {name: layer_table(p)[0]["measured_params"] for name, p in paths.items()}
    zeroed = (num_selected(sr, d) * 2) * (k - kept_entries(rr, k))
    full = 2 * d * k
    theory = full / (full - zeroed)
    line(f"structured sparse sr={sr} rr={rr}: stored layer params {stored} "
         f"({1 - stored['blocks_folded'] / stored['dense_with_zeros']:.1%} fewer than with "
         f"zeros); theoretical FLOP ratio of the factor MatMuls {theory:.3f}x")
    out: dict = {"stored_params": stored, "theoretical_ratio": theory, "ratios": {}}
    for name in ("blocks_folded", "blocks_gather"):
        res = measure_layer_latency(paths[name], "2", paths["dense_with_zeros"],
                                    batches=(1, 128), threads=threads, warmup=5,
                                    iters=iters * 2, label=f"layer 2 {name} vs dense-with-zeros")
        for s in res.summary_lines():
            line(s)
        out["ratios"][name] = {str(b): r for b, r in res.ratios.items()}
    return out


def bench_vgg(tmp: Path, threads: int, iters: int) -> dict:
    from fairdeploy.models import build_model

    torch.manual_seed(0)
    vanilla = build_model("vgg11_paper", 2).eval()
    proc = build_model("vgg11_paper", 2).eval()
    proc.load_state_dict(vanilla.state_dict())
    fc2 = vanilla.classifier[3]
    k = 64
    # A randomized truncated SVD: the benchmark is about latency, not approximation error.
    U, S, V = torch.svd_lowrank(fc2.weight.detach().T, q=k + 8, niter=2)
    proc.classifier[3] = FactorizedLinear(U[:, :k], S[:k], V[:, :k].T, fc2.bias.detach())
    x = torch.randn(1, 3, 112, 112)
    t0 = time.perf_counter()
    export_onnx(vanilla, x, tmp / "vgg_vanilla.onnx")
    t1 = time.perf_counter()
    export_onnx(proc, x, tmp / "vgg_fc2.onnx")
    t2 = time.perf_counter()
    line(f"vgg11_paper export: vanilla {t1 - t0:.1f} s, factorized {t2 - t1:.1f} s")
    sizes = {n: onnx_sizes(tmp / f"{n}.onnx") for n in ("vgg_vanilla", "vgg_fc2")}
    cr = measured_cr(tmp / "vgg_vanilla.onnx", tmp / "vgg_fc2.onnx")
    line(f"vgg11_paper sizes {sizes}; measured C.R. {cr}")
    res = measure_latency(tmp / "vgg_fc2.onnx", tmp / "vgg_vanilla.onnx", batches=(1, 32),
                          threads=threads, warmup=2, iters=max(5, iters // 3),
                          label="vgg11_paper FC-2 k=64")
    for s in res.summary_lines():
        line(s)
    layer = measure_layer_latency(tmp / "vgg_fc2.onnx", "classifier.3", tmp / "vgg_vanilla.onnx",
                                  batches=(1, 32), threads=threads, warmup=5, iters=iters,
                                  label="vgg11_paper classifier.3 sub-graph")
    for s in layer.summary_lines():
        line(s)
    return {
        "export_s": {"vanilla": t1 - t0, "factorized": t2 - t1},
        "sizes": sizes,
        "measured_cr": cr,
        "model": res.to_dict(),
        "layer": layer.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    results: dict = {"threads": args.threads, "provider": "CPUExecutionProvider",
                     "timing": "interleaved, spinning off (unless marked)"}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        results["layer_4096_k64"] = bench_layer(t, args.threads, args.iters)
        results["sparse_sr0.4_rr0.5"] = bench_sparse(t, args.threads, args.iters)
        if not args.skip_vgg:
            results["vgg11_paper"] = bench_vgg(t, args.threads, args.iters)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
