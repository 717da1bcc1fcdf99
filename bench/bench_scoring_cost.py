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

Run: ``python bench/bench_scoring_cost.py [--samples 256] [--image-samples 4]
[--classes 114] [--repeats 3] [--quick] [--device cpu|cuda]``.
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


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


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
    ap.add_argument("--samples", type=int, default=256, help="cached-feature samples")
    ap.add_argument("--image-samples", type=int, default=4,
                    help="images for the all-layers run (0 skips it)")
    ap.add_argument("--image-batch", type=int, default=4, help="chunk size of the images")
    ap.add_argument("--classes", type=int, default=114)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="exact", choices=["exact", "fisher", "ggn_mc"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true",
                    help="64 samples, 2 images, 1 repeat: a smoke run in under a minute")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.image_samples, args.repeats = 64, 2, 1
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
    for fn in runs.values():  # warm-up: allocator, thread pool, lazy imports
        if args.repeats > 1:
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn, device))
    med = {name: statistics.median(t) for name, t in times.items()}

    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"vgg11_paper with {c} classes, estimator {args.estimator}, median of "
        f"{args.repeats} (interleaved), load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    base = med["reference: fwd+bwd dense head"]
    lrf = med["FairLRF: U,V of FC-2 (k)"]
    print(f"{n} cached-feature samples; k = {args.rank}")
    print(f"{'':38s} {'s':>9s} {'ms/sample':>10s} {'vs fwd+bwd':>11s} {'vs FairLRF':>11s}")
    for name in ("reference: fwd+bwd dense head", "FairLRF: U,V of FC-2 (k)",
                 "FairPrune/FQ: FC-1,2,3 weights"):
        t = med[name]
        print(f"{name:38s} {t:9.3f} {1e3 * t / n:10.2f} {t / base:10.1f}x {t / lrf:10.1f}x")
    if args.image_samples:
        m = args.image_samples
        ref_img = med["reference: fwd+bwd model, images"]
        print(f"{m} images of 112×112 (per-sample ratio against FairLRF's per-sample cost)")
        for name in ("reference: fwd+bwd model, images", "FairPrune/FQ: all 11 layers, images"):
            t = med[name]
            per = t / m
            print(f"{name:38s} {t:9.3f} {1e3 * per:10.2f} {t / ref_img:10.1f}x "
                  f"{per / (lrf / n):10.1f}x")
    print("FairQuantize pays the scoring once per step (the reference: 20 steps) plus "
          "fine-tuning; FairPrune once; both for each of the two groups, as FairLRF.")


if __name__ == "__main__":
    main()
