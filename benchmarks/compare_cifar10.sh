#!/usr/bin/env bash
# HDiT vs DiT vs DiffiT on CIFAR-10 (class-conditional) with the same training budget: each config trained
# STEPS steps at batch 256 with --compile and bf16 on one GPU, then FID of 2,000 EMA samples against the
# training set with the CIFAR-10 classifier's features (benchmarks/cifar10_classifier; trained here first when
# missing). Run from the repo root with ../shared/data/cifar10/*.parquet copied to .carry/cifar10/ and the
# jsonschema wheels in .whl/. MODELS picks configs (default: all three). Writes $OUT/summary.jsonl (one JSON
# line per config), each run's demo grid, and logs.tgz (training logs and metrics.jsonl files).
set -euo pipefail
OUT=${OUT:-benchmarks/results/cifar10_compare}
STEPS=${STEPS:-1500}
COMPILE=${COMPILE---compile}  # COMPILE= for a quick run without compilation
MODELS=${MODELS:-"cifar10_transformer cifar10_dit cifar10_diffit"}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
trap 'tar -czf "$OUT/logs.tgz" -C "$LOGS" .' EXIT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
CLASSIFIER=benchmarks/cifar10_classifier/cifar10_classifier.pt
if [ ! -f "$CLASSIFIER" ]; then
  python3 benchmarks/cifar10_classifier/train_classifier.py --data .carry/cifar10 --out "$CLASSIFIER" \
    > "$LOGS/classifier_log.txt" 2>&1
  cp "$CLASSIFIER" benchmarks/cifar10_classifier/results.json "$OUT/"
fi
[ -f /tmp/cifar10.zip ] || python3 benchmarks/parquet_to_zip.py .carry/cifar10/train.parquet /tmp/cifar10.zip
for name in $MODELS; do
  python3 - "$name" <<'PY'
import json, sys
name = sys.argv[1]
config = json.load(open(f"configs/{name}.json"))
config["dataset"] = {"type": "zip", "location": "/tmp/cifar10.zip", "num_classes": 10, "cond_dropout_rate": 0.1}
json.dump(config, open(f"/tmp/{name}.json", "w"), indent=1)
PY
  python3 train.py --config "/tmp/$name.json" --out-dir "/tmp/$name" --batch-size 256 --mixed-precision bf16 \
    --end-step "$STEPS" --save-every "$STEPS" --demo-every "$STEPS" --sample-n 100 --log-every 100 \
    --num-workers 8 $COMPILE --evaluate-every "$STEPS" --evaluate-with "torchscript:$CLASSIFIER" --no-progress \
    > "$LOGS/${name}_train_log.txt" 2>&1
  cp "/tmp/$name/metrics.jsonl" "$LOGS/${name}_metrics.jsonl"
  cp "/tmp/$name/demo_$(printf %08d "$STEPS").png" "$OUT/${name}_demo.png"
  python3 - "$name" "$OUT" "$LOGS" <<'PY'
import json, sys
name, out, logs = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{logs}/{name}_metrics.jsonl")]
train = [r for r in rows if "img_per_s" in r][2:]  # the first 200 steps hold the compilation
fid = [r for r in rows if any(k.startswith("fid_") for k in r)][-1]
summary = {"config": name, "steps": fid["step"], "kimg": fid["kimg"],
           "img_per_s": round(sum(r["img_per_s"] for r in train) / len(train), 1), "final_loss": train[-1]["loss"],
           **{k: v for k, v in fid.items() if k.startswith(("fid_", "kid_"))}}
print(json.dumps(summary))
open(f"{out}/summary.jsonl", "a").write(json.dumps(summary) + "\n")
PY
done
