#!/usr/bin/env bash
# Data-parallel scaling of train.py on in128_E: 1 process, then 2, same per-GPU batch (128), --compile, bf16,
# on one machine with two GPUs. Random JPEGs stand in for ImageNet (throughput does not depend on content).
# Writes each run's metrics and log to $OUT and prints the mean img/s of the steps after the first 50.
set -euo pipefail
OUT=${OUT:-benchmarks/results/ddp}
STEPS=${STEPS:-200}
PER_CLASS=${PER_CLASS:-40}  # random images per class (1,000 classes)
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; nvidia-smi topo -m || true
python3 benchmarks/make_random_imagefolder.py data/imagenet128 --classes 1000 --per-class "$PER_CLASS" --size 128
for N in 1 2; do
  MULTI=$([ "$N" -gt 1 ] && echo --multi_gpu || true)
  accelerate launch $MULTI --num_processes $N --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    train.py --config configs/in128_E.json --out-dir /tmp/ddp$N --batch-size $((128 * N)) --end-step $STEPS \
    --log-every 25 --demo-every 0 --save-every 100000 --num-workers 12 --compile --no-progress \
    > "$OUT/train_${N}gpu.log" 2>&1
  cp /tmp/ddp$N/metrics.jsonl "$OUT/metrics_${N}gpu.jsonl"
  python3 -c "
import json, sys
rows = [json.loads(l) for l in open('/tmp/ddp$N/metrics.jsonl')][2:]
print(json.dumps({'gpus': $N, 'batch': 128 * $N, 'img_per_s': round(sum(r['img_per_s'] for r in rows) / len(rows), 1),
                  'loss': rows[-1]['loss']}))" | tee -a "$OUT/summary.jsonl"
done
