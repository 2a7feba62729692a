"""``peak_memory_mb`` of a small run after a big one in the same process, against the small one alone.

    python benchmarks/memory_metric.py --big 10 --small 5

Prints the trainer's figure (the run's own peak: parameters, gradients, optimiser state,
saved activations) beside the process RSS (what the metric used to be, which never shrinks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import psutil
import torch

from cnn3d import preset, with_overrides
from cnn3d.train import prepare_data, train


def config(size: int, cache_dir: str):
    return with_overrides(preset("test"), {"lattice.size": size, "lattice.steps": size, "data.max_sentences": 64,
                                           "train.main_epochs": 1, "train.batch_size": 16, "data.cache_dir": cache_dir,
                                           "train.num_threads": 1})


def run(sizes: list[int], cache_dir: str) -> list[dict]:
    data = prepare_data(config(sizes[0], cache_dir), torch.device("cpu"))
    rows = []
    for size in sizes:
        metrics = train(config(size, cache_dir), data=data, progress=False).metrics
        rows.append({"size": size, "peak_memory_mb": metrics["peak_memory_mb"],
                     "rss_mb": psutil.Process().memory_info().rss / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=10)
    parser.add_argument("--small", type=int, default=5)
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/cnn3d/embeddings"))
    parser.add_argument("--child", nargs="*", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.cache_dir)))
        return
    results = {}
    for label, sizes in (("small alone", [args.small]), ("big then small", [args.big, args.small])):
        out = subprocess.run([sys.executable, __file__, "--cache-dir", args.cache_dir, "--child", *map(str, sizes)],
                             capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    for label, rows in results.items():
        for row in rows:
            print(f"{label:>15}: {row['size']}^3 peak_memory_mb={row['peak_memory_mb']:.1f} (process RSS {row['rss_mb']:.0f} MB)")
    alone, after = results["small alone"][-1], results["big then small"][-1]
    print(f"small after big / small alone: peak_memory_mb {after['peak_memory_mb'] / alone['peak_memory_mb']:.3f}, "
          f"RSS {after['rss_mb'] / alone['rss_mb']:.3f}")


if __name__ == "__main__":
    main()
