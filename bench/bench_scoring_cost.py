"""Scoring cost: FairLRF's Hessians against FairPrune's / FairQuantize's, same samples.

The paper claims FairLRF needs less effort than FairPrune and FairQuantize. Their cost
is dominated by the per-group Hessian diagonals each method needs (selection and
sparsification are cheap):

* FairLRF: U (4096×k) and V (k×4096) of the factorized FC-2 (``classifier.3``) of
  vgg11_paper, on FC-2's cached input features (``scoring.hessian_diag``, exact);
* FairPrune / FairQuantize with the head's layers: the dense weights of FC-1, FC-2 and
  FC-3 (4608×4096, 4096×4096, 4096×C), on FC-1's cached input features
  (``weight_hessian.weight_hessian_diag``);
* the same with ``layers: all``: every conv and FC weight of vgg11_paper fed
  112×112 images (the feature cache cannot serve this: the whole model runs).

FairQuantize pays its scoring once per step (the public code uses 20 steps) plus its
fine-tuning; FairPrune once. Every time is measured in this process, interleaved
(baseline, FairLRF, FairPrune-FC, all layers; repeated), as the median; ratios are
against one forward+backward (mean CE, all parameter gradients) of the dense head on the
same samples and against FairLRF. Weights are random (cost does not depend on values).

Run: ``python bench/bench_scoring_cost.py [--samples 256] [--image-samples 2]
[--classes 114] [--repeats 3] [--estimator exact|fisher|ggn_mc] [--quick]
[--device cpu|cuda]``.
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
from fairdeploy.models import build_model
from fairdeploy.scoring import hessian_diag
from fairdeploy.weight_hessian import dense_layers, weight_hessian_diag


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds (CPU time is stretched less by other processes on
    a shared machine)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _factorized_fc2(model: nn.Module, k: int, device: torch.device) -> nn.Module:
    """FC-2 → ReLU → Dropout → FC-3 with FC-2 as a rank-k FactorizedLinear (random
    orthonormal factors, a decaying spectrum: the scoring cost does not depend on them)."""
    fc2 = model.classifier[3]
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(fc2.in_features, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(fc2.out_features, k, generator=g)).Q.T
    s = 40.0 * torch.exp(-torch.arange(k, dtype=torch.float32) / 16)
    fl = FactorizedLinear(u, s, v, fc2.bias.detach().clone())
    return nn.Sequential(fl, nn.ReLU(), nn.Dropout(0.5), model.classifier[6]).to(device).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=None,
                    help="cached-feature samples (default 256; --quick 64)")
    ap.add_argument("--image-samples", type=int, default=None,
                    help="images for the all-layers run (default 2; --quick 1; 0 skips it)")
    ap.add_argument("--image-batch", type=int, default=4, help="chunk size of the images")
    ap.add_argument("--classes", type=int, default=114)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="default 3; --quick 1")
    ap.add_argument("--image-repeats", type=int, default=1,
                    help="repeats of the (slow) all-layers run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="exact", choices=["exact", "fisher", "ggn_mc"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true",
                    help="64 samples, 1 image, 1 repeat (about 2 minutes on 2 CPU cores, "
                    "nearly all of it the exact all-layers Hessian of one image)")
    args = ap.parse_args()
    for key, full, quick in (("samples", 256, 64), ("image_samples", 2, 1), ("repeats", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = build_model("vgg11_paper", args.classes).to(device).eval()
    head = model.classifier
    lrf_head = _factorized_fc2(model, args.rank, device)
    g = torch.Generator().manual_seed(1)
    n, c = args.samples, args.classes
    feats1 = torch.relu(torch.randn(n, 4608, generator=g)).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    with torch.no_grad():
        feats2 = torch.relu(head[0](feats1))  # FC-2's input for the same samples
    images = torch.randn(args.image_samples, 3, 112, 112, generator=g).to(device)
    y_img = torch.randint(0, c, (args.image_samples,), generator=g).to(device)
    fc_params = [f"{i}.weight" for i in (0, 3, 6)]
    all_params = [f"{name}.weight" for name in dense_layers(model)]

    def fwd_bwd() -> None:
        head.zero_grad(set_to_none=True)
        F.cross_entropy(head(feats1), y).backward()

    def fwd_bwd_images() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), y_img).backward()

    runs: dict[str, Callable[[], object]] = {
        "reference: fwd+bwd dense head": fwd_bwd,
        "FairLRF: U,V of FC-2 (k)": lambda: hessian_diag(
            lrf_head, "0", feats2, y, estimator=args.estimator),
        "FairPrune/FQ: FC-1,2,3 weights": lambda: weight_hessian_diag(
            head, fc_params, feats1, y, estimator=args.estimator, batch_size=128),
    }
    if args.image_samples:
        runs["reference: fwd+bwd model, images"] = fwd_bwd_images
        runs["FairPrune/FQ: all 11 layers, images"] = lambda: weight_hessian_diag(
            model, all_params, images, y_img, estimator=args.estimator, batch_size=args.image_batch)
    expensive = "FairPrune/FQ: all 11 layers, images"
    for name, fn in runs.items():  # warm-up: allocator, thread pool, lazy imports
        if name != expensive:
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            if name != expensive or r < args.image_repeats:
                times[name].append(_timed(fn, device))
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}

    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"vgg11_paper with {c} classes, estimator {args.estimator}, median of "
        f"{args.repeats} (interleaved; all-layers run: {args.image_repeats}), load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs at the end"
    )
    print(f"{n} cached-feature samples; k = {args.rank}. Ratios of wall time (CPU time)")
    print(f"{'':38s} {'wall s':>8s} {'ms/sample':>10s} {'vs fwd+bwd':>16s} {'vs FairLRF':>16s}")

    def row(name: str, per: int, base: str, lrf_per: tuple[float, float] | None) -> None:
        w, cp = wall[name], cpu[name]
        vs_base = f"{w / wall[base]:6.1f} ({cp / cpu[base]:6.1f})"
        if lrf_per is None:
            vs_lrf = f"{w / wall[lrf]:6.1f} ({cp / cpu[lrf]:6.1f})"
        else:
            vs_lrf = f"{w / per / lrf_per[0]:6.0f} ({cp / per / lrf_per[1]:6.0f})"
        print(f"{name:38s} {w:8.3f} {1e3 * w / per:10.2f} {vs_base:>16s} {vs_lrf:>16s}")

    lrf = "FairLRF: U,V of FC-2 (k)"
    base = "reference: fwd+bwd dense head"
    for name in (base, lrf, "FairPrune/FQ: FC-1,2,3 weights"):
        row(name, n, base, None)
    if args.image_samples:
        m = args.image_samples
        print(f"{m} images of 112×112 (per-sample ratio against FairLRF's per-sample cost)")
        per_lrf = (wall[lrf] / n, cpu[lrf] / n)
        for name in ("reference: fwd+bwd model, images", expensive):
            row(name, m, "reference: fwd+bwd model, images", per_lrf)
    print("FairQuantize pays the scoring once per step (the reference: 20 steps) plus "
          "fine-tuning; FairPrune once; both for each of the two groups, as FairLRF.")


if __name__ == "__main__":
    main()
