"""The trainer against its own bare step, in one process: how much the loop around the step costs.

    python benchmarks/trainer_step.py --threads 1 --sentences 640

Times the bare fused training step (forward, loss, backward, AdamW; batch 32, `test`
preset) before and after one real ``cnn3d.train`` epoch on the built-in corpus, and
compares the trainer's steady-state ``throughput_samples_per_s`` with the bare step's
samples/s (wall clock, both). Ratio 1.0 = the loop adds nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from cnn3d import build_model, preset, with_overrides
from cnn3d.train import prepare_data, train


def bare_rate(cfg, dim: int, batch: int, repeats: int) -> float:
    model = build_model(cfg, dim)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, dim)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = model(x)
        loss = (out.embedding - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/cnn3d/embeddings"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg = with_overrides(preset("test"), {"data.max_sentences": args.sentences, "train.main_epochs": 1,
                                          "data.cache_dir": args.cache_dir, "train.num_threads": args.threads})
    data = prepare_data(cfg, torch.device("cpu"))
    before = bare_rate(cfg, data.teacher_dim, cfg.train.batch_size, args.repeats)
    result = train(cfg, data=data, progress=False)
    after = bare_rate(cfg, data.teacher_dim, cfg.train.batch_size, args.repeats)
    trainer = result.metrics["throughput_samples_per_s"]
    print(f"threads={args.threads} bare step: {before:.1f} samples/s before, {after:.1f} after; "
          f"trainer: {trainer:.1f} samples/s = {trainer / max(before, after):.2f} of the best bare rate "
          f"({trainer / min(before, after):.2f} of the worst)")


if __name__ == "__main__":
    main()
