"""Plot benchmarks/results/train/h100_scaling_eager.jsonl (from bench_scaling.py) to docs/scaling.png."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
results = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/train/h100_scaling_eager.jsonl"
records = [json.loads(line) for line in results.read_text().splitlines()]
labels = {"hdit": "HDiT (patch 4, + one NA level per doubling)", "dit_b4_shape": "DiT-B/4 shape (global attention)"}
fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
for family, label in labels.items():
    rows = sorted((r["resolution"], r["ms_per_img_per_mpix"]) for r in records if r["family"] == family)
    ax.plot([r for r, _ in rows], [t for _, t in rows], marker="o", label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks([128, 256, 512, 1024], ["128", "256", "512", "1024"])
ax.set_xlabel("resolution (pixels per side)")
ax.set_ylabel("training ms per image per megapixel")
ax.set_title("Training cost per pixel, one H100, bf16")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(ROOT / "docs" / "scaling.png")
