#!/usr/bin/env bash
# The GPU figures of the README's performance table, in one go, on a machine with one CUDA GPU.
#
#   bash bench/gpu.sh [OUTDIR]        # logs and JSON land in OUTDIR (default: ./gpu-bench)
#
# Runs with whatever python3 holds torch, timm and the project's other needs (PYTHON=... to choose).
# Each step has its own time limit, so that one slow step still leaves the others' figures:
#   1. bench_train.py: the worker's loop vs GPU-resident random tensors (device-resident images)
#   2. the same with images in pinned host memory (the double-buffered copy path)
#   3. bench_train.py --full: 12,000 train + 3,000 test images, 30 epochs, resnet18 at 256 px, wall time
#   4. bench_qc.py at the study's settings (1,500 per class, 256 px, resnet18, 30 epochs)
set -u
out=${1:-gpu-bench}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

step() {  # step NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout "$limit" "$py" "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, timm, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__)'
  nproc; } 2>&1 | tee "$out/machine.log"
step train_resident 100 bench/bench_train.py
step train_pinned 80 bench/bench_train.py --pinned
step train_full 170 bench/bench_train.py --full
step qc_study 200 bench/bench_qc.py --per-class 1500 --image-size 256 --model resnet18 --epochs 30 \
  --device cuda --json "$out/qc_study.json"
