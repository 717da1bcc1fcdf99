"""The pipeline with ``--device cuda`` against the CPU, and PyTorch GPU latency.

    python bench/gpu_pipeline_check.py [--out DIR] [--images 96]

1. Parity: a small MLP on npz data and vgg11_paper on fixture images go through
   ``Experiment`` on the CPU and on CUDA (the trunk runs on the device; scoring,
   selection and evaluation on cached features): the largest difference of the cached
   features, whether FairLRF selects the same rows/columns, whether the test metrics are
   equal, and ONNX Runtime (CPU) verifying the export made from the CUDA run.
2. Timing (PyTorch, interleaved, after warm-up, CUDA-synchronized): the vgg11_paper trunk
   pass on the device against the CPU, and vgg11_paper with FC-2 factorized at k=64
   against the dense model at batch 1/32/128 on the GPU.

Prints one JSON document; with ``--out`` it is also written to ``DIR/gpu_pipeline.json``.
Without CUDA it runs the CPU against itself (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _mlp_case(tmp: Path) -> tuple[dict, torch.nn.Module]:
    from test_experiment import _data, _recipe, _trained

    model = _trained(_data(tmp / "data.npz"))
    recipe = _recipe(tmp)
    recipe["method"]["layers"][0]["rr"] = 0.0
    return recipe, model


def _vgg_case(tmp: Path, images: int) -> tuple[dict, torch.nn.Module]:
    from _fixtures import make_image_csv

    from fairdeploy.models import build_model

    make_image_csv(tmp, n=images, seed=0)
    torch.manual_seed(0)
    model = build_model("vgg11_paper", 3).eval()
    recipe = {
        "model": {"arch": "vgg11_paper", "num_classes": 3},
        "data": {"kind": "image_csv", "csv": str(tmp / "labels.csv")},
        "sensitive": {"attribute": "group", "groups": {"f": ["f"], "m": ["m"]}},
        "method": {"name": "fairlrf",
                   "layers": [{"layer": "classifier.3", "rank": 64, "sr": 0.4, "rr": 0.0}],
                   "scoring": {"samples_per_group": 16, "batch_size": 16}},
        "export": {"verify_samples": 16},
    }
    return recipe, model


def _parity(recipe: dict, model: torch.nn.Module, device: str, tmp: Path) -> dict:
    from fairdeploy.experiment import Experiment
    from fairdeploy.recipe import parse_recipe

    runs = {}
    for dev in ("cpu", device):
        exp = Experiment(parse_recipe(recipe), model, device=dev)
        t0 = time.perf_counter()
        ctx = exp.prepare()
        prep = time.perf_counter() - t0
        fair = exp.apply(exp.recipe.method)
        runs[dev] = {"exp": exp, "ctx": ctx, "fair": fair, "prepare_s": prep,
                     "metrics": exp.evaluate(fair, "test").to_dict()}
    a, b = runs["cpu"], runs[device]
    feats = max(
        float((a["ctx"].features[s].features - b["ctx"].features[s].features).abs().max())
        for s in ("val", "test")
    )
    export = tmp / f"{device}.onnx"
    b["exp"].export(b["fair"], export)
    verdict = b["exp"].verify(export)
    return {
        "max_feature_difference": feats,
        "same_selection": a["fair"].selections == b["fair"].selections,
        "same_test_metrics": a["metrics"] == b["metrics"],
        "eopp1_cpu": a["metrics"]["fairness"]["eopp1"],
        "eopp1_device": b["metrics"]["fairness"]["eopp1"],
        "prepare_s_cpu": round(a["prepare_s"], 3),
        "prepare_s_device": round(b["prepare_s"], 3),
        "onnx_verify_cpu_ep_passed": bool(verdict),
        "onnx_max_abs_error": max(o.max_abs_error for o in verdict.outputs),
    }


def _time(fn, device: str, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _latency(device: str) -> dict:
    from fairdeploy.lrf import factorize
    from fairdeploy.models import build_model

    torch.manual_seed(0)
    dense = build_model("vgg11_paper", 114).eval()
    fact = build_model("vgg11_paper", 114).eval()
    fact.load_state_dict(dense.state_dict())
    fact.classifier[3] = factorize(dense.classifier[3], 64)
    dense, fact = dense.to(device), fact.to(device)
    rows = []
    with torch.inference_mode():
        for batch in (1, 32, 128):
            x = torch.randn(batch, 3, 112, 112, device=device)
            for m in (dense, fact):  # warm-up
                for _ in range(5):
                    m(x)
            times = {"dense": [], "factorized": []}
            for _ in range(10):  # interleaved rounds
                times["dense"] += _time(lambda x=x: dense(x), device, 3)
                times["factorized"] += _time(lambda x=x: fact(x), device, 3)
            d, f = statistics.median(times["dense"]), statistics.median(times["factorized"])
            z = torch.randn(batch, 4096, device=device)
            fc2, fc2k = dense.classifier[3], fact.classifier[3]
            layer = {"dense": _time(lambda z=z, m=fc2: m(z), device, 50),
                     "factorized": _time(lambda z=z, m=fc2k: m(z), device, 50)}
            rows.append({
                "batch": batch, "dense_ms": round(d, 3), "factorized_ms": round(f, 3),
                "speedup": round(d / f, 3),
                "fc2_dense_ms": round(statistics.median(layer["dense"]), 4),
                "fc2_factorized_ms": round(statistics.median(layer["factorized"]), 4),
            })
    return {"device": device, "model": "vgg11_paper, 114 classes, 112×112, FC-2 k=64",
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--no-latency", action="store_true", help="parity only (a CPU smoke run)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc: dict = {"torch": torch.__version__, "device": device,
                 "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "mlp").mkdir()
        (t / "vgg").mkdir()
        doc["mlp_parity"] = _parity(*_mlp_case(t / "mlp"), device, t / "mlp")
        print(json.dumps({"mlp_parity": doc["mlp_parity"]}), flush=True)
        doc["vgg_parity"] = _parity(*_vgg_case(t / "vgg", args.images), device, t / "vgg")
        print(json.dumps({"vgg_parity": doc["vgg_parity"]}), flush=True)
    if not args.no_latency:
        doc["latency"] = _latency(device)
    text = json.dumps(doc, indent=2, default=float)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_pipeline.json").write_text(text + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
