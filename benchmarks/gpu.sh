#!/usr/bin/env bash
# The GPU benchmark, prepared for one call of the device tool on one H100/H200 (no network there; the wheels of the
# packages its image lacks travel in .whl/, see the device tool's README). Fill .whl/ here first, e.g.:
#   pip download -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
#     datasets dill multiprocess jsonargparse docstring-parser typeshed-client litdata obstore boto3 botocore s3transfer jmespath tifffile
#
#   bash benchmarks/gpu.sh [IMAGES] [EPOCHS]          # default 10000 generated 512 px JPEGs, 2 epochs
#   RECIPE=1 bash benchmarks/gpu.sh                    # the recipe's size instead: 5,000 images (4,500/500), 5 epochs
#   DRY=1 bash benchmarks/gpu.sh                       # the whole script on a CPU with tiny sizes (a test runs it)
#
# Runs, in one call: the guide's pipeline as written (0 loader workers) and with 16 workers; lit_lora fit from
# JPEGs and from an optimized (litdata) dataset built in the run; lit_lora validate and predict; then the ceilings (bare training
# step, bare inference, the training loader alone: benchmarks/step.py) and the summary (benchmarks/gpu_report.py:
# loop/bare-step ratio, fixed cost, peak GPU memory, the card's name). Results land in $OUT (default /tmp/out).
# EXTRA="--compiled" adds a compiled run; GUIDE_WORKERS="16" skips the slow guide run.
set -euo pipefail
IMAGES=${1:-10000}
EPOCHS=${2:-2}
OUT_DIR=${OUT:-/tmp/out}
WORK=${WORK_DIR:-/tmp/bench}
mkdir -p "$OUT_DIR" "$WORK"
if [ -d .whl ] && [ -z "${DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -n "${RECIPE:-}" ]; then IMAGES=5000; EPOCHS=5; fi
if [ -n "${DRY:-}" ]; then
  IMAGES=40; EPOCHS=1
  DEVICE=(--workers 1); GUIDE=(--guide_workers 0); STEP=(--device cpu --batch_size 8 --steps 2 --workers 1)
  echo "dry run on the CPU" | tee "$OUT_DIR/gpu.txt"
else
  DEVICE=(--gpu --vit_b16 --workers 16); GUIDE=(--guide_workers ${GUIDE_WORKERS:-0 16}); STEP=(--device cuda --workers 16)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
fi
"$PYTHON" - <<'PY' | tee -a "$OUT_DIR/gpu.txt"
import importlib
import os
for name in ("torch", "torchvision", "lightning", "transformers", "peft", "torchmetrics", "datasets", "jsonargparse", "pyarrow", "PIL", "litdata", "obstore", "boto3"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
print("cpus", len(os.sched_getaffinity(0)))
PY
"$PYTHON" benchmarks/compare.py "${DEVICE[@]}" --images "$IMAGES" --epochs "$EPOCHS" "${GUIDE[@]}" --optimized --validate --predict \
  ${EXTRA:-} --work_dir "$WORK" --result "$OUT_DIR/gpu_result.json" 2>&1 | tee "$OUT_DIR/gpu_compare.log"
MODEL=$(ls -d "$WORK"/vit-* | head -n 1)
"$PYTHON" benchmarks/step.py --model_dir "$MODEL" --data_dir "$WORK/images-$IMAGES" "${STEP[@]}" --result "$OUT_DIR/step.json" > "$OUT_DIR/step.log" 2>&1
"$PYTHON" benchmarks/gpu_report.py "$OUT_DIR/gpu_result.json" "$OUT_DIR/step.json" "$OUT_DIR/gpu.txt" | tee "$OUT_DIR/summary.md"
