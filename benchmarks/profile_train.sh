#!/usr/bin/env bash
# benchmarks/profile_train.py on one machine for each GPU count of GPUS (default "1 2"): in128_E (CONFIG),
# --compile, bf16, BATCH images per GPU, random JPEGs as in ddp_scaling.sh. Appends one JSON line per process to
# $OUT/profile_rank*.jsonl and keeps rank 0's Chrome trace of each run ($OUT/trace_<N>gpu.json.gz).
set -euo pipefail
OUT=${OUT:-benchmarks/results/scale_out/profile}
GPUS=${GPUS:-"1 2"}
CONFIG=${CONFIG:-configs/in128_E.json}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
[ -d data/imagenet128 ] || python3 benchmarks/make_random_imagefolder.py data/imagenet128 --classes 1000 \
  --per-class 20 --size 128
NAME=$(basename "$CONFIG" .json)
for N in $GPUS; do
  MULTI=$([ "$N" -gt 1 ] && echo --multi_gpu || true)
  accelerate launch $MULTI --num_processes "$N" --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    benchmarks/profile_train.py --out "$OUT" --tag "${NAME}_${N}gpu" --skip 30 --active 5 -- \
    --config "$CONFIG" --out-dir "/tmp/profile_$N" --batch-size $((BATCH * N)) --log-every 10 --demo-every 0 \
    --save-every 100000 --num-workers 12 --compile --no-progress 2>&1 | { grep -v "^USDT" || true; } > "$OUT/train_${N}gpu.log"
  mv "$OUT/trace_rank0.json.gz" "$OUT/trace_${N}gpu.json.gz"
done
cat "$OUT"/profile_rank*.jsonl
