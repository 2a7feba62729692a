"""Two teachers on one cube vs one cube per teacher: each teacher's val_cosine as a fraction of its PCA ceiling.

    python benchmarks/multiteacher.py --sentences 480 --epochs 3

The teachers are the bundled MiniLM with mean pooling and with CLS pooling: two different
embedding spaces of the same dimension. All three students (two-teacher, mean only, CLS only)
use the same config, data, seed and training loop (``cnn3d.multiteacher.train_multi``); every
figure is printed beside that teacher's PCA ceiling and mean-vector floor on the same split.
"""

from __future__ import annotations

import argparse
import time

import torch

from cnn3d import preset, with_overrides
from cnn3d.config import TeacherConfig
from cnn3d.multiteacher import MultiData, prepare_multi, train_multi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test")
    parser.add_argument("--sentences", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = with_overrides(preset(args.preset), {"data.max_sentences": args.sentences, "train.main_epochs": args.epochs,
                                                  **dict(s.split("=", 1) for s in args.set)})
    teachers = {"mean": TeacherConfig(pooling="mean"), "cls": TeacherConfig(pooling="cls")}
    data = prepare_multi(config, teachers, torch.device("cpu"))
    print(f"{len(data.train_texts)} train / {len(data.val_texts)} val sentences, preset {args.preset}, "
          f"{args.epochs} epochs, threads {args.threads}")
    runs = {"two-teacher": data}
    for name in teachers:
        runs[f"{name} only"] = MultiData(data.train_texts, data.val_texts, {name: data.teachers[name]})
    for label, run_data in runs.items():
        start = time.perf_counter()
        m = train_multi(config, run_data).metrics
        cells = [f"{n}: {m[f'val_cosine/{n}']:.4f} = {m[f'val_cosine_fraction/{n}']:.3f} of pca "
                 f"{m[f'baseline_pca_cosine/{n}']:.4f} (mean floor {m[f'baseline_mean_cosine/{n}']:.4f})"
                 for n in run_data.teachers]
        print(f"{label:12} {' | '.join(cells)} | {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
