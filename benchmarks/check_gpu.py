"""GPU correctness of the fast paths, before timing them: FlexAttention neighborhood attention against the
reference (forward and backward, bf16 and fp32), and a compiled model against the eager one.
Prints one JSON line per check with the relative error ||fast - ref|| / ||ref||."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hdiffusion.models.attention import neighborhood_attention  # noqa: E402
from hdiffusion.models.hdit import HDiT  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_flex(h, w, kernel_size, dtype):
    q, k, v = (torch.randn(2, h, w, 4, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, h, w, 4, 64, device="cuda", dtype=dtype)
    results = {}
    for backend in ("reference", "flex"):
        out = neighborhood_attention(q, k, v, kernel_size, scale=0.125, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        results[backend] = (out, *grads)
    errors = [rel(f, r) for f, r in zip(results["flex"], results["reference"])]
    return {"check": "flex_vs_reference", "grid": [h, w], "kernel": kernel_size, "dtype": str(dtype),
            "out": errors[0], "dq": errors[1], "dk": errors[2], "dv": errors[3], "pass": max(errors) < 2e-2}


def check_compiled_model():
    torch.manual_seed(0)
    model = HDiT(3, 3, 4, widths=[128], middle_width=256, depths=[2], middle_depth=2, num_classes=10).cuda()
    for p in model.parameters():  # leave the zero-initialised state so the check sees real outputs
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)
    x, c_noise = torch.randn(4, 3, 128, 128, device="cuda"), torch.randn(4, device="cuda")
    labels = torch.randint(10, (4,), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        eager = model(x, c_noise, class_cond=labels)
        compiled_model = torch.compile(model)
        compiled = compiled_model(x, c_noise, class_cond=labels)
    return {"check": "compiled_vs_eager_hdit", "out": rel(compiled, eager), "pass": rel(compiled, eager) < 2e-2}


if __name__ == "__main__":
    checks = [check_flex(h, w, k, dtype) for (h, w, k) in [(64, 64, 7), (32, 48, 7), (16, 16, 7), (28, 20, 5)]
              for dtype in (torch.float32, torch.bfloat16)]
    checks.append(check_compiled_model())
    for check in checks:
        print(json.dumps(check), flush=True)
    sys.exit(0 if all(c["pass"] for c in checks) else 1)
