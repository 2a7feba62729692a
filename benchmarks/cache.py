"""Cold vs warm embedding throughput through the on-disk cache.

    HF_HUB_OFFLINE=1 python benchmarks/cache.py [--sentences 1000] [--device cpu] [--dtype float32]

Cold: every sentence goes through the teacher and is written to a fresh temporary cache.
Warm: a new ``EmbeddingCache`` on the same folder (so shards are read back from disk, as a new process would)
serves the same sentences; the teacher's forward-pass counter must not move.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from importlib import resources

import torch

from cnn3d.cache import EmbeddingCache, embed_with_cache
from cnn3d.cli import resolve_device
from cnn3d.config import TeacherConfig
from cnn3d.teacher import load_teacher


def corpus(n: int) -> list[str]:
    """The first ``n`` lines of the built-in corpus, else generated sentences."""
    path = resources.files("cnn3d").joinpath("corpus/builtin.txt")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
    subjects, verbs, objects = ["the cat", "a farmer", "the river", "my friend"], ["sees", "moves", "likes"], ["a boat", "the hill", "music"]
    while len(lines) < n:
        i = len(lines)
        lines.append(f"{subjects[i % 4]} {verbs[i // 4 % 3]} {objects[i // 12 % 3]} number {i}")
    return lines[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--dtype", default="float32", choices=("float16", "float32"))
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    texts = corpus(args.sentences)
    start = time.perf_counter()
    teacher = load_teacher(TeacherConfig(model=args.model, batch_size=args.batch_size), resolve_device(args.device))
    print(f"teacher {teacher.identity} dim {teacher.dim} on {teacher.device}, loaded in {time.perf_counter() - start:.2f} s")
    print(f"{len(texts)} sentences, cache dtype {args.dtype}, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(prefix="cnn3d-cache-bench-") as folder:
        cold_cache = EmbeddingCache(folder, dtype=args.dtype)
        start = time.perf_counter()
        cold = embed_with_cache(teacher, texts, cold_cache)
        cold_s = time.perf_counter() - start
        passes_after_cold = teacher.forward_passes

        warm_cache = EmbeddingCache(folder, dtype=args.dtype)
        start = time.perf_counter()
        warm = embed_with_cache(teacher, texts, warm_cache)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        embed_with_cache(teacher, texts, warm_cache)
        hot_s = time.perf_counter() - start
        warm_passes = teacher.forward_passes - passes_after_cold
        disk = warm_cache.disk_usage()

    cold_rate, warm_rate, hot_rate = len(texts) / cold_s, len(texts) / warm_s, len(texts) / hot_s
    print(f"cold: {cold_rate:10.1f} teacher sentences/s  ({cold_s:.2f} s, {passes_after_cold} forward passes, "
          f"{cold_cache.stats.computed} computed)")
    print(f"warm: {warm_rate:10.1f} cached embeddings/s  ({warm_s * 1000:.1f} ms, new cache instance reading "
          f"{disk} bytes from disk)")
    print(f"hot:  {hot_rate:10.1f} cached embeddings/s  ({hot_s * 1000:.1f} ms, same instance, index in memory)")
    print(f"speed-up warm/cold: {warm_rate / cold_rate:.0f}x; hot/cold: {hot_rate / cold_rate:.0f}x")
    print(f"teacher forward passes during warm passes: {warm_passes}; hit rate {warm_cache.stats.hit_rate:.3f}; "
          f"max |cold - warm| = {float((cold - warm).abs().max()):.3g}")
    if warm_passes != 0 or not torch.equal(cold, warm):
        print("FAIL: the warm pass used the teacher or returned different vectors", file=sys.stderr)
        return 1
    print("OK: second pass did zero teacher forward passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
