"""Cost of the emergence nulls: a 3-epoch tuner-shaped trial with and without them, same run.

    python benchmarks/emergence_cost.py                  # test preset, 600 sentences, 3 epochs, A/B/A/B

Each trial is ``cnn3d.train`` on the ``test`` preset with ``train.main_epochs=3`` (what the
tuner's default trial runs), on data prepared once beforehand. ``train.emergence_nulls`` is
switched off and on in alternating order (off, on, off, on, ...), so drift on a shared machine
hits both sides alike. Prints every wall time and the ratio of the means (on / off), and, because
a shared machine makes whole-run times noisy, the time spent inside the added analysis itself
(building the nulls once, comparing at every validated epoch) as a share of the "on" run.
Finally prints the last "on" run's emergence figures with both nulls and the excess.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cnn3d.train as T
from cnn3d import preset, with_overrides
from cnn3d.analysis import EMERGENCE_NAMES
from cnn3d.train import prepare_data, train

SPENT = {"seconds": 0.0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT["seconds"] += time.perf_counter() - start
    return wrapper


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
    T.emergence_nulls, T.emergence_with_nulls = _timed(T.emergence_nulls), _timed(T.emergence_with_nulls)
    times: dict[bool, list[float]] = {False: [], True: []}
    inside: list[float] = []
    for repeat in range(args.repeats):
        for nulls in (False, True):
            config = with_overrides(base, {"train.emergence_nulls": nulls})
            SPENT["seconds"] = 0.0
            start = time.perf_counter()
            result = train(config, data=data, progress=False)
            times[nulls].append(time.perf_counter() - start)
            if nulls:
                inside.append(SPENT["seconds"])
            print(f"  pair {repeat + 1} nulls={'on ' if nulls else 'off'}: {times[nulls][-1]:.1f} s"
                  + (f" (of which {SPENT['seconds']:.1f} s in the null analysis)" if nulls else ""), flush=True)
    off, on = statistics.fmean(times[False]), statistics.fmean(times[True])
    print(f"mean wall time: off {off:.1f} s, on {on:.1f} s; ratio on/off = {on / off:.3f} ({100 * (on / off - 1):+.1f}%)")
    print(f"time inside the null analysis: {statistics.fmean(inside):.1f} s = "
          f"{100 * statistics.fmean(inside) / on:.1f}% of the 'on' run")
    m = result.metrics
    print(f"val_cosine {m['val_cosine']:.4f} (pca {m['baseline_pca_cosine']:.4f}, mean {m['baseline_mean_cosine']:.4f})")
    print(f"{'metric':24} {'trained':>9} {'untrained':>9} {'shuffled':>9} {'excess':>9} {'± std':>7}")
    for name in EMERGENCE_NAMES:
        print(f"{name:24} {m[name]:9.4f} {m[name + '_null_untrained']:9.4f} {m[name + '_null_shuffled']:9.4f} "
              f"{m[name + '_excess']:+9.4f} {m[name + '_excess_std']:7.4f}")


if __name__ == "__main__":
    main()
