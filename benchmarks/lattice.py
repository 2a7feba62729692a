"""Forward+backward throughput of the lattice student, against a dense matmul in the same process.

    python benchmarks/lattice.py                       # 8^3, 16^3, 24^3 on CPU
    python benchmarks/lattice.py --sizes 37 --device cuda --batch 8

For each size: samples/s and cell-steps/s of one training step (forward, backward,
AdamW update) with the default MoE, the FLOPs torch's FlopCounterMode counts for it
(convolutions and matmuls only; elementwise work is not counted, so the GFLOP/s
figure is a lower bound on work done), the achieved GFLOP/s, and its ratio to a
dense square matmul timed in the same run. Machines are shared and noisy: every
figure is the best of several repeats, and ratios are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnn3d import build_model, preset, with_overrides

TEACHER_DIM = 384


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(device: torch.device, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / best_seconds(lambda: a @ b, device, repeats) / 1e9


def lattice_case(size: int, batch: int, steps: int, device: torch.device, repeats: int, overrides: dict) -> dict:
    cfg = with_overrides(preset("test"), {"lattice.size": size, "lattice.steps": steps, **overrides})
    model = build_model(cfg, TEACHER_DIM).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, TEACHER_DIM, device=device)

    def train_step():
        out = model(x)
        loss = (out.embedding - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        train_step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = best_seconds(train_step, device, repeats)
    cells = size**3
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "ms_per_step": seconds * 1e3,
        "samples_per_s": batch / seconds,
        "cell_steps_per_s": batch * cells * steps / seconds,
        "gflops": flops / seconds / 1e9,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--batch", type=int, default=0, help="0 = 32 at 8^3, 8 at 16^3, 2 above")
    parser.add_argument("--steps", type=int, default=0, help="0 = the lattice depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)  # as the trainer does: denormals slow CPU kernels many-fold
    overrides = dict(item.split("=", 1) for item in args.set)
    reference = matmul_gflops(device, args.matmul_n, args.repeats)
    print(f"device={device} threads={torch.get_num_threads()} dense {args.matmul_n}^2 matmul: {reference:.1f} GFLOP/s")
    header = f"{'lattice':>8} {'batch':>5} {'steps':>5} {'ms/step':>9} {'samples/s':>10} {'cell-steps/s':>13}"
    print(header + f" {'GFLOP/s':>8} {'vs matmul':>9} {'peak MB':>8}")
    rows = []
    for size in args.sizes:
        batch = args.batch or (32 if size <= 8 else 8 if size <= 16 else 2)
        row = lattice_case(size, batch, args.steps or size, device, args.repeats, overrides)
        rows.append(row)
        print(
            f"{size:>6}^3 {batch:>5} {row['steps']:>5} {row['ms_per_step']:>9.1f} {row['samples_per_s']:>10.1f} "
            f"{row['cell_steps_per_s']:>13.3g} {row['gflops']:>8.1f} {row['gflops'] / reference:>9.2f} "
            f"{row['peak_mb']:>8.0f}"
        )
    reference_after = matmul_gflops(device, args.matmul_n, args.repeats)
    drift = abs(reference_after - reference) / statistics.mean([reference, reference_after])
    print(f"dense matmul again: {reference_after:.1f} GFLOP/s (drift {drift:.0%}; large drift = noisy machine)")


if __name__ == "__main__":
    main()
