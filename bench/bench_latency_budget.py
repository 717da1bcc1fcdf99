"""Wall time of `optimize`'s latency step on vgg11_paper: --latency quick against full.

    python bench/bench_latency_budget.py [--crop 112] [--batches 1,32,128] [--threads 2]
    python bench/bench_latency_budget.py --quick        # batches 1,32, full at 5 s a batch

Exports a random-init vgg11_paper (2 classes) and the same model with FC-2 (classifier.3)
factorized at k=64 into a temporary folder, then runs, in this process, the latency step
of `optimize` (whole model and the FC-2 sub-graph, vanilla against processed):

1. the baseline: ``--latency full`` (the recipe's ``report.latency_seconds`` per batch size
   and model pair, at least 5 runs each: the old default);
2. ``--latency quick`` (the new default: ``report.latency_quick_seconds`` in all, at least
   3 runs per model, batch sizes that do not fit skipped);

and prints both wall times, their ratio, the speed-ups each measured and the batch sizes the
quick budget skipped. Target (issue 12): quick takes a few seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from fairdeploy.commands._deploy import _latency
from fairdeploy.export import ExportOptions, export_onnx
from fairdeploy.lrf import factorize, replace_module
from fairdeploy.models import build_model
from fairdeploy.plan import Plan
from fairdeploy.recipe._sections import ReportSpec


def _models(folder: Path, crop: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = build_model("vgg11_paper", 2).eval()
    x = torch.randn(2, 3, crop, crop)
    vanilla, processed = folder / "vanilla.onnx", folder / "model.onnx"
    export_onnx(model, x, vanilla, options=ExportOptions(simplify=False))
    fc2 = factorize(model.get_submodule("classifier.3"), 64)
    export_onnx(replace_module(model, "classifier.3", fc2), x, processed,
                options=ExportOptions(simplify=False))
    return vanilla, processed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=112, help="input size (112: the paper's)")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-seconds", type=float, default=20.0,
                        help="report.latency_seconds of the full measurement")
    parser.add_argument("--quick", action="store_true",
                        help="batches 1,32 and 5 s per batch for full: a short check")
    args = parser.parse_args()
    batches = [int(b) for b in ("1,32" if args.quick else args.batches).split(",")]
    full_seconds = 5.0 if args.quick else args.full_seconds
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; torch threads "
          f"{torch.get_num_threads()}")
    plan = Plan("truncated_svd", [{"layer": "classifier.3", "rank": 64}])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        vanilla, processed = _models(Path(tmp), args.crop)
        print(f"exported both models in {time.perf_counter() - t0:.1f} s")
        report = ReportSpec(latency_batches=batches, latency_seconds=full_seconds,
                            threads=args.threads)
        exp = SimpleNamespace(recipe=SimpleNamespace(report=report), progress=True)
        times = {}
        for mode in ("full", "quick"):
            t0 = time.perf_counter()
            block = _latency(exp, processed, vanilla, plan, mode)  # type: ignore[arg-type]
            times[mode] = time.perf_counter() - t0
            ups = ", ".join(f"{r['scope']} b{r['batch']} {r['speedup']:.2f}×"
                            for r in block["rows"] if r["speedup"] is not None)
            print(f"{mode:>5}: {times[mode]:6.1f} s  speed-ups: {ups}")
            for s in block["skipped"]:
                print(f"       skipped {s['scope']} batch {s['batch']}: {s['why']}")
        print(f"quick / full wall time: {times['quick'] / times['full']:.3f} "
              f"(quick {times['quick']:.1f} s, full {times['full']:.1f} s)")
        print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
