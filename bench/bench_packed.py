"""Packed int8 / pruned weight storage (``fairdeploy.export.pack_weights``) on vgg11_paper.

Run: ``python bench/bench_packed.py [--quick] [--q 0.1,0.2] [--p 0.35,0.55] [--batches 1,32]
[--classes 2] [--iters 20] [--threads 2] [--provider cpu] [--skip-latency] [--skip-prune]
[--json out.json]``

Measures, with every baseline in the same process:

1. bytes: vanilla export vs the packed export of the same model with a fraction q (10 %,
   20 %) of ALL Linear and Conv2d weights quantized to int8 per output channel (random
   masks: bytes do not depend on which entries), initializer and file bytes, against the
   theoretical ratio with the mask's bit, 32 / (32 − 24q + 1), and the 95 % target;
2. ONNX Runtime folds the rebuild: the optimized graphs (``basic`` level) of the packed and
   the dense export of the same de-quantized weights hold the same ops and bit-identical
   initializers; outputs are bit-identical;
3. session load time, packed vs dense vs ``fairdeploy unpack``'s unpacked file (interleaved,
   median of repeats), and OpenVINO's read + compile time of the same files beside it when
   ``openvino`` is installed (issue 19: packed ≤ 1.5× dense is the target);
4. latency, packed vs dense, batch 1 and 32, interleaved, worker-thread spinning off
   (``fairdeploy.bench.measure_latency``): the ratio must be within 5 % of 1;
5. pruning (FairPrune, 35 % and 55 % of all weights): the same packed form vs ONNX
   ``sparse_initializer`` (COO, int64 linear indices as the ONNX checker requires, and int32
   indices, which the checker rejects): does ONNX Runtime load it, what does it weigh.

Prints ``uptime``'s load with the numbers: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from fairdeploy.bench import measure_latency
from fairdeploy.export import PackSpec, export_onnx, onnx_sizes, pack_weights, unpack_weights
from fairdeploy.models import build_model


def line(msg: str = "") -> None:
    print(msg, flush=True)


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def weights(model: nn.Module) -> dict[str, nn.Module]:
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def quantize_fraction(model: nn.Module, q: float, seed: int) -> dict[str, PackSpec]:
    """Quantize a random fraction q of every weight per output channel (symmetric int8),
    in place; the PackSpecs."""
    g = torch.Generator().manual_seed(seed)
    specs = {}
    for name, m in weights(model).items():
        w = m.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        scale = (flat.abs().amax(dim=1) / 127).clamp_min(1e-12).float()
        qv = torch.clamp(torch.round(flat / scale[:, None]), -127, 127).to(torch.int8)
        mask = (torch.rand(flat.shape, generator=g) < q)
        deq = torch.where(mask, qv.float() * scale[:, None], flat).reshape(w.shape)
        with torch.no_grad():
            m.weight.copy_(deq)
        specs[name] = PackSpec(weight=deq.clone(), quantized=mask.reshape(w.shape),
                               int8_values=qv.reshape(w.shape), scales=scale)
    return specs


def prune_fraction(model: nn.Module, p: float, seed: int) -> dict[str, PackSpec]:
    g = torch.Generator().manual_seed(seed)
    specs = {}
    for name, m in weights(model).items():
        mask = torch.rand(m.weight.shape, generator=g) < p
        with torch.no_grad():
            m.weight[mask] = 0
        specs[name] = PackSpec(weight=m.weight.detach().clone(), pruned=mask)
    return specs


def export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, x, path)
    return path


def session(path: Path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=None,
            threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def folded_like_dense(packed: Path, dense: Path, tmp: Path) -> bool:
    """The optimized graphs hold the same ops and bit-identical initializers."""
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session(packed, basic, tmp / "p.opt.onnx")
    session(dense, basic, tmp / "d.opt.onnx")
    a, b = onnx.load(str(tmp / "p.opt.onnx")), onnx.load(str(tmp / "d.opt.onnx"))
    same_ops = [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    same = set(ia) == set(ib) and all(
        ia[k].dtype == ib[k].dtype and np.array_equal(ia[k].view(np.uint8), ib[k].view(np.uint8))
        for k in ib
    )
    for f in ("p.opt.onnx", "d.opt.onnx"):
        (tmp / f).unlink()
    return same_ops and same


def openvino_compile(path: Path, threads: int) -> None:
    import openvino as ov

    core = ov.Core()
    core.compile_model(core.read_model(str(path)), "CPU",
                       {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})


def load_times(packed: Path, dense: Path, repeats: int, threads: int) -> dict[str, float]:
    """Median seconds to create an ONNX Runtime session (graph optimizations on) of the
    dense, packed and unpacked (``unpack_weights``) files, interleaved; with OpenVINO
    installed, its read + compile time of each (``openvino_*``)."""
    from fairdeploy.runtimes import runtime_available

    unpacked = packed.with_name("unpacked.onnx")
    unpack_weights(packed, unpacked)
    files = (("dense", dense), ("packed", packed), ("unpacked", unpacked))
    loaders = [("", lambda p: session(p, threads=threads))]
    if runtime_available("openvino"):
        loaders.append(("openvino_", lambda p: openvino_compile(p, threads)))
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for prefix, make in loaders:
            for name, path in files:
                t0 = time.perf_counter()
                make(path)
                times.setdefault(prefix + name, []).append(time.perf_counter() - t0)
    unpacked.unlink()
    return {k: statistics.median(v) for k, v in times.items()}


def openvino_error(packed: Path, ref: np.ndarray, x: np.ndarray) -> float | None:
    """max |OpenVINO(packed) − ONNX Runtime(dense)| on ``x`` (None without openvino): the
    packed file's logits in the runtime that read the old mask trick wrong."""
    from fairdeploy.runtimes import load_runtime, runtime_available

    if not runtime_available("openvino"):
        return None
    got = load_runtime(packed, "openvino").run({"input": x})[0]
    return float(np.abs(got.astype(np.float64) - ref).max())


