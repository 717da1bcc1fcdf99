"""int8 export: static QDQ against dynamic quantization, measured in one process.

Two models, each exported in float (dynamo exporter) and quantized with
``fairdeploy.export.quantize_int8`` in ``static`` mode (QDQ, per-channel weights, MinMax
calibration on training inputs) and ``dynamic`` mode (per-channel weights, activations
quantized per batch):

1. an MLP (20 → 128 → 128 → 4) trained here on a synthetic task with a sensitive group,
   its middle layer factorized at k=16 and structured-sparse (sr=0.25, rr=0.5): accuracy
   and EOdd of each artifact on a test split, int8-vs-PyTorch errors (relative to the
   logits' standard deviation) and argmax agreement;
2. a small VGG-style CNN trained here on synthetic images, its classifier's middle layer
   factorized and structured-sparse: the same figures as the MLP;
3. vgg11_paper (112×112) with FC-2 factorized at k=64, sr=0.4, rr=0: which weights stayed
   float, bytes, latency. Its weights are random, so its logits are noise-level and its
   int8 output error says nothing about a trained VGG (printed, marked as such).

For each: initializer bytes, and ONNX Runtime latency of each int8 model against the float
one (interleaved, spinning off), median per batch size.

Usage: ``python bench/bench_int8.py [--threads 2] [--iters 30] [--skip-vgg] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fairdeploy.bench import measure_latency
from fairdeploy.export import (
    export_onnx,
    int8_compression,
    int8_fairness,
    onnx_sizes,
    quantize_int8,
    verify_int8,
)
from fairdeploy.lrf import FactorizedLinear, factorize, sparsify
from fairdeploy.plan import num_selected

MODES = ("static", "dynamic")  # "auto" picks static for graphs with convolutions


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels (4 classes) and groups (0/1) of a synthetic task whose difficulty
    depends on the group."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 2, n)
    w = rng.normal(size=(20, 4))
    x = rng.normal(size=(n, 20)) + 0.5 * g[:, None]
    logits = np.tanh(x) @ w + (0.6 + 0.6 * g[:, None]) * rng.normal(size=(n, 4))
    return x.astype(np.float32), logits.argmax(1), g


def trained_mlp(x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 4))
    _fit(model, x, y, epochs=epochs, batch=128, lr=3e-3)
    return _sparse_factorized(model, 2, rank=16)


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3×32×32 images: the class is the brightest quadrant (noisy), group 1 images carry a
    stripe pattern and more noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    g = rng.integers(0, 2, n)
    x = rng.normal(0, 0.5, size=(n, 3, 32, 32)) * (1 + 0.6 * g[:, None, None, None])
    amp = rng.uniform(0.0, 0.6, n)
    for c, (r, q) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        idx = y == c
        x[idx, :, r : r + 16, q : q + 16] += amp[idx, None, None, None]
    x[g == 1, :, ::4, :] += 0.8
    return x.astype(np.float32), y, g


def trained_cnn(x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Sequential:
    """A small VGG-style CNN trained on :func:`synthetic_images`; its classifier's middle
    layer factorized at k=32 and structured-sparse (sr=0.25, rr=0.5)."""
    torch.manual_seed(0)
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    model = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                          nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 4))
    _fit(model, x, y, epochs=epochs, batch=64, lr=2e-3)
    return _sparse_factorized(model, 12, rank=32)


def _fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int,
         lr: float) -> None:
    """Adam on the cross-entropy, shuffled batches (global torch RNG); ends in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()


def _sparse_factorized(model: nn.Sequential, index: int, *, rank: int) -> nn.Sequential:
    """``model[index]`` (a square Linear) factorized at ``rank`` and sparsified with
    sr=0.25, rr=0.5 on rows/columns drawn with seed 2."""
    width = model[index].in_features
    f = factorize(model[index], rank)
    g = torch.Generator().manual_seed(2)
    rows = torch.randperm(width, generator=g)[: num_selected(0.25, width)]
    cols = torch.randperm(width, generator=g)[: num_selected(0.25, width)]
    model[index] = sparsify(f, 0.25, 0.5, rows, cols)
    return model.eval()


