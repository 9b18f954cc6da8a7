#!/usr/bin/env bash
# The datasets issue's loader check on one GPU machine: the loader alone on generated data (cached and decoded
# from JPEG files, 32x32 and 256x256, augmented on the GPU), then k-diffusion's MNIST config and the CIFAR-10
# config, each loader alone and beside training (JSON lines; benchmarks/bench_loader.py says what each measures).
# Run from the repo root with .carry/MNIST/raw/*.gz, .carry/cifar10.zip (benchmarks/parquet_to_zip.py from the
# CIFAR-10 parquet) and the wheels hdiffusion needs beyond the image's packages (jsonschema and its deps) in .whl/.
set -euo pipefail
OUT=${OUT:-benchmarks/results/loader}
WORKERS=${WORKERS:-14}
STEPS=${STEPS:-600}
mkdir -p "$OUT" data/MNIST/raw
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
cp .carry/MNIST/raw/*.gz data/MNIST/raw/  # read as they are: no gunzip needed
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
export PYTHONUNBUFFERED=1
python3 benchmarks/bench_loader.py --workers "$WORKERS" --seconds 10 | tee "$OUT/generated.jsonl"
python3 - <<'PY'
import json
config = json.load(open("configs/cifar10_transformer.json"))
config["dataset"] = {"type": "zip", "location": ".carry/cifar10.zip", "num_classes": 10, "cond_dropout_rate": 0.1}
json.dump(config, open("/tmp/cifar10_zip.json", "w"), indent=1)
PY
: > "$OUT/configs.jsonl"
for config in configs/mnist_transformer.json /tmp/cifar10_zip.json; do
  python3 benchmarks/bench_loader.py --config "$config" --batch-size 256 --workers "$WORKERS" --seconds 10 \
    --train-steps "$STEPS" ${EXTRA_ARGS:-} 2>>"$OUT/train_log.txt" | tee -a "$OUT/configs.jsonl"
done
