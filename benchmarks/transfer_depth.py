"""Into a deeper cube: the distant links carried along depth (``embed``) against redrawn, same sources, one run.

    python benchmarks/transfer_depth.py --seeds 0 1 2 --source-epochs 15 --size 12 --epochs 1

For each seed, trains a source on the ``test`` preset (8x8x8, the built-in corpus) and moves it into a cube of
side ``--size`` (depth and face both, ``--steps`` lattice steps; default: as many as the depth) with
``train.transfer_face=embed``, two ways that differ only in the distant links:

- ``carried``: the block's links spread along the deeper cube (``cnn3d.transfer.embed_links``, this code);
- ``redrawn``: the target's own draw for every cell (what a deeper target got before: the old same-depth rule
  swapped in for the arm).

Prints, beside the target's PCA ceiling and mean floor on the same split and an untrained target: val_cosine
right after the transfer, then after each of ``--epochs`` epochs trained from there (``train.init_from`` the
source, same data, seed and schedule for both arms).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

import cnn3d.transfer as transfer_module
from cnn3d import build_model, preset, with_overrides
from cnn3d.checkpoint import save_checkpoint
from cnn3d.train import baselines, evaluate, prepare_data, train
from cnn3d.transfer import initial_student

LINKS = "processor.experts.distant.links"


def same_depth_only(src_dims, dst_dims) -> bool:
    """The rule before this change: links carried only into a cube of the same depth."""
    return src_dims != dst_dims and src_dims[0] == dst_dims[0] and all(s <= d for s, d in zip(src_dims, dst_dims))


def curve_text(history: list[dict], ceiling: float) -> str:
    """``e1 0.7548 (0.843)  e2 ...``: val_cosine per validated epoch and its fraction of the ceiling."""
    return "  ".join(f"e{int(m['epoch'])} {m['val_cosine']:.4f} ({m['val_cosine'] / ceiling:.3f})"
                     for m in history if "val_cosine" in m)


@contextlib.contextmanager
def links_rule(carry: bool):
    """``redrawn``: every transfer in the block (``train.init_from`` too) follows the old same-depth rule."""
    kept = transfer_module.embeds
    transfer_module.embeds = kept if carry else same_depth_only
    try:
        yield
    finally:
        transfer_module.embeds = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each source")
    parser.add_argument("--sentences", type=int, default=0, help="data.max_sentences (0: the whole built-in corpus)")
    parser.add_argument("--source-epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=12, help="side of the target cube (depth and face)")
    parser.add_argument("--steps", type=int, default=0, help="target's lattice.steps (0: its depth)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs trained from each transferred cube")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", action="store_true", help="also train the target from scratch, same schedule")
    args = parser.parse_args()

    common = {"data.max_sentences": args.sentences, "train.num_threads": args.threads, "train.device": "cpu"}
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} threads")
    for seed in args.seeds:
        source_cfg = with_overrides(preset("test"), {**common, "train.seed": seed, "train.main_epochs": args.source_epochs})
        target_cfg = with_overrides(source_cfg, {"lattice.size": args.size, "lattice.depth": args.size,
                                                 "lattice.steps": args.steps or args.size, "train.main_epochs": args.epochs})
        data = prepare_data(source_cfg, device, progress=False)
        t0 = time.perf_counter()
        source = train(source_cfg, data=data, progress=False)
        sm = source.metrics
        base = baselines(data, target_cfg)
        ceiling, floor = base["baseline_pca_cosine"], base["baseline_mean_cosine"]
        untrained = evaluate(build_model(target_cfg, data.teacher_dim), data, target_cfg, device, None)["metrics"]
        print(f"\nseed {seed}: source 8x8x8 val_cosine {sm['val_cosine']:.4f} (its pca {sm['baseline_pca_cosine']:.4f}) "
              f"after {args.source_epochs} epochs, {time.perf_counter() - t0:.0f}s; target "
              f"{'x'.join(map(str, target_cfg.lattice.dims))}, {target_cfg.lattice.steps} steps: pca ceiling "
              f"{ceiling:.4f}, mean floor {floor:.4f}, untrained {untrained['val_cosine']:.4f}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "source"
            save_checkpoint(folder, source.model, source_cfg, {"teacher_dim": data.teacher_dim})
            from_source = with_overrides(target_cfg, {"train.init_from": str(folder), "train.transfer_face": "embed"})
            for arm, carry in (("carried", True), ("redrawn", False)):
                with links_rule(carry):
                    student, meta = initial_student(from_source, data.teacher_dim, device)
                    assert any(e.startswith(LINKS) for e in meta["transfer"]["resampled" if carry else "redrawn"])
                    start = evaluate(student, data, target_cfg, device, None)["metrics"]["val_cosine"]
                    t0 = time.perf_counter()
                    run = train(from_source, data=data, progress=False)
                curve = curve_text(run.history, ceiling)
                print(f"  links {arm}: after transfer {start:.4f} ({start / ceiling:.3f} of ceiling) | {curve} "
                      f"| {time.perf_counter() - t0:.0f}s")
            if args.scratch:
                t0 = time.perf_counter()
                run = train(target_cfg, data=data, progress=False)
                curve = curve_text(run.history, ceiling)
                print(f"  scratch: {curve} | {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
