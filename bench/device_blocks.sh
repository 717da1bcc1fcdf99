#!/usr/bin/env bash
# BLOCKS benchmarks for a quiet machine: SVD solvers pinned to 2 cores (like the project's
# CPU), a CUDA weight's SVD on the GPU vs PROPACK on the CPU (skipped without CUDA),
# exporter timing, int8 static vs dynamic. Writes to ${OUT:-bench_out}/. About 10 minutes.
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/bench OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
PIN="taskset -c 0,1"
{ nproc; lscpu | grep -i "model name"; python -c "import torch, scipy, onnxruntime; print(torch.__version__, scipy.__version__, onnxruntime.__version__, torch.cuda.is_available())"; uptime; } > "$OUT/env.txt" 2>&1
timeout 330 $PIN python bench/bench_svd.py --n 4096 2048 --solvers auto propack arpack > "$OUT/svd.txt" 2>&1
timeout 60 $PIN python bench/bench_svd.py --n 1024 --solvers auto propack arpack lobpcg > "$OUT/svd1024.txt" 2>&1
timeout 90 python bench/gpu_svd.py > "$OUT/gpu_svd.txt" 2>&1
timeout 150 $PIN python bench/bench_exporters.py --rounds 3 > "$OUT/exporters.txt" 2>&1
timeout 300 $PIN python bench/bench_int8.py > "$OUT/int8.txt" 2>&1
uptime >> "$OUT/env.txt"
