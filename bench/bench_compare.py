"""`compare` over the paper's seven rows against `optimize` with FairLRF alone, the methods'
own costs, and FairQuantize's packed file (bytes, load time, latency) on vgg11_paper.

    python bench/bench_compare.py [--images 240] [--classes 2] [--threads 2] [--quick]
                                  [--modes head,trunk] [--estimator exact] [--repeats 2]
                                  [--rounds 1]

Builds a fixture image_csv dataset (random 128×128 JPEGs) and a random-init vgg11_paper
checkpoint in a temporary folder, then measures in this process:

1. wall time of ``optimize`` with FairLRF alone (FC-2, k=64, sr 0.4, rr 0; export, verify,
   report; no latency; empty feature cache) — the baseline;
2. wall time of ``compare`` over vanilla, truncated SVD, SLR-w, SLR-a, FairPrune (35 %,
   β 1/3), FairQuantize (20 %, β 5/9) and FairLRF, every row exported and verified, with
   an empty cache: ``head`` mode puts the two weight methods on FC-1, FC-2 and FC-3 (cached
   features serve them; target ≤ 3× the baseline), ``trunk`` mode on every Linear and
   Conv2d (``layers: all``: the whole model runs for their Hessians and evaluation; the
   figure is reported, no target);
3. each method's own cost (``Experiment.apply`` with the in-memory caches emptied, features
   already cached; interleaved, median of ``--repeats``): FairLRF (SVD + Hessians of U, V
   + selection, and without the SVD) against FairPrune and FairQuantize (Hessians of the
   chosen dense weights + selection) with the head's layers and with all layers;
4. from the trunk-mode compare run (every weight chosen, q = 20 %): FairQuantize's measured
   initializer-byte C.R. against 32/(32 − 24q + 1) (target ≥ 95 %), ONNX Runtime session
   creation of the packed file against the vanilla file, and its latency against vanilla
   (batch 1 and 32, interleaved, spinning off; target within 5 %).

Every ratio compares runs made in this process. The machine's load average is printed with
the numbers: on a shared machine, quote ratios, and re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _image_fixture import FAIRLRF_FC2_RECIPE, image_csv_fixture, power_law_fc2

from fairdeploy.commands.compare import run_compare
from fairdeploy.commands.optimize import run_optimize
from fairdeploy.experiment import Experiment
from fairdeploy.models import build_model

#: The shared FairLRF recipe (FC-2, k=64, sr 0.4, rr 0) with the paper's seven rows.
RECIPE = FAIRLRF_FC2_RECIPE.replace("name: bench\n", "name: bench-compare\n").replace(
    "num_classes: 4", "num_classes: {classes}"
) + """\
compare:
  - vanilla
  - truncated_svd
  - slr_w
  - slr_a
  - {{name: fairprune, prune_ratio: 0.35, beta: 1/3, layers: {layers},
     scoring: {{estimator: {estimator}, samples_per_group: {per_group}, batch_size: 32}}}}
  - {{name: fairquantize, quantize_ratio: 0.20, beta: 5/9, layers: {layers},
     scoring: {{estimator: {estimator}, samples_per_group: {per_group}, batch_size: 32}}}}
  - fairlrf
