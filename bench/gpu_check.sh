#!/usr/bin/env bash
# GPU readiness in one script (< 10 minutes): the CUDA-marked tests, the CUDA speed table (AMP, channels_last, loader
# keeping the GPU busy) and the distributed tests on nccl, results in bench/results/. Without a GPU it runs the
# CPU-only parts (the speed script on CPU, distributed on gloo) so the script itself stays checked.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=bench/results
mkdir -p "$OUT"
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
STATUS=0
step() {  # name, then the command: logs to $OUT/gpu_check-NAME.log, records its exit code
  local name=$1; shift
  echo "== $name: $*"
  if timeout 420 "$@" > "$OUT/gpu_check-$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (log: $OUT/gpu_check-$name.log)"; STATUS=1; fi
  tail -n 15 "$OUT/gpu_check-$name.log"
}
"$PY" -c 'from transferkit import cpu; print("machine:", cpu.describe())'
if [ "$GPUS" -gt 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step cuda-tests "$PY" -m pytest -q -m cuda tests/test_cuda.py
  step speed "$PY" bench/gpu_speed.py --device cuda --out "$OUT/gpu_speed.json"
  if [ "$GPUS" -gt 1 ]; then
    step distributed-nccl "$PY" -m pytest -q tests/test_distributed.py
  else
    echo "== distributed-nccl: skipped, nccl needs 2 GPUs and this machine has $GPUS; gloo on CPU instead"
    CUDA_VISIBLE_DEVICES="" step distributed-gloo "$PY" -m pytest -q tests/test_distributed.py
  fi
else
  echo "no CUDA device: running the CPU-only parts"
  step speed-cpu "$PY" bench/gpu_speed.py --device cpu --quick --out "$OUT/gpu_speed-cpu-quick.json"
  step distributed-gloo "$PY" -m pytest -q tests/test_distributed.py
fi
exit $STATUS
