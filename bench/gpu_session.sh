#!/usr/bin/env bash
# One device session: CUDA parity of the pipeline and GPU timings, in one call.
#   bash bench/gpu_session.sh OUT_DIR
# Expects a machine with PyTorch (CUDA) and onnxruntime (CPU is enough: parity of the
# exported models runs on ONNX Runtime's CPU provider; onnxruntime-gpu is not needed).
# Python packages missing there (pydantic, onnxsim) can travel as wheels in .whl/.
set -uo pipefail
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnxruntime', o.__version__, o.get_available_providers())"
  nproc
} 2>&1 | tee "$OUT/env.txt"
echo "== CUDA tests of the weight-level methods" | tee "$OUT/tests.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_weight_hessian.py \
  tests/test_fairprune.py tests/test_fairquantize.py -k cuda 2>&1 | tail -15 | tee -a "$OUT/tests.txt"
echo "== pipeline parity and GPU latency" | tee "$OUT/pipeline.txt"
timeout 200 python3 bench/gpu_pipeline_check.py --out "$OUT" --images 96 2>&1 | tail -80 \
  | tee -a "$OUT/pipeline.txt"
echo "== FairPrune/FairQuantize on cuda vs cpu; exact conv Hessians on the GPU" | tee "$OUT/weights.txt"
timeout 130 python3 bench/gpu_weight_methods_check.py --classes 114 --samples 64 2>&1 | tail -60 \
  | tee -a "$OUT/weights.txt"
