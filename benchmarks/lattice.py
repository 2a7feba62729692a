"""Forward+backward throughput of the lattice student, against a dense matmul in the same process.

    python benchmarks/lattice.py                       # 8^3, 16^3, 24^3 on CPU
    python benchmarks/lattice.py --sizes 37 --device cuda --batch 8

For each size: samples/s and cell-steps/s of one training step (forward, backward,
AdamW update) with the default MoE, the FLOPs torch's FlopCounterMode counts for it
(convolutions and matmuls only; elementwise work is not counted, so the GFLOP/s
figure is a lower bound on work done), the achieved GFLOP/s, and its ratio to a
dense square matmul timed in the same run. Step formulations (``reference`` = the
straightforward step, ``fused`` = ``cnn3d.fused`` (with ``cnn3d/native.c``'s kernels where they
build), ``fused-torch`` = the same step in torch ops alone, ``fused-prev`` = the same with the local
and distant experts' previous kernels (aten convolution, gathered-partner matmul), ``compiled`` = the fused step through
``torch.compile``/CUDA graphs, ``fused-bf16`` = the fused step under bf16 autocast) run on the same model, alternately with the matmul in each
round: machines are shared and noisy, every figure is the best of several rounds, and
ratios are what to compare.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnn3d import build_model, preset, with_overrides
from cnn3d import fused as fused_module
from cnn3d.device import cpu_model, resolve_device
from cnn3d.errors import UserError
from cnn3d.fused import compile_step

TEACHER_DIM = 384


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock process: CPU seconds of this process (robust on a shared machine, 1 thread)


def timed(fn, device) -> float:
    sync(device)
    start = CLOCK()
    fn()
    sync(device)
    return CLOCK() - start


def _previous_local(expert, rows, use_native=False):
    """Issue 13's first fused step: the local expert's own ``Conv3d`` (oneDNN forward and backward)."""
    return expert(rows.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


def _previous_distant(expert, value, use_native=False):
    """Issue 13's first fused step: gather the partners ``[B, N, links, C]`` and mix them with one matmul."""
    b, d, h, w, c = value.shape
    flat = value.reshape(b, d * h * w, c)
    partners = flat.index_select(1, expert.links.view(-1)).view(b, d * h * w, expert.neighbours, c)
    return torch.matmul(expert.link_weight.softmax(0).to(value.dtype), partners).view(b, d, h, w, c)


def matmul_step(device: torch.device, n: int):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda: a @ b


