"""Packed weights on ONNX Runtime's CUDA provider: folded at load, same outputs, same speed.

Run: ``python bench/gpu_packed_check.py [--q 0.2] [--iters 50]`` on a machine with
onnxruntime-gpu and a GPU (prints a line and exits 0 otherwise).

vgg11_paper with a fraction q of all weights quantized (random masks) is exported dense and
packed; with ``CUDAExecutionProvider`` the script checks that the optimized graph (``basic``
level) holds none of the rebuild ops (constant folding runs on the CPU before the graph is
partitioned), that outputs equal the dense export's bit for bit, and times session creation
and inference (batch 1 and 32, interleaved).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_packed import export, quantize_fraction

from fairdeploy.bench import measure_latency
from fairdeploy.export import pack_weights
from fairdeploy.models import build_model

REBUILD_OPS = {"BitwiseAnd", "CumSum", "Where"}


def session(path: Path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = level
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--q", type=float, default=0.2)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("CUDAExecutionProvider not available: nothing to check")
        return
    torch.manual_seed(0)
    model = build_model("vgg11_paper", 2).eval()
    specs = quantize_fraction(model, args.q, seed=1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        dense = export(model, torch.randn(1, 3, 112, 112), tmp / "dense.onnx")
        _, report = pack_weights(dense, specs, output_path=tmp / "packed.onnx")
        packed = tmp / "packed.onnx"
        print(f"packed {sum(t.stored == 'packed' for t in report.tensors)}/{len(report.tensors)}"
              f" tensors, initializer C.R. {report.initializer_ratio:.4f}")
        s = session(packed, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, tmp / "opt.onnx")
        print(f"session provider: {s.get_providers()[0]}")
        ops = {n.op_type for n in onnx.load(str(tmp / "opt.onnx")).graph.node}
        print(f"rebuild ops left after optimization: {sorted(ops & REBUILD_OPS) or 'none'}")
        x = np.random.default_rng(0).standard_normal((8, 3, 112, 112)).astype(np.float32)
        a = session(dense).run(None, {"input": x})[0]
        b = session(packed).run(None, {"input": x})[0]
        print(f"outputs bit-identical to the dense export on CUDA: {np.array_equal(a, b)} "
              f"(max |Δ| {float(np.abs(a - b).max()):.3g})")
        times: dict[str, list[float]] = {"dense": [], "packed": []}
        for _ in range(3):
            for name, path in (("dense", dense), ("packed", packed)):
                t0 = time.perf_counter()
                session(path)
                times[name].append(time.perf_counter() - t0)
        td, tp = statistics.median(times["dense"]), statistics.median(times["packed"])
        print(f"session creation (CUDA): dense {td:.3f} s, packed {tp:.3f} s (×{tp / td:.2f})")
        lat = measure_latency(packed, dense, batches=(1, 32), provider="cuda", warmup=10,
                              iters=args.iters, label="packed vs dense (CUDA)")
        for line in lat.summary_lines():
            print(line)


if __name__ == "__main__":
    main()
