"""Exact per-group Hessians of U and V for an MLP layer inside a ViT encoder block,
against one forward+backward of the head; memory of the cached token tensors.

Model: torchvision's ``VisionTransformer`` with random weights (``--config b16``: the
shape of ``vit_b_16``, 224×224, patch 16, 12 blocks, hidden 768, MLP 3072; ``--config
small``: 64×64, patch 16, 4 blocks, hidden 192, MLP 768) and ``--classes`` outputs.
Inputs: fixture JPEGs (random pixels, ``bench/_image_fixture.py``), resized and
center-cropped to the image size and normalized as the pipeline does.

The cut is before ``encoder.layers.encoder_layer_<block>.mlp.<0|3>`` (``--layer``): two
token tensors cross it (the block's LayerNorm output and its residual stream), packed
into one cached tensor per sample. The layer is replaced by its truncated SVD at rank
``--rank`` and the script times, on ``--samples`` cached samples, in this process:

* the baseline: one forward + backward of the head (mean CE, gradients of every
  parameter of the head);
* ``hessian_diag`` with ``exact`` (C per-sample VJPs through the head: the Gauss–Newton
  diagonal, the Hessian's own diagonal where the head is piecewise linear, which a ViT
  head is not), ``fisher`` and ``ggn_mc`` (one draw);

and prints each time (process CPU seconds on the CPU, wall seconds on CUDA) and its
ratio to the baseline, with the bytes per cached sample
and how many scoring samples fit per GB (float32).

Usage::

    python bench/bench_vit_hessian.py --config small --classes 2 114
    python bench/bench_vit_hessian.py --config b16 --classes 2 --samples 4
    python bench/bench_vit_hessian.py --config b16 --classes 2 114 --samples 32 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _image_fixture import image_csv_fixture

from fairdeploy.features import split_model
from fairdeploy.lrf import factorize
from fairdeploy.models import build_model
from fairdeploy.scoring import HessianApproximationWarning, hessian_diag

CONFIGS = {
    "b16": {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 12,
            "hidden_dim": 768, "mlp_dim": 3072},
    "small": {"image_size": 64, "patch_size": 16, "num_layers": 4, "num_heads": 3,
              "hidden_dim": 192, "mlp_dim": 768},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(
    fn: Callable[[], object], repeats: int, device: torch.device,
    warmup: Callable[[], object] | None = None,
) -> float:
    """Median seconds of ``fn`` after a warm-up call (``warmup``, else ``fn`` itself):
    process CPU seconds on the CPU (the bench machine is shared: other processes stretch
    wall time, not the CPU seconds the work needs), wall seconds on CUDA."""
    (warmup or fn)()
    _sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def fixture_images(n: int, size: int) -> torch.Tensor:
    """``n`` fixture JPEGs as a normalized (n, 3, size, size) float batch."""
    import torchvision.transforms as T

    tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with tempfile.TemporaryDirectory() as tmp:
        image_csv_fixture(Path(tmp), n)
        return torch.stack([tf(Image.open(Path(tmp) / "imgs" / f"{i}.jpg").convert("RGB"))
                            for i in range(n)])


def run(config: str, classes: int, layer: str, rank: int, samples: int, repeats: int,
        device: torch.device, images: torch.Tensor) -> dict[str, float]:
    """One model: cut, cache, time the estimators against forward+backward."""
    torch.manual_seed(0)
    model = build_model("vision_transformer", classes, **CONFIGS[config]).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at 0
    trunk, head = split_model(model, layer, example_input=images[:2])
    with torch.no_grad():
        feats = torch.cat([trunk(images[i : i + 8]) for i in range(0, len(images), 8)])
    head.set_submodule(layer, factorize(head.get_submodule(layer), rank))
    head = head.to(device).eval()
    feats = feats.to(device)
    y = torch.randint(0, classes, (samples,), generator=torch.Generator().manual_seed(0))
    y = y.to(device)

    def fwd_bwd() -> None:
        head.zero_grad(set_to_none=True)
        F.cross_entropy(head(feats), y).backward()

    out = {"bytes_per_sample": feats.shape[1] * 4.0}
    out["samples_per_gb"] = 2**30 / out["bytes_per_sample"]
    out["fwd_bwd_s"] = _time(fwd_bwd, repeats, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HessianApproximationWarning)
        for est in ("exact", "fisher", "ggn_mc"):
            out[f"{est}_s"] = _time(
                lambda est=est: hessian_diag(head, layer, feats, y, estimator=est,
                                             batch_size=samples),
                repeats, device,
                # Warm up on two samples: the first-call costs without a second full run.
                warmup=lambda est=est: hessian_diag(head, layer, feats[:2], y[:2],
                                                    estimator=est),
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 114])
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--layer", choices=["0", "3"], default="0", help="mlp.0 or mlp.3")
    ap.add_argument("--rank", type=int, default=None, help="default: hidden/4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    layer = f"encoder.layers.encoder_layer_{args.block}.mlp.{args.layer}"
    rank = args.rank or cfg["hidden_dim"] // 4
    images = fixture_images(args.samples, cfg["image_size"])
    print(f"config {args.config} {cfg}, layer {layer}, rank {rank}, {args.samples} samples, "
          f"device {device}, {torch.get_num_threads()} threads")
    for classes in args.classes:
        r = run(args.config, classes, layer, rank, args.samples, args.repeats, device, images)
        print(f"C={classes}: cached {r['bytes_per_sample'] / 2**20:.2f} MiB/sample "
              f"({r['samples_per_gb']:.0f} samples per GB); fwd+bwd {r['fwd_bwd_s']:.3f} s; "
              + "; ".join(f"{e} {r[f'{e}_s']:.3f} s ({r[f'{e}_s'] / r['fwd_bwd_s']:.1f}x)"
                          for e in ("exact", "fisher", "ggn_mc")))


if __name__ == "__main__":
    main()
