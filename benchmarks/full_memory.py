"""Peak memory of one forward+backward pass of the `full` preset (37^3, 40 steps) at batch 2 on CPU.

    python benchmarks/full_memory.py

Each case runs in a fresh process (peak RSS is per process): with gradient checkpointing
across steps (the preset's default) and without, plus a process that only builds the model,
the baseline the other two are compared with.
"""

from __future__ import annotations

import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, time, torch
from cnn3d import build_model, preset, with_overrides
torch.set_num_threads(2); torch.set_flush_denormal(True)
mode = sys.argv[1]
cfg = with_overrides(preset("full"), {"train.gradient_checkpointing": mode == "checkpointing"})
model = build_model(cfg, 384)
start = time.perf_counter()
if mode != "build-only":
    out = model(torch.randn(2, 384))
    out.embedding.pow(2).mean().backward()
seconds = time.perf_counter() - start
print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    rows = []
    for mode in ("build-only", "checkpointing", "no-checkpointing"):
        out = subprocess.run([sys.executable, "-c", CASE, mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print(f"{'mode':18} {'fwd+bwd s':>9} {'peak RSS MB':>12} {'above build-only':>17}")
    for row in rows:
        print(f"{row['mode']:18} {row['seconds']:>9.1f} {row['peak_rss_mb']:>12.0f} {row['peak_rss_mb'] - base:>17.0f}")


if __name__ == "__main__":
    main()
