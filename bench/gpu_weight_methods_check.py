"""FairPrune / FairQuantize with ``--device cuda``: the whole-model path on the GPU agrees
with the CPU, the exported models verify, and what exact conv Hessians cost there.

    python bench/gpu_weight_methods_check.py [--classes 114] [--samples 64]

1. On the tiny CNN of the tests (``tests/_tiny_nets.py``), for device cpu and cuda: FairPrune
   on every weight (Hessians through the whole model) and FairQuantize with two steps and
   fine-tuning (the whole model trains); prints the fraction of equal masks, the largest
   weight difference and the test metrics of both, and verifies each export.
2. vgg11_paper with ``--classes`` outputs: exact Hessian diagonals of every Linear and
   Conv2d weight over ``--samples`` random 112×112 images, on the GPU (one backward pass
   per class per chunk), against one forward+backward of the model on the same images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _tiny(tmp: Path, devices: tuple[str, str] = ("cpu", "cuda")) -> None:
    from _tiny_nets import cnn
    from test_weight_methods import CNN, _fit, _images, _recipe

    from fairdeploy.experiment import Experiment

    _images(tmp / "data.npz")
    torch.manual_seed(0)
    model = _fit(cnn(3), tmp / "data.npz")
    plans = {
        "fairprune": {"name": "fairprune", "prune_ratio": 0.4,
                      "scoring": {"samples_per_group": 64}},
        "fairquantize": {"name": "fairquantize", "quantize_ratio": 0.3, "steps": 2,
                         "finetune_epochs": 1, "scoring": {"samples_per_group": 64}},
    }
    for name, method in plans.items():
        out = {}
        for device in devices:
            exp = Experiment(_recipe(tmp, CNN, method), model, device=device)
            t = time.perf_counter()
            p = exp.apply(exp.recipe.method)
            sec = time.perf_counter() - t
            m = exp.evaluate(p, "test")
            exp.export(p, tmp / f"{name}-{device}.onnx")
            ok = bool(exp.verify(tmp / f"{name}-{device}.onnx"))
            masks = {k: v.cpu() for k, v in p.details["masks"].items()}
            out[device] = (exp.model_of(p).state_dict(), masks, m)
            print(f"{name} on {device}: {sec:.2f} s, ran on {p.details['ran_on']}, "
                  f"EOpp1 {m.eopp1:.4f}, avg precision {sum(m.precision) / 2:.4f}, "
                  f"verify {'PASSED' if ok else 'FAILED'}")
        (sd_c, mk_c, _), (sd_g, mk_g, _) = out[devices[0]], out[devices[1]]
        same = sum(int((mk_c[k] == mk_g[k]).sum()) for k in mk_c)
        total = sum(v.numel() for v in mk_c.values())
        diff = max(float((sd_c[k].float() - sd_g[k].float().cpu()).abs().max()) for k in sd_c)
        print(f"{name}: {devices[0]} vs {devices[1]} masks equal on {same}/{total} weights; "
              f"largest weight difference {diff:.3g}")


def _vgg_cost(classes: int, samples: int, device: str = "cuda") -> None:
    from fairdeploy.models import build_model
    from fairdeploy.weight_hessian import dense_layers, weight_hessian_diag

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model("vgg11_paper", classes).to(dev).eval()
    x = torch.randn(samples, 3, 112, 112)
    y = torch.randint(0, classes, (samples,))
    names = [f"{n}.weight" for n in dense_layers(model)]

    def fwd_bwd() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(dev)), y.to(dev)).backward()

    fwd_bwd()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fwd_bwd()
    sync()
    base = time.perf_counter() - t
    t = time.perf_counter()
    weight_hessian_diag(model, names, x, y, estimator="exact", batch_size=32)
    sync()
    exact = time.perf_counter() - t
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"vgg11_paper, {classes} classes, {samples} images, every weight, exact on "
          f"{where}: {exact:.2f} s = {exact / base:.0f}× one "
          f"forward+backward ({base * 1000:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=114)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        _tiny(Path(tmp))
    _vgg_cost(args.classes, args.samples)


if __name__ == "__main__":
    main()
