#!/usr/bin/env bash
# The GPU benchmark, as run through the device tool on one H100/H200 (no network there; the wheels of the
# packages its image lacks, datasets and jsonargparse, travel in .whl/):
#
#   bash benchmarks/gpu.sh [IMAGES] [EPOCHS]
#
# Builds a random ViT-B/16 and IMAGES generated 512 px JPEGs, then runs benchmarks/compare.py: the guide's
# pipeline as written (0 loader workers) and with 16 workers, lit_lora eager and with its image cache (built in
# the run), and lit_lora predict; about 6 minutes on an H200 for 10,000 images and 2 epochs.
# EXTRA="--compiled" adds a compiled run (about 2.5 more minutes), GUIDE_WORKERS="16" skips the slow guide run.
set -euo pipefail
IMAGES=${1:-10000}
EPOCHS=${2:-2}
OUT_DIR=${OUT:-/tmp/out}
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python3 - <<'PY' | tee -a "$OUT_DIR/gpu.txt"
import importlib
for name in ("torch", "torchvision", "lightning", "transformers", "peft", "torchmetrics", "datasets", "jsonargparse", "pyarrow", "PIL"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
import os
print("cpus", len(os.sched_getaffinity(0)))
PY
python3 benchmarks/compare.py --gpu --vit_b16 --images "$IMAGES" --epochs "$EPOCHS" --workers 16 \
  --guide_workers ${GUIDE_WORKERS:-0 16} --cache --predict ${EXTRA:-} --work_dir /tmp/bench --result "$OUT_DIR/gpu_result.json" 2>&1 | tee "$OUT_DIR/gpu_compare.log"
cp /tmp/bench/*.log "$OUT_DIR/" 2>/dev/null || true
