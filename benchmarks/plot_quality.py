"""Plot benchmarks/results/mnist_quality/quality_vs_steps.jsonl (from quality_vs_steps.py) to docs/quality_vs_steps.png."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
results = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/mnist_quality/quality_vs_steps.jsonl"
records = [json.loads(line) for line in results.read_text().splitlines()]
fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
for sampler in dict.fromkeys(r["sampler"] for r in records):
    rows = sorted((r["steps"], r["fid"]) for r in records if r["sampler"] == sampler)
    ax.plot([s for s, _ in rows], [f for _, f in rows], marker="o", label=sampler)
steps = sorted({r["steps"] for r in records})
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks(steps, [str(s) for s in steps])
ax.set_xlabel("sampler steps")
ax.set_ylabel(f"FID_mnist ({records[0]['n']} samples)")
ax.set_title(f"MNIST model after {records[0]['checkpoint_step']:,} steps: quality against steps")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(ROOT / "docs" / "quality_vs_steps.png")
