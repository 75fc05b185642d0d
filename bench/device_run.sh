#!/usr/bin/env bash
# One lent GPU machine, one command: every part that needs a device, each inside its own time budget.
#
#   bash bench/device_run.sh            # on the GPU machine, repo root; results tarred into $OUT
#   DRY=1 bash bench/device_run.sh      # here on the CPU: the same commands at tiny sizes
#
# Phase 1 runs side by side (the method table, the position-encoding comparison and the base pre-training
# are small models: Python-bound, so they share one GPU and 16 cores well); phase 2 is the GPU suite
# alone, because its timings must not share the machine. Every part writes into /tmp/dev/<part> and its
# log /tmp/dev/<part>.log; the end tars them into $OUT/<part>.tgz (a device gives back 8 files).
# The machine has no ray, mlflow or pycocotools; diffusers and pydantic come as wheels in .whl/
# (`make bench-gpu-wheels`).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
W=${W:-/tmp/dev}
DRY=${DRY:-0}
mkdir -p "$OUT" "$W"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

if [ "$DRY" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, diffusers, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
else
  export PYTHONPATH=${PYTHONPATH:-$PWD}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0

# ---------------------------------------------------------------- phase 1: side by side
P1=${P1:-300}   # seconds for phase 1
if [ "$DRY" = 0 ]; then
  METHODS_ARGS="--jobs 7 --budget-s $((P1 - 45))"
  # the position encodings from scratch (issue 21) and the base pre-trained on objects in context (issue 13)
  POSENC_CMD=${POSENC_CMD-"python3 bench/posenc.py --device cuda --budget-s $((P1 - 50)) --batch 64 --workers 4 --heldout-per-class 50 --per-class 50 --work $W/posenc-work --out $W/posenc"}
  SCENES_CMD=${SCENES_CMD-"python3 bench/pretrain_context.py --out $W/scenes --budget-s $((P1 - 20)) --workers 5 --threads 2"}
else
  METHODS_ARGS="--jobs 0 --num-scenes 36 --classifier-steps 4 --arms driveditfit lora ddf-linear --seeds 0 --lrs 2e-3 \
    --steps 3 --batch 8 --per-scenario 3 --sampler-steps 2 --timing-steps 2 --device cpu"
fi
say "phase 1: methods table, posenc, scenes base"
timeout -k 10 "$P1" python3 bench/methods_table.py run --data "$W/methods-data" --out "$W/methods" $METHODS_ARGS \
  > "$W/methods.log" 2>&1 &
PIDS="$!"
if [ -n "${POSENC_CMD:-}" ]; then
  timeout -k 10 "$P1" bash -c "$POSENC_CMD" > "$W/posenc.log" 2>&1 &
  PIDS="$PIDS $!"
fi
if [ -n "${SCENES_CMD:-}" ]; then
  timeout -k 10 "$P1" bash -c "$SCENES_CMD" > "$W/scenes.log" 2>&1 &
  PIDS="$PIDS $!"
fi
for p in $PIDS; do wait "$p"; echo "part $p exit $?"; done
say "phase 1 done"

# ---------------------------------------------------------------- phase 2: the GPU suite alone
P2=${P2:-230}
if [ "$DRY" = 0 ]; then
  timeout -k 10 "$P2" python3 bench/gpu_suite.py --out "$W/suite" --total-cap $((P2 - 20)) \
    --parts checks sampling finetune detect > "$W/suite.log" 2>&1
  echo "suite exit $?"
fi
say "phase 2 done"

# ---------------------------------------------------------------- back
for part in methods posenc scenes suite; do
  files=$(cd "$W" && ls -d "$part" "$part.log" 2>/dev/null)
  [ -n "$files" ] && tar czf "$OUT/$part.tgz" -C "$W" $files
done
ls -la "$OUT"
for part in methods posenc scenes suite; do
  [ -f "$W/$part.log" ] && { echo "===== $part.log (tail)"; grep -v -i warning "$W/$part.log" | tail -n 25; }
done
[ -f "$W/methods/table.md" ] && { echo "===== methods table"; head -c 4000 "$W/methods/table.md"; }
say "end"
