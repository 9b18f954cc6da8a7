#!/usr/bin/env bash
# Scale-out of train.py on one machine with several GPUs: each run of RUNS ("GPUS:ddp" or "GPUS:fsdp") trains
# CONFIG (default in128_E) with the same per-GPU batch, --compile (unless COMPILE=0), bf16. Random JPEGs stand in
# for ImageNet (throughput does not depend on content). Writes each run's metrics and log to $OUT and prints one
# JSON line per run: mean img/s of the logged windows after the first two, peak GPU memory, last loss.
#   STEPS=150 PER_CLASS=20 RUNS="1:ddp 2:ddp 2:fsdp" benchmarks/ddp_scaling.sh
set -euo pipefail
OUT=${OUT:-benchmarks/results/scale_out}
STEPS=${STEPS:-200}
PER_CLASS=${PER_CLASS:-40}  # random images per class (1,000 classes)
RUNS=${RUNS:-"1:ddp 2:ddp"}
CONFIG=${CONFIG:-configs/in128_E.json}
BATCH=${BATCH:-128}  # per GPU
COMPILE=$([ "${COMPILE:-1}" = 1 ] && echo --compile || true)
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; nvidia-smi topo -m || true
[ -d data/imagenet128 ] || python3 benchmarks/make_random_imagefolder.py data/imagenet128 --classes 1000 \
  --per-class "$PER_CLASS" --size 128
NAME=$(basename "$CONFIG" .json)
for RUN in $RUNS; do
  N=${RUN%%:*}; MODE=${RUN#*:}
  MULTI=$([ "$N" -gt 1 ] && echo --multi_gpu || true)
  FSDP=$([ "$MODE" = fsdp ] && echo --fsdp || true)
  TAG=${NAME}_${N}gpu_${MODE}
  accelerate launch $MULTI --num_processes $N --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    train.py --config "$CONFIG" --out-dir /tmp/$TAG --batch-size $((BATCH * N)) --end-step $STEPS \
    --log-every 25 --demo-every 0 --save-every 100000 --num-workers 12 $COMPILE $FSDP --no-progress \
    > "$OUT/train_$TAG.log" 2>&1 || { echo "{\"run\": \"$TAG\", \"error\": \"exit $?\"}" | tee -a "$OUT/summary.jsonl"; tail -5 "$OUT/train_$TAG.log"; continue; }
  cp /tmp/$TAG/metrics.jsonl "$OUT/metrics_$TAG.jsonl"
  python3 -c "
import json
rows = [json.loads(l) for l in open('/tmp/$TAG/metrics.jsonl')][2:]
print(json.dumps({'config': '$NAME', 'gpus': $N, 'sharding': '$MODE', 'batch': $BATCH * $N,
                  'img_per_s': round(sum(r['img_per_s'] for r in rows) / len(rows), 1),
                  'window_img_per_s': [round(r['img_per_s']) for r in rows],
                  'max_memory_gib': rows[-1].get('max_memory_gib'), 'loss': rows[-1]['loss']}))" \
    | tee -a "$OUT/summary.jsonl"
done