def lattice_steps(size: int, batch: int, steps: int, device: torch.device, overrides: dict, variants: list[str]):
    """One training-step closure per variant, all on the same model, and the FLOPs of one step."""
    cfg = with_overrides(preset("test"), {"lattice.size": size, "lattice.steps": steps, **overrides})
    model = build_model(cfg, TEACHER_DIM).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, TEACHER_DIM, device=device)
    eager_step = model.processor.step_rows

    def train_step():
        out = model(x)
        loss = (out.embedding - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    compiled = {}

    def variant(name):
        def run():
            model.fused = name != "reference"
            # fused-torch (and the historical fused-prev): the fused step in torch ops alone
            model.processor.native = name not in ("fused-torch", "fused-prev")
            if name == "fused-bf16":  # the fused step under bf16 autocast (train.precision=bf16)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    model.processor.step_rows = eager_step
                    train_step()
                return
            if name == "fused-prev":  # the same fused step with the local and distant kernels it had before
                saved = fused_module._stencil_rows, fused_module._distant
                fused_module._stencil_rows, fused_module._distant = _previous_local, _previous_distant
                try:
                    model.processor.step_rows = eager_step
                    train_step()
                finally:
                    fused_module._stencil_rows, fused_module._distant = saved
                return
            if name == "compiled":
                if "step" not in compiled:
                    compile_step(model, mode="reduce-overhead" if device.type == "cuda" else None)
                    compiled["step"] = model.processor.step_rows
                model.processor.step_rows = compiled["step"]
            else:
                model.processor.step_rows = eager_step
            train_step()
        return run

    # counted on the fused step in torch ops: a native kernel's FLOPs (the convolution's weight gradient) are
    # invisible to the counter, and the work per step must not depend on which code runs it
    model.fused, model.processor.native = True, False
    with FlopCounterMode(display=False) as counter:
        train_step()
    return {name: variant(name) for name in variants}, counter.get_total_flops()


def measure(size, batch, steps, device, repeats, overrides, variants, matmul_n) -> list[dict]:
    """Interleaved rounds: matmul, then each variant once; best of ``repeats`` rounds for each."""
    runs, flops = lattice_steps(size, batch, steps, device, overrides, variants)
    matmul = matmul_step(device, matmul_n)
    timed(matmul, device)
    for name, fn in list(runs.items()):  # warm-up twice (compiles, records graphs, allocator)
        try:
            timed(fn, device)
            timed(fn, device)
        except Exception as exc:  # noqa: BLE001 - a failed compile must not hide the other rows
            print(f"{size:>6}^3 {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            del runs[name]
    best = {name: float("inf") for name in ["matmul", *runs]}
    peaks = {}
    for _ in range(repeats):
        best["matmul"] = min(best["matmul"], timed(matmul, device))
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            best[name] = min(best[name], timed(fn, device))
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    reference = 2 * matmul_n**3 / best["matmul"] / 1e9
    rows = []
    for name in runs:
        seconds = best[name]
        rows.append({
            "size": size, "batch": batch, "steps": steps, "variant": name, "ms_per_step": seconds * 1e3,
            "samples_per_s": batch / seconds, "cell_steps_per_s": batch * size**3 * steps / seconds,
            "gflops": flops / seconds / 1e9, "matmul_gflops": reference, "vs_matmul": flops / seconds / 1e9 / reference,
            "speedup": best[next(iter(runs))] / seconds, "peak_mb": peaks[name],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--batch", type=int, default=0, help="0 = 32 at 8^3, 8 at 16^3, 2 above")
    parser.add_argument("--steps", type=int, default=0, help="0 = the lattice depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", default=None, choices=["reference", "fused-prev", "fused-torch", "fused", "fused-bf16", "compiled"],
                        help="step formulations, timed alternately (default: reference fused, + compiled on CUDA)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process = CPU time of this process: on a loaded machine use it with --threads 1")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter

    try:
        device = resolve_device(args.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)  # as the trainer does: denormals slow CPU kernels many-fold
    variants = args.variants or (["reference", "fused"] + (["compiled"] if device.type == "cuda" else []))
    overrides = dict(item.split("=", 1) for item in args.set)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device={device} ({name}) threads={torch.get_num_threads()} clock={args.clock} torch={torch.__version__}")
    header = f"{'lattice':>8} {'batch':>5} {'steps':>5} {'variant':>9} {'ms/step':>9} {'samples/s':>10}"
    print(header + f" {'cell-steps/s':>13} {'GFLOP/s':>8} {'matmul':>8} {'vs matmul':>9} {'speedup':>7} {'peak MB':>8}")
    for size in args.sizes:
        batch = args.batch or (32 if size <= 8 else 8 if size <= 16 else 2)
        for row in measure(size, batch, args.steps or size, device, args.repeats, overrides, variants, args.matmul_n):
            print(
                f"{size:>6}^3 {batch:>5} {row['steps']:>5} {row['variant']:>9} {row['ms_per_step']:>9.1f} "
                f"{row['samples_per_s']:>10.1f} {row['cell_steps_per_s']:>13.3g} {row['gflops']:>8.1f} "
                f"{row['matmul_gflops']:>8.1f} {row['vs_matmul']:>9.3f} {row['speedup']:>7.2f} {row['peak_mb']:>8.0f}",
                flush=True,
            )



if __name__ == "__main__":
    main()
