"""The headline study, timed end to end: ``cnn3d-tune --param transform.dropout --trials N``.

    python benchmarks/study.py --trials 4                          # this checkout
    python benchmarks/study.py --trials 4 --cli /work/main/.venv/bin/cnn3d-tune --label main

The command runs as a user types it, so with its default ``--workers auto`` (one single-threaded
worker per core since the eleventh session; ``--extra --workers 1`` for one process). With several
workers the per-trial parts below are summed over each trial's own time, so they add up to more
than the wall time per trial.

Runs the real CLI in a fresh folder under /tmp (its own SQLite study, MLflow store and
report), then reads the timings back from the Optuna storage, so the same breakdown is
available for any version of the code, instrumented or not:

- start-up: process start to the first trial's start (imports, study, MLflow parent run);
- data: per trial, ``train_seconds`` minus the epochs (corpus, teacher + cache, model build); the epochs
  come from the trial's MLflow run (or, for older code, from its ``history`` attribute);
- training / evaluation: per epoch, the training part is ``train_sentences / throughput``,
  the rest of ``epoch_seconds`` is validation (only on validated epochs) and checkpoint-free
  bookkeeping;
- tracking: per trial, trial wall time minus ``train_seconds`` (MLflow/Optuna calls,
  lattice snapshot);
- report: last trial's end to process exit (summary, HTML report).

The 50-trial figure is extrapolated as start-up + report + 50 x mean seconds per trial
(the report grows slowly with the trial count; the extrapolation ignores that). A second,
"steady" figure counts once what only the worker's first trial pays (its data part beyond the
other trials' mean: the teacher loaded to fingerprint the cache, kernels built), and 50 x the
rest: with 4 trials the plain mean charges a quarter of that one-off cost to every trial.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent.parent


def run_study(cli: str, trials: int, epochs: int, folder: Path, cache_dir: str, extra: list[str]) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder}/study.db"
    command = [cli, "--param", "transform.dropout", "--trials", str(trials), "--set", f"train.main_epochs={epochs}",
               "--set", f"data.cache_dir={cache_dir}", "--storage", storage, "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
               "--name", "bench", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"study failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    study = optuna.load_study(study_name="bench", storage=storage)
    result = breakdown(study, started, ended, mlflow_history(f"sqlite:///{folder}/mlflow.db"))
    # CPU seconds the study used (all its threads): on a shared machine, less sensitive to the load than wall time
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


EPOCH_KEYS = ("epoch_seconds", "train_sentences", "throughput_samples_per_s")


def mlflow_history(tracking_uri: str):
    """``history(trial) -> [per-epoch dict]`` read from the trial's MLflow run: where the per-epoch figures
    live since Optuna stopped keeping a copy (older code kept them in the trial's ``history`` attribute)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)

    def history(trial) -> list[dict]:
        if "history" in trial.user_attrs:
            return trial.user_attrs["history"]
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            return []
        series = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in EPOCH_KEYS}
        epochs = sorted(set.intersection(*(set(v) for v in series.values())))
        return [{key: series[key][e] for key in EPOCH_KEYS} for e in epochs]

    return history


def breakdown(study: optuna.Study, started: float, ended: float, history_of) -> dict:
    done = sorted((t for t in study.trials if t.datetime_complete is not None), key=lambda t: t.datetime_start)
    first = min(t.datetime_start.timestamp() for t in done)
    last = max(t.datetime_complete.timestamp() for t in done)
    per = {"data": 0.0, "training": 0.0, "evaluation": 0.0, "tracking": 0.0}
    data_each = []
    for t in done:
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        train_s = float(t.user_attrs.get("train_seconds", wall))
        history = history_of(t)
        epochs = sum(h["epoch_seconds"] for h in history)
        training = sum(h["train_sentences"] / h["throughput_samples_per_s"] for h in history)
        per["training"] += min(training, epochs)
        per["evaluation"] += max(0.0, epochs - training)
        per["data"] += max(0.0, train_s - epochs)
        data_each.append(max(0.0, train_s - epochs))
        per["tracking"] += max(0.0, wall - train_s)
    n = len(done)
    result = {
        "trials": n,
        "states": sorted(t.state.name for t in done),
        "wall_s": ended - started,
        "startup_s": first - started,
        "report_s": ended - last,
        "per_trial_s": (last - first) / n,
        **{f"{k}_per_trial_s": v / n for k, v in per.items()},
    }
    result["extrapolated_50_s"] = result["startup_s"] + result["report_s"] + 50 * result["per_trial_s"]
    # What only a worker's first trial pays (the teacher loaded for the cache's fingerprint, the kernels
    # built): the first trial's data part beyond the others' mean. A 50-trial study pays it once, so the
    # steady figure counts it once and every other part of every trial as measured (pruned share included).
    one_off = max(0.0, data_each[0] - sum(data_each[1:]) / (n - 1)) if n > 1 else 0.0
    result["one_off_s"] = one_off
    result["steady_per_trial_s"] = result["per_trial_s"] - one_off / n
    result["extrapolated_50_steady_s"] = (result["startup_s"] + result["report_s"] + one_off
                                          + 50 * result["steady_per_trial_s"])
    result["effects"] = {round(t.params.get("transform.dropout", float("nan")), 4): round(t.values[0], 4)
                         for t in done if t.values}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", nargs="+", default=[str(Path(sys.executable).parent / "cnn3d-tune")],
                        help="one or more cnn3d-tune executables, run in turn (alternating with --rounds)")
    parser.add_argument("--label", nargs="+", default=None)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache-dir", default="/tmp/cnn3d-bench-cache")
    parser.add_argument("--out", default="/tmp/cnn3d-study-bench")
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more cnn3d-tune arguments")
    args = parser.parse_args()
    labels = args.label or [f"cli{i}" for i in range(len(args.cli))]
    results = []
    for r in range(args.rounds):
        for cli, label in zip(args.cli, labels):
            row = run_study(cli, args.trials, args.epochs, Path(args.out) / f"{label}-{r}", args.cache_dir, args.extra)
            row.update(label=label, round=r)
            results.append(row)
            print(json.dumps(row), flush=True)
    keys = ["wall_s", "cpu_s", "startup_s", "per_trial_s", "data_per_trial_s", "training_per_trial_s",
            "evaluation_per_trial_s", "tracking_per_trial_s", "report_s", "extrapolated_50_s", "one_off_s",
            "steady_per_trial_s", "extrapolated_50_steady_s"]
    print(f"{'label':>8} " + " ".join(f"{k:>22}" for k in keys))
    for row in results:
        print(f"{row['label']:>8} " + " ".join(f"{row[k]:>22.1f}" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