def load_line(lt: dict[str, float]) -> str:
    """The load times and their ratios to the dense file, in one line."""
    out = []
    for prefix, what in (("", "ORT session"), ("openvino_", "OpenVINO compile")):
        if prefix + "dense" not in lt:
            continue
        d = lt[prefix + "dense"]
        out.append(f"{what}: dense {d:.3f} s, packed {lt[prefix + 'packed']:.3f} s "
                   f"(×{lt[prefix + 'packed'] / d:.2f}), unpacked "
                   f"{lt[prefix + 'unpacked']:.3f} s (×{lt[prefix + 'unpacked'] / d:.2f})")
    return "; ".join(out)


def sparse_initializer_model(dense: Path, specs: dict[str, PackSpec], out: Path,
                             index_dtype=np.int64) -> Path:
    """The dense export with each pruned weight as a COO sparse_initializer (linear indices)."""
    model = onnx.load(str(dense))
    keep = []
    names = set(specs)
    sparse = []
    for t in model.graph.initializer:
        if t.name in names:
            arr = numpy_helper.to_array(t).reshape(-1)
            idx = np.flatnonzero(arr != 0)
            sparse.append(helper.make_sparse_tensor(
                numpy_helper.from_array(arr[idx], t.name),
                numpy_helper.from_array(idx.astype(index_dtype), t.name + ".indices"),
                list(t.dims),
            ))
        else:
            keep.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.sparse_initializer.extend(sparse)
    onnx.save(model, str(out))
    return out


