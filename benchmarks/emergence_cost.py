"""Cost of the emergence nulls: a 3-epoch tuner-shaped trial with and without them, same run.

    python benchmarks/emergence_cost.py                  # test preset, 600 sentences, 3 epochs, A/B/A/B

Each trial is ``cnn3d.train`` on the ``test`` preset with ``train.main_epochs=3`` (what the
tuner's default trial runs), on data prepared once beforehand. ``train.emergence_nulls`` is
switched off and on in alternating order (off, on, off, on, ...), so drift on a shared machine
hits both sides alike. Prints every wall time and the ratio of the means (on / off).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cnn3d import preset, with_overrides
from cnn3d.train import prepare_data, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=600, help="data.max_sentences (0 = the whole corpus)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of (off, on) runs")
    parser.add_argument("--preset", default="test")
    args = parser.parse_args()
    base = with_overrides(preset(args.preset), {"train.main_epochs": args.epochs, "data.max_sentences": args.sentences})
    data = prepare_data(base, torch.device("cpu"))
    print(f"{args.preset} preset, {len(data.train_texts)} train / {len(data.val_texts)} validation sentences, "
          f"{args.epochs} epochs, torch threads {torch.get_num_threads()}")
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for nulls in (False, True):
            config = with_overrides(base, {"train.emergence_nulls": nulls})
            start = time.perf_counter()
            train(config, data=data, progress=False)
            times[nulls].append(time.perf_counter() - start)
            print(f"  pair {repeat + 1} nulls={'on ' if nulls else 'off'}: {times[nulls][-1]:.1f} s", flush=True)
    off, on = statistics.fmean(times[False]), statistics.fmean(times[True])
    print(f"mean wall time: off {off:.1f} s, on {on:.1f} s; ratio on/off = {on / off:.3f} ({100 * (on / off - 1):+.1f}%)")


if __name__ == "__main__":
    main()
