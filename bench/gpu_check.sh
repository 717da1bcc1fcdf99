#!/usr/bin/env bash
# GPU check: parity on ONNX Runtime's CUDA execution provider and latency at batch 1/32/128.
#
# Needs the gpu extra (onnxruntime-gpu in place of onnxruntime) and an NVIDIA GPU:
#   pip uninstall -y onnxruntime && pip install -e ".[gpu]"
#   bash bench/gpu_check.sh [OUT_DIR]
# Exports a small factorized MLP and vgg11_paper (vanilla and FC-2 factorized at k=64,
# random weights: parity and latency do not depend on training), then runs
# `fairdeploy verify --provider cuda` (PyTorch CPU reference vs ORT CUDA) and
# `fairdeploy bench --provider cuda --batch 1,32,128` (interleaved, spinning off), and
# writes the JSON results to OUT_DIR (default: a temporary folder). Record the numbers in
# docs/performance.md, section "GPU".
set -euo pipefail
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"

python - <<'PY'
import sys
import onnxruntime as ort
provs = ort.get_available_providers()
print("onnxruntime", ort.__version__, "providers:", provs)
if "CUDAExecutionProvider" not in provs:
    sys.exit("CUDAExecutionProvider is missing: install the gpu extra (onnxruntime-gpu) first")
PY

python - "$OUT" <<'PY'
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from fairdeploy.export import export_onnx
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.models import build_model

out = Path(sys.argv[1])
warnings.simplefilter("ignore", UserWarning)
torch.manual_seed(0)

# A small MLP with a structured-sparse factorized layer (real smaller blocks).
k, q = 16, 8
fact = FactorizedLinear(torch.randn(64, k) / 8, torch.rand(k) + 0.5, torch.randn(k, 48) / 4,
                        torch.randn(48) * 0.1)
rows, cols = torch.arange(0, 64, 3), torch.arange(0, 48, 4)
with torch.no_grad():
    fact.U[rows[:, None], torch.arange(q, k)[None]] = 0
    fact.V[torch.arange(q, k)[:, None], cols[None]] = 0
fact.sparse_rows, fact.sparse_cols, fact.keep = rows, cols, q
mlp = nn.Sequential(nn.Linear(38, 64), nn.ReLU(), fact, nn.ReLU(), nn.Linear(48, 2)).eval()
x = torch.randn(512, 38)
export_onnx(mlp, x[:2], out / "mlp.onnx", reference_inputs=x)

vanilla = build_model("vgg11_paper", 2).eval()
proc = build_model("vgg11_paper", 2).eval()
proc.load_state_dict(vanilla.state_dict())
fc2 = vanilla.classifier[3]
U, S, V = torch.svd_lowrank(fc2.weight.detach().T, q=72, niter=2)
proc.classifier[3] = FactorizedLinear(U[:, :64], S[:64], V[:, :64].T, fc2.bias.detach())
xi = torch.randn(64, 3, 112, 112)
export_onnx(vanilla, xi[:1], out / "vgg_vanilla.onnx", reference_inputs=xi)
export_onnx(proc, xi[:1], out / "vgg_fc2.onnx", reference_inputs=xi)
print("exported to", out)
PY

status=0
for m in mlp vgg_vanilla vgg_fc2; do
  echo "== verify $m on CUDA"
  fairdeploy verify "$OUT/$m.onnx" --provider cuda --json "$OUT/verify_$m.json" || status=1
done
echo "== bench vgg11_paper on CUDA (FC-2 k=64 vs vanilla; model and classifier.3 sub-graph)"
fairdeploy bench "$OUT/vgg_fc2.onnx" --baseline "$OUT/vgg_vanilla.onnx" --provider cuda \
  --batch 1,32,128 --iters 100 --warmup 20 --json "$OUT/bench_vgg.json"
echo "results in $OUT"
exit $status