"""

HEAD_LAYERS = "[classifier.0, classifier.3, classifier.6]"


def _load() -> str:
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def _recipe(tmp: Path, csv: Path, args: argparse.Namespace, layers: str, name: str) -> Path:
    path = tmp / name
    path.write_text(RECIPE.format(
        classes=args.classes, csv=csv, per_group=args.images // 8, verify=args.images // 8,
        layers=layers, estimator=args.estimator,
    ))
    return path


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _method_costs(ckpt: Path, recipe: Path, repeats: int) -> dict[str, float]:
    """Median wall seconds of Experiment.apply per method, in-memory caches emptied before
    each (trunk features stay cached: every method reads the same ones)."""
    exp = Experiment(recipe, ckpt)
    plans = {p.method: p for p in exp.recipe.plans}
    head = {m: plans[m] for m in ("fairprune", "fairquantize")}
    every = {m: p.model_copy(update={"layers": "all"}) for m, p in head.items()}
    runs = {"fairlrf": plans["fairlrf"], "fairlrf (SVD cached)": plans["fairlrf"],
            **{f"{m} (FC layers)": p for m, p in head.items()},
            **{f"{m} (all layers)": p for m, p in every.items()}}
    exp.prepare([plans["fairlrf"], *head.values(), *every.values()])
    ctx = exp.context
    ctx.scoring_set(plans["fairlrf"].scoring)
    ctx.scoring_inputs(plans["fairlrf"].scoring)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for label, plan in runs.items():
            ctx._tensors.clear()
            if label == "fairlrf (SVD cached)":
                for lp in plan.layers:
                    ctx.factorized(lp.layer, lp.rank)
            times[label].append(_timed(lambda plan=plan: exp.apply(plan))[0])
    return {k: statistics.median(v) for k, v in times.items()}


def _session_seconds(path: Path, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    t = time.perf_counter()
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="head,trunk")
    ap.add_argument("--estimator", choices=["exact", "fisher", "ggn_mc"], default="exact")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="optimize + compare rounds, alternating (median ratio printed)")
    ap.add_argument(
        "--spectrum", choices=["random", "power"], default="power",
        help="FC-2's weight: a trained-like power-law spectrum σ_i ∝ i^-0.5 (default; the "
        "randomized SVD converges) or random init (flat spectrum: the SVD's worst case)",
    )
    ap.add_argument("--quick", action="store_true",
                    help="96 images, 1 repeat, short latency runs")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeats = 96, 1
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    print(f"vgg11_paper, {args.classes} classes, {args.images} fixture images, "
          f"{args.threads} threads, estimator {args.estimator}, FC-2 spectrum {args.spectrum}; "
          f"start: {_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = image_csv_fixture(tmp / "data", args.images, args.classes)
        torch.manual_seed(0)
        state = build_model("vgg11_paper", args.classes).state_dict()
        if args.spectrum == "power":
            power_law_fc2(state)
        torch.save(state, tmp / "ckpt.pt")
        recipes = {"head": _recipe(tmp, csv, args, HEAD_LAYERS, "head.yaml"),
                   "trunk": _recipe(tmp, csv, args, "all", "trunk.yaml")}
        quiet = {"progress": False, "echo": lambda s: None}

        runs = {}
        ratios: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.rounds):  # optimize and compare alternate: load drift hits both
            shutil.rmtree(tmp / "runs", ignore_errors=True)
            base = tmp / "runs"
            t_opt, rep = _timed(lambda base=base: run_optimize(
                tmp / "ckpt.pt", recipes["head"], out=base / "opt", exports_dir=base / "e0",
                latency=False, **quiet))
            assert rep.verified
            print(f"round {r + 1}: optimize, FairLRF alone:   {t_opt:8.1f} s (baseline)  "
                  f"[{_load()}]")
            for mode in modes:
                t, res = _timed(lambda mode=mode, base=base: run_compare(
                    tmp / "ckpt.pt", recipes[mode], out=base / f"cmp-{mode}",
                    exports_dir=base / f"e-{mode}", **quiet))
                runs[mode] = res
                ratios[mode].append(t / t_opt)
                target = " (target ≤ 3)" if mode == "head" else " (reported)"
                print(f"round {r + 1}: compare, 7 rows, weight methods on "
                      f"{'FC layers' if mode == 'head' else 'all':9} {t:8.1f} s = "
                      f"{t / t_opt:.2f}× optimize{target}  [{_load()}]")
        if args.rounds > 1:
            for mode, rs in ratios.items():
                print(f"compare / optimize, {mode}: median {statistics.median(rs):.2f}× over "
                      f"{len(rs)} rounds (range {min(rs):.2f}–{max(rs):.2f})")

        costs = _method_costs(tmp / "ckpt.pt", recipes["head"], args.repeats)
        base = costs["fairlrf"]
        print(f"method cost (Experiment.apply, median of {args.repeats}; features cached) "
              f"[{_load()}]:")
        for label, sec in costs.items():
            print(f"  {label:28} {sec:8.2f} s = {sec / base:7.2f}× FairLRF")

        if "trunk" in runs:
            report = runs["trunk"].report
            row = {m["name"]: m for m in report["methods"]}["fairquantize"]
            pk = row["compression"]["packing"]
            print(f"FairQuantize q=20 % on every weight: C.R. paper "
                  f"{row['compression']['theoretical_cr']:.4f}, theory with the mask bit "
                  f"{pk['theoretical_cr_with_mask']:.4f}, measured initializers "
                  f"{pk['measured_initializer_cr']:.4f} / file {pk['measured_file_cr']:.4f} = "
                  f"{100 * pk['fraction_of_theory']:.1f} % of theory (target ≥ 95 %)")
            fp = {m["name"]: m for m in report["methods"]}["fairprune"]["compression"]
            print(f"FairPrune p=35 % on every weight: C.R. paper {fp['theoretical_cr']:.4f}, "
                  f"measured initializers {fp['measured']['initializer_cr']:.4f}, theory with "
                  f"the mask bit {fp['packing']['theoretical_cr_with_mask']:.4f}")
            run_dir = tmp / "runs" / "cmp-trunk"
            vanilla, packed = run_dir / "vanilla/model.onnx", run_dir / "fairquantize/model.onnx"
            loads: dict[str, list[float]] = {"vanilla": [], "fairquantize": []}
            for _ in range(max(2, args.repeats)):
                loads["vanilla"].append(_session_seconds(vanilla, args.threads))
                loads["fairquantize"].append(_session_seconds(packed, args.threads))
            v, q = (statistics.median(loads[k]) for k in ("vanilla", "fairquantize"))
            print(f"session creation: vanilla {v:.2f} s, packed FairQuantize {q:.2f} s "
                  f"({q / v:.1f}×)  [{_load()}]")
            from fairdeploy.bench import measure_latency

            lat = measure_latency(packed, vanilla, batches=(1, 32), threads=args.threads,
                                  warmup=3 if args.quick else 10,
                                  iters=10 if args.quick else 50,
                                  max_seconds=20 if args.quick else 90)
            for t in lat.timings:
                print(f"  latency {t.model:9} batch {t.batch:3}: median {t.median_ms:8.2f} ms, "
                      f"p90 {t.p90_ms:8.2f} ms ({t.iters} runs)")
            ratios = ", ".join(f"batch {b}: {r:.3f}" for b, r in lat.ratios.items())
            print(f"  vanilla / packed FairQuantize median latency: {ratios} (target ≥ 0.95; "
                  f"interleaved, spinning off)  [{_load()}]")


if __name__ == "__main__":
    main()
