"""Cost of the tuner itself: Optuna + MLflow overhead per trial, and trials/minute with 1 vs 2 workers.

    python benchmarks/tuner_overhead.py                # ~10 s trials on the test preset, 2 cores

Overhead = (study wall time - time inside cnn3d.train, data preparation included) / study wall
time, over a study of ~10 s trials run by one worker: what Optuna's storage, MLflow logging,
system-metrics sampling and our bookkeeping add. Then the same trials with --workers 1 and 2
(torch threads split between workers) give trials/minute and their ratio. Every figure comes
from this run; SQLite study and MLflow store in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tuner.run import ConfigurationTuner
from tuner.spec import StudySpec


def run(tmp: Path, name: str, trials: int, workers: int, fixed: dict) -> tuple[float, list[optuna.trial.FrozenTrial]]:
    tuner = ConfigurationTuner(storage=f"sqlite:///{tmp}/studies.db", tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
    spec = StudySpec(name=name, params=["transform.dropout=0.0:0.2"], trials=trials, workers=workers, set=fixed,
                     report=False, pruner="none")
    start = time.perf_counter()
    tuner.run_study(spec)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/studies.db")
    return wall, study.get_trials(states=(TrialState.COMPLETE,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=700)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/cnn3d/embeddings")
    args = parser.parse_args()
    fixed = {"data.max_sentences": args.sentences, "train.main_epochs": args.epochs, "data.cache_dir": args.cache_dir}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        run(tmp, "warm-up", 1, 1, fixed)  # fills the embedding cache and imports everything once
        wall, trials = run(tmp, "overhead", args.trials, 1, fixed)
        inside = sum(t.user_attrs["train_seconds"] for t in trials)
        per_trial = inside / len(trials)
        print(f"one worker: {len(trials)} trials in {wall:.1f} s; mean trial (cnn3d.train) {per_trial:.1f} s")
        print(f"tuner overhead: {wall - inside:.2f} s = {(wall - inside) / wall:.1%} of study wall time "
              f"({(wall - inside) / len(trials):.2f} s per trial)")
        rates = {}
        for workers in (1, 2):
            wall, trials = run(tmp, f"workers-{workers}", args.trials, workers, fixed)
            rates[workers] = len(trials) / wall * 60
            print(f"workers={workers}: {len(trials)} trials in {wall:.1f} s = {rates[workers]:.2f} trials/min")
        print(f"2 workers vs 1: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
