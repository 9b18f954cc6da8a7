#!/usr/bin/env bash
# The issue-2 GPU check: k-diffusion's MNIST HDiT config, batch 256, bf16, 4,000 steps on one GPU, then
# samples from the result. Run on the device machine from the repo root with the MNIST .gz files in
# .carry/MNIST/raw and the wheels hdiffusion needs beyond the image's packages in .whl/.
# Writes metrics, demo grids, samples and the log to $OUT (or benchmarks/results/mnist_gpu).
set -euo pipefail
OUT=${OUT:-benchmarks/results/mnist_gpu}
mkdir -p "$OUT" data/MNIST/raw
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
for f in .carry/MNIST/raw/*.gz; do gunzip -c "$f" > "data/MNIST/raw/$(basename "${f%.gz}")"; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
RUN=/tmp/runs/mnist
export PYTHONUNBUFFERED=1
python3 train.py --config configs/mnist_transformer.json --out-dir $RUN --batch-size 256 --mixed-precision bf16 \
  --end-step 4000 --save-every 4000 --demo-every 1000 --sample-n 100 --log-every 100 --num-workers 12 \
  --no-progress ${EXTRA_ARGS:-} 2>&1 | tee "$OUT/train_log.txt"
python3 sample.py --checkpoint $RUN --n 100 --batch-size 100 --grid --out-dir /tmp/samples --precision bf16 \
  2>&1 | tee -a "$OUT/train_log.txt"
cp $RUN/metrics.jsonl $RUN/demo_00004000.png $RUN/demo_00001000.png "$OUT/"
cp /tmp/samples/grid.png "$OUT/sample_grid.png"
