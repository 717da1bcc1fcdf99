"""Export time and graph of the dynamo and TorchScript exporters on vgg11_paper.

Exports vgg11_paper (112×112 input) vanilla and with FC-2 (``classifier.3``) factorized at
k=64 and structured-sparse (sr=0.4, rr=0, permutations folded), with both exporters,
alternating them round by round in one process (so machine load hits both alike), and
prints the median ``export_onnx`` time per exporter (the whole call: tracing, graph
build, structure check, ONNX Runtime parity check, atomic write) with the ratio
dynamo ÷ torchscript, and what each graph holds: initializers of FC-2, op counts, file
bytes, max |ONNX Runtime − PyTorch|.

Usage: ``python bench/bench_exporters.py [--rounds 3] [--quick]`` (``--quick``: one round,
factorized model only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from fairdeploy.export import EXPORTERS, ExportOptions, export_onnx
from fairdeploy.lrf import FactorizedLinear, sparsify
from fairdeploy.models import build_model
from fairdeploy.plan import num_selected


def models() -> dict[str, torch.nn.Module]:
    """vgg11_paper vanilla and with a sparse factorized FC-2 (random factors: export cost
    does not depend on their values)."""
    torch.manual_seed(0)
    vanilla = build_model("vgg11_paper", 114).eval()
    k, d = 64, 4096
    fact = FactorizedLinear(torch.randn(d, k) * 0.02, torch.rand(k) + 0.5,
                            torch.randn(k, d) * 0.02, vanilla.classifier[3].bias.detach())
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(d, generator=g)[: num_selected(0.4, d)]
    cols = torch.randperm(d, generator=g)[: num_selected(0.4, d)]
    proc = build_model("vgg11_paper", 114).eval()
    proc.load_state_dict(vanilla.state_dict())
    proc.classifier[3] = sparsify(fact, 0.4, 0.0, rows, cols)
    return {"vanilla": vanilla, "fc2_k64_sr0.4_rr0": proc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"load at start {os.getloadavg()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, onnx {onnx.__version__}")
    nets = models()
    if args.quick:
        args.rounds = 1
        nets = {k: v for k, v in nets.items() if k != "vanilla"}
    x = torch.randn(2, 3, 112, 112)
    with tempfile.TemporaryDirectory() as tmp:
        # Untimed warm-up: the first dynamo export pays for imports and registries.
        small = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
        for exporter in EXPORTERS:
            export_onnx(small, torch.randn(2, 4), Path(tmp) / "w.onnx",
                        options=ExportOptions(exporter=exporter))
        for name, model in nets.items():
            times: dict[str, list[float]] = {e: [] for e in EXPORTERS}
            results = {}
            for r in range(args.rounds):
                order = EXPORTERS if r % 2 == 0 else EXPORTERS[::-1]
                for exporter in order:
                    path = Path(tmp) / f"{name}-{exporter}.onnx"
                    t0 = time.perf_counter()
                    results[exporter] = export_onnx(model, x, path,
                                                    options=ExportOptions(exporter=exporter))
                    times[exporter].append(time.perf_counter() - t0)
            med = {e: statistics.median(t) for e, t in times.items()}
            print(f"\n{name}: median export_onnx time over {args.rounds} round(s), "
                  f"load {os.getloadavg()[0]:.2f}")
            for exporter in EXPORTERS:
                path = Path(tmp) / f"{name}-{exporter}.onnx"
                m = onnx.load(str(path))
                fc2 = {t.name: tuple(t.dims) for t in m.graph.initializer
                       if t.name.startswith("classifier.3.")}
                ops = Counter(n.op_type for n in m.graph.node)
                runs = [round(t, 2) for t in times[exporter]]
                print(f"  {exporter:>11}: {med[exporter]:6.2f} s  (runs {runs}), "
                      f"file {path.stat().st_size / 1e6:.1f} MB, max|ORT − PyTorch| "
                      f"{results[exporter].max_abs_error:.2e}")
                print(f"  {'':>11}  FC-2 initializers {fc2}")
                print(f"  {'':>11}  ops {dict(sorted(ops.items()))}")
            print(f"  dynamo / torchscript time: {med['dynamo'] / med['torchscript']:.2f}×")
    print(f"\nload at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
