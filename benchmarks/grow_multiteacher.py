"""Growing with several teachers vs a fixed-size cube with the same teachers: quality per teacher at equal wall time.

    python benchmarks/grow_multiteacher.py --epochs 3 --grow 8x1 --seeds 0 1

Both arms run ``cnn3d-train``'s loop (``cnn3d.train.train``) on the ``wide`` preset (16x16 face, depth 8) with a
second teacher (``teacher.extra=cls:cls``: the bundled MiniLM with CLS pooling beside the main one's mean pooling),
same data, seed and epochs; the growing arm trains the first epochs of ``--grow`` at the small size. Prints per
epoch each teacher's val_cosine as a fraction of its own PCA ceiling *for the face trained in that epoch*, the
cumulative seconds, and, at the growing arm's total time, the fixed arm's last finished epoch against it,
measured against the target face's ceiling so that both arms are on one scale.
"""

from __future__ import annotations

import argparse

import torch

from cnn3d import preset, with_overrides
from cnn3d.train import prepare_data, train

TEACHERS = ("main", "cls")


def points(history: list[dict]) -> list[tuple[int, float, dict[str, float]]]:
    """(epoch, cumulative seconds, {teacher: val_cosine}) per epoch."""
    out, seconds = [], 0.0
    for m in history:
        seconds += m["epoch_seconds"]
        out.append((int(m["epoch"]), seconds, {t: m[f"val_cosine/{t}"] for t in TEACHERS}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sentences", type=int, default=0, help="data.max_sentences (0: the whole built-in corpus)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--grow", default="8x1", help="train.grow_schedule of the growing arm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cpu")
    for seed in args.seeds:
        fixed = with_overrides(preset("wide"), {"data.max_sentences": args.sentences, "train.main_epochs": args.epochs,
                                                "train.num_threads": args.threads, "train.device": "cpu",
                                                "train.seed": seed, "teacher.extra": "cls:cls"})
        grow = with_overrides(fixed, {"train.grow_schedule": args.grow})
        data = prepare_data(fixed, device, progress=False)
        runs = {name: train(cfg, data=data, progress=False) for name, cfg in (("fixed", fixed), (f"grow {args.grow}", grow))}
        final = runs["fixed"].metrics
        ceilings = {t: final[f"baseline_pca_cosine/{t}"] for t in TEACHERS}  # the target face's, both arms
        print(f"\nseed {seed}: {len(data.train_texts)} train sentences; target ceilings "
              + ", ".join(f"{t} {c:.4f}" for t, c in ceilings.items()) + "; mean-vector floors "
              + ", ".join(f"{t} {final[f'baseline_mean_cosine/{t}']:.4f}" for t in TEACHERS))
        for name, run in runs.items():
            cells = [f"e{m['epoch']} face {int(m['face_numbers'])}: "
                     + "/".join(f"{m[f'val_cosine_fraction/{t}']:.3f}" for t in TEACHERS) + f" @{seconds:.0f}s"
                     for m, (_, seconds, _) in zip(run.history, points(run.history))]
            print(f"  {name:10} " + " | ".join(cells))
        grown = points(runs[f"grow {args.grow}"].history)
        end, values = grown[-1][1], grown[-1][2]
        done = [v for _, s, v in points(runs["fixed"].history) if s <= end]
        fixed_text = (", ".join(f"{t} {done[-1][t] / ceilings[t]:.3f}" for t in TEACHERS) if done
                      else "no epoch finished")
        print(f"  at {end:.0f}s (the growing arm's total), of the target's ceilings: grow "
              + ", ".join(f"{t} {values[t] / ceilings[t]:.3f}" for t in TEACHERS) + f" | fixed {fixed_text}")


if __name__ == "__main__":
    main()
