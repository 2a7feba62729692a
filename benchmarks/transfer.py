"""Transfer between cube sizes and growing during training, against training from scratch, in one run.

    python benchmarks/transfer.py --sentences 800 --source-epochs 5 --epochs 4 --grow 8x2
    python benchmarks/transfer.py --sentences 0 --epochs 3 --grow 8x1 --grow-only --skip-stretch \
        --target test --target-set lattice.size=12 lattice.steps=12      # growing into a deeper cube

1. Trains a source student on the ``test`` preset (8x8x8) and saves it.
2. Trains the target (``wide`` preset, 16x16 face, depth 8) from scratch and from the
   source (``train.init_from``), once per face map (``train.transfer_face``: ``embed``, the
   default, and ``stretch``; ``--skip-embed``/``--skip-stretch`` leave one out), same data,
   seed and schedule; the trained cube (gate, experts) at ``train.transfer_lr_mult`` of the maps'
   lr (``--cube-lr 1`` adds an arm without that); every transferred arm with its readout refitted
   (``train.readout_refit``, the default; ``--refit-nulls`` adds the arm without it and scratch with
   it, an untrained cube's fitted readout). Prints val_cosine right
   after the transfer and the refit (before any training; epoch 0 of the curves) beside an untrained
   target, then per epoch
   val_cosine, its fraction of the target's PCA ceiling and the cumulative seconds, and
   the epochs and seconds each arm needs to reach 0.5/0.7/0.8/0.9 x the ceiling.
3. Trains the target with ``train.grow_schedule`` (small first, then the target size; once
   per face map kept) for the same number of epochs, and compares quality at equal wall time
   with the fixed-size scratch run.

Every figure stands beside the PCA ceiling and the mean-vector floor of the same split.
Times come from one process on a possibly shared machine; compare arms, not absolutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cnn3d import build_model, preset, with_overrides
from cnn3d.train import baselines, evaluate, prepare_data, readout_refit_at_start, refit_for_training, train
from cnn3d.transfer import initial_student

FRACTIONS = (0.5, 0.7, 0.8, 0.9)


def curve(history: list[dict], start_seconds: float = 0.0) -> list[tuple[int, float, float]]:
    """(epoch, val_cosine, cumulative seconds) per validated epoch."""
    out, seconds = [], start_seconds
    for m in history:
        seconds += m["epoch_seconds"]
        if "val_cosine" in m:
            out.append((int(m["epoch"]), m["val_cosine"], seconds))
    return out


def first_reaching(points, threshold: float) -> tuple[int, float] | None:
    return next(((e, s) for e, v, s in points if v >= threshold), None)


def crossing(points, threshold: float) -> float | None:
    """Fractional epochs to ``threshold``, linear between the two epochs around it (1.0 if epoch 1 reaches it).

    Whole epochs make the ratio knife-edge: a curve 0.0003 over the mark gains an epoch.
    """
    previous = None
    for e, v, _ in points:
        if v >= threshold:
            return float(e) if previous is None else e - 1 + (threshold - previous) / (v - previous)
        previous = v
    return None


def at_time(points, seconds: float) -> float | None:
    """val_cosine of the last epoch finished within ``seconds``."""
    done = [v for _, v, s in points if s <= seconds]
    return done[-1] if done else None


def start_point(cfg, data, device) -> tuple[int, float, float]:
    """(0, val_cosine, seconds) of the student a run of ``cfg`` starts training from: the transfer of
    ``train.init_from`` and the readout refit, as ``train`` does them (the same seeds: the same weights)."""
    t0 = time.perf_counter()
    seeded, _ = initial_student(cfg, data.teacher_dim, device)
    if readout_refit_at_start(cfg):
        refit_for_training(seeded, cfg, data, device)
    seconds = time.perf_counter() - t0
    return 0, evaluate(seeded, data, cfg, device, None)["metrics"]["val_cosine"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=800, help="data.max_sentences (built-in corpus)")
    parser.add_argument("--source-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each target run")
    parser.add_argument("--target", default="wide", help="preset of the larger cube")
    parser.add_argument("--grow", default="8x2", help="train.grow_schedule of the growing run ('' skips it)")
    parser.add_argument("--fresh", action="store_true",
                        help="add an arm transferred with train.init_fresh_directions=true (docs/transfer.md)")
    parser.add_argument("--skip-embed", action="store_true",
                        help="leave out the arm transferred with train.transfer_face=embed (the default)")
    parser.add_argument("--skip-stretch", action="store_true",
                        help="leave out the arm transferred with train.transfer_face=stretch")
    parser.add_argument("--embed", action="store_true", help=argparse.SUPPRESS)  # older spelling: embed always runs now
    parser.add_argument("--cube-lr", type=float, nargs="*", default=[],
                        help="add an embed arm per value of train.transfer_lr_mult (the default arm uses the config's)")
    parser.add_argument("--grow-cube-lr", type=float, nargs="*", default=[],
                        help="add an embed growing arm per value of train.grow_lr_mult")
    parser.add_argument("--refit-nulls", action="store_true",
                        help="add the readout refit's nulls: the embed arm and each growing arm without it "
                             "(train.readout_refit=never), and scratch with it (always)")
    parser.add_argument("--grow-only", action="store_true",
                        help="only scratch and the growing runs (one per face map kept): no transfer arms")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--target-set", nargs="*", default=[],
                        help="key=value overrides for the target only, e.g. lattice.size=12 lattice.steps=12")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = {"data.max_sentences": args.sentences, "train.num_threads": args.threads, "train.device": "cpu",
              **dict(s.split("=", 1) for s in args.set)}
    source_cfg = with_overrides(preset("test"), {**common, "train.main_epochs": args.source_epochs})
    target_cfg = with_overrides(preset(args.target), {**common, "train.main_epochs": args.epochs,
                                                      **dict(s.split("=", 1) for s in args.target_set)})
    device = torch.device("cpu")
    data = prepare_data(target_cfg, device)
    print(f"data: {len(data.train_texts)} train / {len(data.val_texts)} val sentences; threads={args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "source"
        t0 = time.perf_counter()
        src = train(source_cfg, data=data, out_dir=folder, progress=False)
        src_seconds = time.perf_counter() - t0
        sm = src.metrics
        print(f"source 8x8x8: {args.source_epochs} epochs in {src_seconds:.0f}s, val_cosine {sm['val_cosine']:.4f} "
              f"(pca-{int(sm['face_numbers'])} {sm['baseline_pca_cosine']:.4f}, mean {sm['baseline_mean_cosine']:.4f})")

        base = baselines(data, target_cfg)
        ceiling, floor = base["baseline_pca_cosine"], base["baseline_mean_cosine"]
        dims = "x".join(map(str, target_cfg.lattice.dims))
        print(f"target {args.target} ({dims}, face {target_cfg.lattice.face_numbers}): pca ceiling {ceiling:.4f}, "
              f"mean floor {floor:.4f}")
        transfer_cfg = with_overrides(target_cfg, {"train.init_from": str(folder)})
        untrained = evaluate(build_model(target_cfg, data.teacher_dim), data, target_cfg, device, None)["metrics"]
        faces = [f for f, skip in (("embed", args.skip_embed), ("stretch", args.skip_stretch)) if not skip]
        variants = {f"transfer {face}": {"train.transfer_face": face} for face in faces}
        for mult in args.cube_lr:
            variants[f"transfer embed cube lr x{mult:g}"] = {"train.transfer_face": "embed", "train.transfer_lr_mult": mult}
        if args.fresh:
            variants["transfer stretch+fresh"] = {"train.transfer_face": "stretch", "train.init_fresh_directions": True}
        if args.refit_nulls:
            variants["transfer embed no refit"] = {"train.transfer_face": "embed", "train.readout_refit": "never"}
        variant_cfgs = {} if args.grow_only else {n: with_overrides(transfer_cfg, c) for n, c in variants.items()}
        if args.refit_nulls and not args.grow_only:
            variant_cfgs["scratch refit"] = with_overrides(target_cfg, {"train.readout_refit": "always"})
        starts = {}
        print(f"before training: scratch val_cosine {untrained['val_cosine']:.4f} | source on its own face "
              f"{sm['val_cosine']:.4f}")
        for name, cfg in variant_cfgs.items():
            starts[name] = start_point(cfg, data, device)
            _, value, seconds = starts[name]
            print(f"before training: {name} {value:.4f} ({value / ceiling:.3f} of ceiling; transfer step and readout "
                  f"refit {seconds:.1f}s)")

        runs = {"scratch": curve(train(target_cfg, data=data, progress=False).history)}
        for name, cfg in variant_cfgs.items():
            runs[name] = [starts[name]] + curve(train(cfg, data=data, progress=False).history, starts[name][2])
        if args.grow:
            for face in faces:
                grow_cfg = with_overrides(target_cfg, {"train.grow_schedule": args.grow, "train.transfer_face": face})
                runs[f"grow {args.grow} {face}"] = curve(train(grow_cfg, data=data, progress=False).history)
                if args.refit_nulls:
                    never = with_overrides(grow_cfg, {"train.readout_refit": "never"})
                    runs[f"grow {args.grow} {face} no refit"] = curve(train(never, data=data, progress=False).history)
            for mult in args.grow_cube_lr:
                grow_cfg = with_overrides(target_cfg, {"train.grow_schedule": args.grow, "train.transfer_face": "embed",
                                                       "train.grow_lr_mult": mult})
                runs[f"grow {args.grow} embed cube lr x{mult:g}"] = curve(train(grow_cfg, data=data, progress=False).history)
        report(runs, ceiling, args)


def report(runs: dict[str, list], ceiling: float, args) -> None:
    print("\nper epoch: val_cosine (fraction of ceiling) @ cumulative seconds")
    for name, points in runs.items():
        print(f"  {name:22} " + "  ".join(f"e{e}: {v:.4f} ({v / ceiling:.3f}) @{s:.0f}s" for e, v, s in points))
    print("\nepochs (seconds) to reach a fraction of the ceiling")
    for frac in FRACTIONS:
        cells = []
        for name, points in [(n, p) for n, p in runs.items() if not n.startswith("grow")]:
            hit = first_reaching(points, frac * ceiling)
            cells.append(f"{name} {hit[0]} ({hit[1]:.0f}s)" if hit else f"{name} not in {args.epochs}")
        print(f"  {frac:.1f} x ceiling: " + " | ".join(cells))
    scratch = runs["scratch"]
    for name, points in runs.items():
        if name == "scratch" or name.startswith("grow"):
            continue
        hits = first_reaching(scratch, 0.9 * ceiling), first_reaching(points, 0.9 * ceiling)
        if all(hits):
            between = crossing(scratch, 0.9 * ceiling), crossing(points, 0.9 * ceiling)
            trained = first_reaching([p for p in points if p[0] > 0], 0.9 * ceiling)  # a dip after the start counts
            print(f"  {name}/scratch epochs to 0.9 x ceiling: {hits[1][0] / hits[0][0]:.2f} (target <= 0.5); "
                  f"interpolated {between[1]:.2f}/{between[0]:.2f} = {between[1] / between[0]:.2f}; seconds "
                  f"{hits[1][1]:.0f}/{hits[0][1]:.0f} = {hits[1][1] / hits[0][1]:.2f}; first trained epoch at the mark "
                  + (f"{trained[0]} ({trained[0] / hits[0][0]:.2f})" if trained else f"none in {args.epochs}"))
        else:
            print(f"  {name}: 0.9 x ceiling not reached by both arms within the epochs run: ratio not measured")
    for name, grow in [(n, p) for n, p in runs.items() if n.startswith("grow")]:
        end = grow[-1][2]
        fixed = at_time(scratch, end)
        print(f"\nequal wall time ({end:.0f}s, {name}'s total): {name} {grow[-1][1]:.4f} "
              f"({grow[-1][1] / ceiling:.3f}) vs fixed size "
              + (f"{fixed:.4f} ({fixed / ceiling:.3f})" if fixed is not None else "no epoch finished yet"))


if __name__ == "__main__":
    main()
