#!/usr/bin/env bash
# The papers' semi-supervised schedules on one lent GPU: see benchmarks/semi_gpu.py (pack .gpu/ here first).
#   run(command="PART=acdc bash benchmarks/semi_gpu.sh", carry=[".gpu"], timeout_s=570)   (PART=la likewise)
set -euo pipefail
FRACTION=${FRACTION:-0.1}
PART=${PART:-acdc}
SETTING=$([ "$PART" = la ] && echo la || echo acdc_l7)
OUT=${OUT:-/tmp/semi_gpu_out}
mkdir -p "$OUT/records"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 FRUGALSEG_DATA=/tmp/frugalseg_data FRUGALSEG_OFFLINE=1
python3 benchmarks/semi_gpu.py unpack --data /tmp/frugalseg_data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/semi.py --only gpu --gpu-settings "$SETTING" --seeds 1 --gpu-fraction "$FRACTION" --runs /tmp/runs \
  --cpu-records "$OUT/records" 2>&1 | tee "$OUT/semi_gpu.log"
cp benchmarks/results/semi.json "$OUT/semi.json"
