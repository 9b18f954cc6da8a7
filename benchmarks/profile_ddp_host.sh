#!/usr/bin/env bash
# Where the host's time goes in a two-GPU train.py run (in128_E, --compile, bf16, 128 images per GPU): py-spy
# samples each rank's main process for DURATION seconds once WAIT seconds have passed (compilation done), idle
# time included, as collapsed stacks ($OUT/rank_PID.txt: "frame;frame;... count" per line). If the main thread
# spends most samples waiting for the GPU (StepGuard.exchange's tolist), the host is not what limits a step.
# Needs a py-spy wheel in .carry/pyspy/ and data/imagenet128 (benchmarks/ddp_scaling.sh makes it).
set -euo pipefail
OUT=${OUT:-benchmarks/results/scale_out/profile}
WAIT=${WAIT:-150}
DURATION=${DURATION:-20}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pyspy .carry/pyspy/*.whl
[ -d data/imagenet128 ] || python3 benchmarks/make_random_imagefolder.py data/imagenet128 --classes 1000 \
  --per-class 20 --size 128
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  train.py --config configs/in128_E.json --out-dir /tmp/profile --batch-size 256 --end-step 100000 \
  --log-every 25 --demo-every 0 --save-every 100000 --num-workers 12 --compile --no-progress \
  > "$OUT/train.log" 2>&1 &
LAUNCHER=$!
sleep "$WAIT"
SPIES=()
for PID in $(pgrep -f -- "-u .*train.py --config configs/in128_E.json"); do
  /tmp/pyspy/bin/py-spy record --idle -r 200 -d "$DURATION" -f raw -o "$OUT/rank_$PID.txt" -p "$PID" \
    > "$OUT/pyspy_$PID.log" 2>&1 &
  SPIES+=($!)
done
wait "${SPIES[@]}" || true
kill -TERM $LAUNCHER 2>/dev/null || true
sleep 5; pkill -f "train.py --config configs/in128_E.json" || true
cp /tmp/profile/metrics.jsonl "$OUT/" 2>/dev/null || true