def report_model(name: str, tmp: Path, model: nn.Module, x_cal: np.ndarray, x_test: np.ndarray,
                 labels: np.ndarray | None, groups: np.ndarray | None, batches: tuple[int, ...],
                 threads: int, iters: int) -> None:
    float_path = tmp / f"{name}.onnx"
    export_onnx(model, torch.from_numpy(x_test[:2]), float_path)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(x_test[i : i + 64])).numpy()
                              for i in range(0, len(x_test), 64)])
    fs = onnx_sizes(float_path)
    print(f"\n== {name}: float initializer bytes {fs['initializer_bytes']:,}, "
          f"parameters {fs['parameters']:,}; load {os.getloadavg()[0]:.2f}")
    for mode in MODES:
        q = quantize_int8(float_path, tmp / f"{name}-{mode}.onnx", calibration_inputs=x_cal,
                          mode=mode)
        v = verify_int8(q.path, x_test, ref)
        tag = "" if labels is not None else " [random weights: not indicative]"
        cr = int8_compression(float_path, float_path, q.path, method_cr=1.0)
        ratio = cr.float_to_int8_initializer_ratio
        print(f"-- {mode}: int8 weights {len(q.int8_weights)}, float weights "
              f"{list(q.float_weights) or 'none'}; initializer bytes "
              f"{q.sizes['initializer_bytes']:,} (float/int8 {ratio:.2f}×, "
              f"scales+zero points {cr.quantization_overhead_bytes:,} B)")
        print(f"   vs PyTorch float: max|Δ|/std {v.max_abs_error / v.logit_std:.3f}, mean|Δ|/std "
              f"{v.mean_abs_error / v.logit_std:.4f}, argmax agreement {v.argmax_agreement:.2%} "
              f"({'PASSED' if v else 'FAILED'} at atol {v.atol:.3g}, rtol {v.rtol}){tag}")
        if labels is not None and groups is not None:
            f = int8_fairness(float_path, q.path, x_test, labels, groups, n_resamples=500)
            acc_f = float(np.mean(f.float_metrics.accuracy))
            acc_q = float(np.mean(f.int8_metrics.accuracy))
            d = f.eodd_change()
            print(f"   accuracy (mean of groups) float {acc_f:.4f} int8 {acc_q:.4f}; EOdd float "
                  f"{f.float_metrics.eodd:.4f} int8 {f.int8_metrics.eodd:.4f}, paired Δ "
                  f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                  f"{'' if d.significant else ' not significant'}; "
                  f"{f.changed_predictions} predictions changed")
        lat = measure_latency(q.path, float_path, batches=batches, threads=threads, warmup=3,
                              iters=iters, label=f"{name} {mode} int8 vs float",
                              max_seconds=20.0)
        for line in lat.summary_lines():
            print("   " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and iterations, no VGG")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.quick:
        args.iters, args.skip_vgg = 10, True
    print(f"load at start {os.getloadavg()}; ORT intra-op threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        x, y, g = synthetic(8000)
        n_train = 6000
        mlp = trained_mlp(x[:n_train], y[:n_train], epochs=5 if args.quick else 20)
        report_model("mlp", t, mlp, x[:512], x[n_train:], y[n_train:], g[n_train:],
                     (1, 256), args.threads, args.iters)
        xi, yi, gi = synthetic_images(6000)
        cnn = trained_cnn(xi[:4000], yi[:4000], epochs=1 if args.quick else 3)
        report_model("cnn", t, cnn, xi[:512], xi[4000:], yi[4000:], gi[4000:],
                     (1, 64), args.threads, args.iters)
        if not args.skip_vgg:
            from fairdeploy.models import build_model

            torch.manual_seed(0)
            vgg = build_model("vgg11_paper", 114).eval()
            k, d = 64, 4096
            fact = FactorizedLinear(torch.randn(d, k) * 0.02, torch.rand(k) + 0.5,
                                    torch.randn(k, d) * 0.02, vgg.classifier[3].bias.detach())
            gen = torch.Generator().manual_seed(1)
            rows = torch.randperm(d, generator=gen)[: num_selected(0.4, d)]
            cols = torch.randperm(d, generator=gen)[: num_selected(0.4, d)]
            vgg.classifier[3] = sparsify(fact, 0.4, 0.0, rows, cols)
            rng = np.random.default_rng(0)
            imgs = rng.normal(size=(48, 3, 112, 112)).astype(np.float32)
            report_model("vgg11_paper", t, vgg, imgs[:32], imgs[32:], None, None, (1, 8),
                         args.threads, max(5, args.iters // 3))
    print(f"\nload at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