def try_sparse(dense: Path, specs: dict[str, PackSpec], out: Path, index_dtype, x: np.ndarray,
               ref: np.ndarray) -> dict:
    path = sparse_initializer_model(dense, specs, out, index_dtype)
    res: dict = {"index_dtype": np.dtype(index_dtype).name, **onnx_sizes(path)}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        res["checker"] = "passes"
    except Exception as exc:
        res["checker"] = f"fails: {str(exc).splitlines()[0][:120]}"
    try:
        got = session(path).run(None, {"input": x})[0]
        same = np.array_equal(got, ref)
        res["ort"] = "loads, outputs bit-identical" if same else "loads, outputs differ"
    except Exception as exc:
        res["ort"] = f"fails: {str(exc).splitlines()[0][:120]}"
    path.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="q = 20 %% and p = 55 %% only, batch 1 only, few iterations")
    ap.add_argument("--q", default="0.1,0.2", help="quantized fractions")
    ap.add_argument("--p", default="0.35,0.55", help="pruned fractions")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--provider", default="cpu", help="latency provider: cpu or cuda")
    ap.add_argument("--classes", type=int, default=2, help="2: CelebA setting; 114: Fitzpatrick")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load-repeats", type=int, default=5)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(v) for v in text.split(",") if v)

    qs = (0.2,) if args.quick else floats(args.q)
    ps = (0.55,) if args.quick else floats(args.p)
    batches = (1,) if args.quick else tuple(int(b) for b in args.batches.split(","))
    iters = 5 if args.quick else args.iters
    torch.set_num_threads(args.threads)
    results: dict = {"load_start": load(), "classes": args.classes, "quantized": [],
                     "pruned": []}
    line(f"bench_packed: vgg11_paper, {args.classes} classes, {load()}")
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    xb = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1)).numpy()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        vanilla_model = build_model("vgg11_paper", args.classes).eval()
        vanilla = export(vanilla_model, x, tmp / "vanilla.onnx")
        sv = onnx_sizes(vanilla)
        line(f"vanilla: {sv['initializer_bytes']} initializer bytes, {sv['file_bytes']} file "
             f"bytes, {sv['parameters']} parameters")
        for q in qs:
            model = build_model("vgg11_paper", args.classes).eval()
            model.load_state_dict(vanilla_model.state_dict())
            specs = quantize_fraction(model, q, seed=int(q * 1000))
            nq = sum(int(s.quantized.sum()) for s in specs.values())
            nw = sum(s.weight.numel() for s in specs.values())
            dense = export(model, x, tmp / "dense.onnx")
            t0 = time.perf_counter()
            _, report = pack_weights(dense, specs, output_path=tmp / "packed.onnx")
            pack_s = time.perf_counter() - t0
            packed = tmp / "packed.onnx"
            sp = onnx_sizes(packed)
            theory = 32 / (32 - 24 * q + 1)
            r = {
                "q": q, "q_drawn": nq / nw,
                "theoretical_cr_paper": 32 / (32 - 24 * q),
                "theoretical_cr_with_mask": theory,
                "target_95pct": 0.95 * theory,
                "initializer_cr": sv["initializer_bytes"] / sp["initializer_bytes"],
                "file_cr": sv["file_bytes"] / sp["file_bytes"],
                "packed_tensors": sum(t.stored == "packed" for t in report.tensors),
                "tensors": len(report.tensors),
                "pack_seconds": pack_s,
            }
            ref = session(dense).run(None, {"input": xb})[0]
            got = session(packed).run(None, {"input": xb})[0]
            r["outputs_bit_identical"] = bool(np.array_equal(ref, got))
            r["openvino_max_abs_error"] = openvino_error(packed, ref, xb)
            r["folded_like_dense"] = folded_like_dense(packed, dense, tmp)
            r["session_load_s"] = load_times(packed, dense, args.load_repeats, args.threads)
            line(f"q={q:.0%} (drawn {r['q_drawn']:.4f}): C.R. initializers "
                 f"{r['initializer_cr']:.4f}, file {r['file_cr']:.4f}; theory 32/(33-24q) = "
                 f"{theory:.4f}, 95 % target {r['target_95pct']:.4f}, paper 32/(32-24q) = "
                 f"{r['theoretical_cr_paper']:.4f}; {r['packed_tensors']}/{r['tensors']} tensors "
                 f"packed in {pack_s:.1f} s")
            line(f"  outputs bit-identical to dense export: {r['outputs_bit_identical']}; "
                 f"ORT-optimized graph equals dense: {r['folded_like_dense']}; OpenVINO "
                 f"max |Δ| to the dense file in ORT: {r['openvino_max_abs_error']}")
            line(f"  load: {load_line(r['session_load_s'])}, {load()}")
            if not args.skip_latency:
                lat = measure_latency(packed, dense, batches=batches, threads=args.threads,
                                      provider=args.provider, warmup=2, iters=iters,
                                      label=f"packed q={q:.0%} vs dense", max_seconds=60)
                for s in lat.summary_lines():
                    line("  " + s)
                r["latency"] = lat.to_dict()
                line(f"  {load()}")
            results["quantized"].append(r)
            for f in ("dense.onnx", "packed.onnx"):
                (tmp / f).unlink()
        if not args.skip_prune:
            for p in ps:
                model = build_model("vgg11_paper", args.classes).eval()
                model.load_state_dict(vanilla_model.state_dict())
                specs = prune_fraction(model, p, seed=int(p * 1000) + 1)
                dense = export(model, x, tmp / "dense.onnx")
                _, report = pack_weights(dense, specs, output_path=tmp / "packed.onnx")
                sp = onnx_sizes(tmp / "packed.onnx")
                ref = session(dense).run(None, {"input": xb})[0]
                got = session(tmp / "packed.onnx").run(None, {"input": xb})[0]
                r = {
                    "p": p,
                    "theoretical_cr_packed": 32 / ((1 - p) * 32 + 1),
                    "packed_initializer_cr": sv["initializer_bytes"] / sp["initializer_bytes"],
                    "packed_file_cr": sv["file_bytes"] / sp["file_bytes"],
                    "packed_outputs_bit_identical": bool(np.array_equal(ref, got)),
                    "openvino_max_abs_error": openvino_error(tmp / "packed.onnx", ref, xb),
                    "packed_folded_like_dense": folded_like_dense(tmp / "packed.onnx", dense, tmp),
                    "sparse_initializer": [],
                    "session_load_s": load_times(tmp / "packed.onnx", dense, args.load_repeats,
                                                 args.threads),
                }
                line(f"pruned p={p:.0%}: packed C.R. initializers {r['packed_initializer_cr']:.4f}"
                     f", file {r['packed_file_cr']:.4f} (theory 32/((1-p)32+1) = "
                     f"{r['theoretical_cr_packed']:.4f}); bit-identical "
                     f"{r['packed_outputs_bit_identical']}, folded {r['packed_folded_like_dense']}"
                     f", OpenVINO max |Δ| {r['openvino_max_abs_error']}")
                line(f"  load: {load_line(r['session_load_s'])}, {load()}")
                for dt in (np.int64, np.int32):
                    s = try_sparse(dense, specs, tmp / "sparse.onnx", dt, xb, ref)
                    s["initializer_cr"] = sv["initializer_bytes"] / s["initializer_bytes"]
                    s["file_cr"] = sv["file_bytes"] / s["file_bytes"]
                    line(f"  sparse_initializer ({s['index_dtype']} indices): C.R. initializers "
                         f"{s['initializer_cr']:.4f}, file {s['file_cr']:.4f}; checker "
                         f"{s['checker']}; ORT {s['ort']}")
                    r["sparse_initializer"].append(s)
                results["pruned"].append(r)
                for f in ("dense.onnx", "packed.onnx"):
                    (tmp / f).unlink()
    results["load_end"] = load()
    line(f"done, {load()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
