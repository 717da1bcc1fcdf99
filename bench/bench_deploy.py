"""Deployed compression and latency of dead-neuron elimination; the two sparse layouts.

Run: ``python bench/bench_deploy.py [--quick] [--threads 2] [--iters 20] [--skip-vgg]
[--skip-layout] [--json out.json]``

Every ratio is baseline ÷ candidate from sessions timed in the same process, interleaved,
worker-thread spinning off; the machine's load average is printed before and after.

1. ``vgg11_paper`` in the paper's Fitzpatrick setting (114 classes, FC-2 ``classifier.3``
   at k=64, sr 0.4, rr 0; random weights and a random selection of rows/columns: bytes and
   latency do not depend on which): the three compression figures (the paper's layer-only
   accounting, the deployed parameter ratio from shapes and from the file, file bytes) and
   latency at batch 1 and 32 of the export with elimination against vanilla and against the
   export without it, for the whole model and for FC-1 / FC-2 / FC-3 alone.
2. A 4096×4096 layer at k=64, sr 0.4, between two Linears, rr 0.5 and rr 0: the ``blocks``
   layout (real smaller blocks: Slice + MatMul + Concat) against ``zeros`` (factors stored
   whole), the layer's own sub-graph and the whole 3-layer model, batch 1/32/128, with the
   stored parameters; for rr 0 also with elimination.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import factors, sparsify_by_hand

from fairdeploy.bench import measure_latency, measure_layer_latency
from fairdeploy.compression import layer_table, theoretical_cr
from fairdeploy.export import ExportOptions, deployed_params, export_onnx, onnx_sizes
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.plan import LayerPlan, Plan


def line(msg: str) -> None:
    print(msg, flush=True)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def _timing(res, label: str) -> dict:
    for s in res.summary_lines():
        line(s)
    return {"label": label, **res.to_dict()}


def bench_vgg(tmp: Path, threads: int, iters: int, batches: tuple[int, ...]) -> dict:
    from fairdeploy.models import build_model

    torch.manual_seed(0)
    vanilla = build_model("vgg11_paper", 114).eval()
    fc2 = vanilla.classifier[3]
    k, sr, rr = 64, 0.4, 0.0
    # A randomized truncated SVD: the benchmark is about bytes and latency, not error.
    U, S, V = torch.svd_lowrank(fc2.weight.detach().T, q=k + 8, niter=2)
    fact = FactorizedLinear(U[:, :k].contiguous(), S[:k].contiguous(),
                            V[:, :k].T.contiguous(), fc2.bias.detach())
    proc = build_model("vgg11_paper", 114).eval()
    proc.load_state_dict(vanilla.state_dict())
    proc.classifier[3] = sparsify_by_hand(fact, sr, rr)
    x = torch.randn(2, 3, 112, 112)
    paths = {name: tmp / f"vgg_{name}.onnx" for name in ("vanilla", "plain", "eliminated")}
    t0 = time.perf_counter()
    export_onnx(vanilla, x, paths["vanilla"])
    export_onnx(proc, x, paths["plain"])
    t1 = time.perf_counter()
    res = export_onnx(proc, x, paths["eliminated"], options=ExportOptions(eliminate_dead=True))
    t2 = time.perf_counter()
    line(f"vgg11_paper export: without elimination {(t1 - t0) / 2:.1f} s each, "
         f"with {t2 - t1:.1f} s")
    lay = res.layers[0]
    line(f"FC-2 record: input {lay.input_elimination} ({lay.eliminated_inputs}), "
         f"output {lay.output_elimination} ({lay.eliminated_outputs})")

    with torch.device("meta"):
        meta = build_model("vgg11_paper", 114)
    plan = Plan("fairlrf", layers=(LayerPlan("classifier.3", k, sr, rr, 5 / 9),))
    rows = layer_table(meta, plan)
    shape = deployed_params(meta, rows, example_input=torch.empty(1, 3, 112, 112, device="meta"))
    shape_off = deployed_params(meta, rows, eliminate=False)
    sizes = {name: onnx_sizes(p) for name, p in paths.items()}
    van = sizes["vanilla"]
    cr = {
        "paper_theoretical": theoretical_cr(meta, plan),
        "deployed_params_from_shapes": shape.ratio,
        "deployed_params_from_file": van["parameters"] / sizes["eliminated"]["parameters"],
        "initializer_bytes": van["initializer_bytes"] / sizes["eliminated"]["initializer_bytes"],
        "file_bytes": van["file_bytes"] / sizes["eliminated"]["file_bytes"],
        "without_elimination": {
            "params_from_shapes": shape_off.ratio,
            "params_from_file": van["parameters"] / sizes["plain"]["parameters"],
            "file_bytes": van["file_bytes"] / sizes["plain"]["file_bytes"],
        },
    }
    line(f"vgg11_paper Fitzpatrick setting C.R.: paper {cr['paper_theoretical']:.3f}; deployed "
         f"parameters {cr['deployed_params_from_shapes']:.3f} (shapes) / "
         f"{cr['deployed_params_from_file']:.3f} (file); file bytes {cr['file_bytes']:.3f}; "
         f"without elimination {cr['without_elimination']['params_from_file']:.3f} params, "
         f"{cr['without_elimination']['file_bytes']:.3f} bytes")
    mb = {n: round(s["file_bytes"] / 1e6, 1) for n, s in sizes.items()}
    line(f"file MB: {mb}")

    out: dict = {"sizes": sizes, "cr": cr, "layer": lay.to_dict(), "latency": {}}
    common = dict(batches=batches, threads=threads, warmup=2, iters=iters, max_seconds=60.0)
    pairs = {
        "eliminated_vs_vanilla": (paths["eliminated"], paths["vanilla"]),
        "eliminated_vs_plain": (paths["eliminated"], paths["plain"]),
    }
    for name, (cand, base) in pairs.items():
        out["latency"][f"model_{name}"] = _timing(
            measure_latency(cand, base, label=f"vgg11_paper whole model, {name}", **common),
            name,
        )
    sub = dict(batches=batches, threads=threads, warmup=5, iters=iters * 5)
    for layer in ("classifier.0", "classifier.3", "classifier.6"):
        for name, (cand, base) in pairs.items():
            out["latency"][f"{layer}_{name}"] = _timing(
                measure_layer_latency(cand, layer, base, label=f"{layer} {name}", **sub),
                f"{layer} {name}",
            )
    return out


def bench_layouts(tmp: Path, threads: int, iters: int, batches: tuple[int, ...]) -> dict:
    d, k, sr = 4096, 64, 0.4
    out: dict = {}
    for rr in (0.5, 0.0):
        torch.manual_seed(0)
        sp = sparsify_by_hand(factors(d, d, k), sr, rr)
        model = nn.Sequential(nn.Linear(256, d), nn.ReLU(), sp, nn.ReLU(), nn.Linear(d, 16)).eval()
        x = torch.randn(2, 256)
        variants = {
            "blocks": dict(sparse_layout="blocks"),
            "zeros": dict(sparse_layout="zeros"),
        }
        if rr == 0.0:
            variants["blocks_eliminated"] = dict(sparse_layout="blocks", eliminate_dead=True)
        paths, stored = {}, {}
        for name, kw in variants.items():
            paths[name] = tmp / f"layout_rr{rr}_{name}.onnx"
            res = export_onnx(model, x, paths[name], options=ExportOptions(**kw))
            stored[name] = {"layer": res.layers[0].stored_params, "model": res.deployed_params,
                            "file_bytes": onnx_sizes(paths[name])["file_bytes"]}
        line(f"layouts rr={rr}: stored {stored}")
        entry: dict = {"stored": stored, "latency": {}}
        for name in variants:
            if name == "zeros":
                continue
            res = measure_layer_latency(paths[name], "2", paths["zeros"], batches=batches,
                                        threads=threads, warmup=5, iters=iters * 5,
                                        label=f"layer rr={rr} {name} vs zeros")
            entry["latency"][f"layer_{name}_vs_zeros"] = _timing(res, name)
            res = measure_latency(paths[name], paths["zeros"], batches=batches, threads=threads,
                                  warmup=5, iters=iters * 3,
                                  label=f"3-layer model rr={rr} {name} vs zeros")
            entry["latency"][f"model_{name}_vs_zeros"] = _timing(res, name)
        out[f"rr{rr}"] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true",
                    help="few iterations (numbers are indicative only)")
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--skip-layout", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    iters = 3 if args.quick else args.iters
    warnings.simplefilter("ignore", UserWarning)
    results: dict = {"threads": args.threads, "provider": "CPUExecutionProvider",
                     "timing": "interleaved, spinning off", "load_before": load()}
    line(results["load_before"])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if not args.skip_layout:
            results["layouts"] = bench_layouts(t, args.threads, iters, (1, 32, 128))
        if not args.skip_vgg:
            results["vgg11_paper"] = bench_vgg(t, args.threads, iters, (1, 32))
    results["load_after"] = load()
    line(results["load_after"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
