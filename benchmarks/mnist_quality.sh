#!/usr/bin/env bash
# MNIST on one GPU: train k-diffusion's MNIST config (bf16, --compile) with FID_mnist evaluation (the shipped
# MNIST classifier as feature extractor), then sample quality against steps for four samplers.
# Needs .carry/MNIST/raw/*.gz and the jsonschema wheels in .whl/. Writes to $OUT.
set -euo pipefail
OUT=${OUT:-benchmarks/results/mnist_quality}
STEPS=${STEPS:-4000}
mkdir -p "$OUT" data/MNIST/raw
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
cp .carry/MNIST/raw/*.gz data/MNIST/raw/
export PYTHONUNBUFFERED=1
EXTRACTOR=torchscript:benchmarks/mnist_classifier/mnist_classifier.pt
python3 train.py --config configs/mnist_transformer.json --out-dir /tmp/mnist --batch-size 256 --mixed-precision bf16 \
  --end-step "$STEPS" --save-every "$STEPS" --demo-every "$STEPS" --sample-n 100 --log-every 100 --num-workers 12 \
  --compile --evaluate-every "$STEPS" --evaluate-with "$EXTRACTOR" --no-progress > "$OUT/train_log.txt" 2>&1
cp /tmp/mnist/metrics.jsonl "$OUT/"
python3 benchmarks/quality_vs_steps.py --checkpoint /tmp/mnist --with "$EXTRACTOR" --out "$OUT/quality_vs_steps.jsonl" \
  2>>"$OUT/quality_log.txt"
