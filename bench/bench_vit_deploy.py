"""Deploy a factorized ViT: real smaller MatMuls, ONNX Runtime parity, measured C.R.,
whole-model latency at batch 1 and 32 against vanilla.

Model: torchvision's ``VisionTransformer`` with random weights (``--config b16``: the
shape of ``vit_b_16``, 224×224, 12 blocks, hidden 768, MLP 3072; ``--config small``:
64×64, 4 blocks, hidden 192, MLP 768), 114 classes. In the encoder blocks ``--blocks``
(default: all) both MLP layers are replaced by their truncated SVD at rank ``--rank``
(default: hidden/4) and sparsified as FairLRF would at ``--sr`` / ``--rr`` (default
0.4 / 0: whole rows of U and columns of V; random rows and columns — bytes and latency
do not depend on which). Exported with dead-neuron elimination (exact across GELU, the
neurons mlp.0 leaves dead are removed from mlp.3; nothing across LayerNorm), then:

* ONNX Runtime parity on fixture images (``export_onnx``'s check: max |Δ| within
  atol 1e-4 + rtol 1e-3·|ref|, argmax agreement);
* the paper's C.R. (parameter counts, S as k×k) and the measured C.R. (initializer bytes
  and file bytes of vanilla ÷ processed);
* latency of the whole model, ORT CPU, interleaved sessions with spinning off, median of
  ``--iters`` runs per batch size, same process.

Usage::

    python bench/bench_vit_deploy.py --config small
    python bench/bench_vit_deploy.py --config b16 --batches 1 --iters 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import sparsify_by_hand
from bench_vit_hessian import CONFIGS, fixture_images

from fairdeploy.bench import measure_latency
from fairdeploy.compression import theoretical_cr
from fairdeploy.export import ExportOptions, export_onnx, onnx_sizes
from fairdeploy.lrf import factorize
from fairdeploy.models import build_model
from fairdeploy.plan import LayerPlan, Plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--blocks", type=int, nargs="*", default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--sr", type=float, default=0.4)
    ap.add_argument("--rr", type=float, default=0.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="fixture images for parity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    rank = args.rank or cfg["hidden_dim"] // 4
    blocks = range(cfg["num_layers"]) if args.blocks is None else args.blocks
    torch.manual_seed(0)
    vanilla = build_model("vision_transformer", 114, **cfg).eval()
    torch.nn.init.normal_(vanilla.heads.head.weight, std=0.02)  # torchvision starts it at 0
    proc = build_model("vision_transformer", 114, **cfg).eval()
    proc.load_state_dict(vanilla.state_dict())
    names = [f"encoder.layers.encoder_layer_{b}.mlp.{j}" for b in blocks for j in (0, 3)]
    for i, name in enumerate(names):
        fact = factorize(vanilla.get_submodule(name), rank, solver="auto")
        proc.set_submodule(name, sparsify_by_hand(fact, args.sr, args.rr, seed=i))
    plan = Plan("fairlrf", layers=tuple(LayerPlan(n, rank, args.sr, args.rr, 5 / 9)
                                        for n in names))
    x = fixture_images(args.samples, cfg["image_size"])
    print(f"config {args.config} {cfg}; {len(names)} MLP layers at k={rank}, sr {args.sr}, "
          f"rr {args.rr}; {args.threads} threads; load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: Path(tmp) / f"{n}.onnx" for n in ("vanilla", "fairlrf")}
        # TorchScript exporter: the dynamo exporter takes ~3x longer on a ViT.
        export_onnx(vanilla, x[:2], paths["vanilla"], reference_inputs=x,
                    options=ExportOptions(exporter="torchscript", opset=17))
        res = export_onnx(proc, x[:2], paths["fairlrf"], reference_inputs=x,
                          options=ExportOptions(eliminate_dead=True, exporter="torchscript",
                                                opset=17))
        lay = res.layers[0]
        print(f"parity (ORT vs PyTorch, {args.samples} fixture images): max |Δ| "
              f"{res.max_abs_error:.2e}; first layer: kept rows {lay.kept_rows}/{lay.din}, "
              f"cols {lay.kept_cols}/{lay.dout}; input {lay.input_elimination}; output "
              f"{lay.output_elimination}", flush=True)
        van, fair = onnx_sizes(paths["vanilla"]), onnx_sizes(paths["fairlrf"])
        with torch.device("meta"):
            meta = build_model("vision_transformer", 114, **cfg)
        print(f"C.R.: paper {theoretical_cr(meta, plan):.3f}; parameters "
              f"{van['parameters'] / fair['parameters']:.3f}; initializer bytes "
              f"{van['initializer_bytes'] / fair['initializer_bytes']:.3f}; file bytes "
              f"{van['file_bytes'] / fair['file_bytes']:.3f} "
              f"({van['file_bytes'] / 1e6:.1f} MB -> {fair['file_bytes'] / 1e6:.1f} MB)",
              flush=True)
        lat = measure_latency(paths["fairlrf"], paths["vanilla"], batches=tuple(args.batches),
                              threads=args.threads, warmup=2, iters=args.iters,
                              label=f"ViT {args.config} whole model")
        for line in lat.summary_lines():
            print(line, flush=True)


if __name__ == "__main__":
    main()
