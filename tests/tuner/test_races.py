"""Exactly-once trials: processes pulling queued trials from one real SQLite or PostgreSQL study.

Each round enqueues 60 trials; two processes (the project's own storage set-up, ``tuner.run.make_storage``)
start together and pull with ``study.optimize`` until the queue is empty. A trial run by both shows up
as the same trial number in both processes' logs. The objective is trivial (no training): the race is
in claiming a WAITING trial, not in the work.
"""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

try:  # tests/tuner is a package when it has an __init__.py, plain folder otherwise
    from .conftest import child_env
except ImportError:
    from conftest import child_env
from tuner.run import make_storage

ROUNDS, PROCESSES, QUEUED = 5, 2, 60

PULLER = textwrap.dedent("""
    import json, os, sys, time
    import optuna
    from tuner.run import make_storage

    url, rounds, go, out, QUEUED = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = make_storage(url)
    seen = []

    def objective(trial):
        queued = bool(trial.user_attrs.get("queued"))
        seen.append([trial.study.study_name, trial.number, queued])
        if not queued:  # the queue is empty: Optuna created a fresh trial instead
            trial.study.stop()
        return float(trial.suggest_int("x", 0, 10_000))

    open(out + ".ready", "w").close()
    while not os.path.exists(go):  # both processes start pulling at the same moment
        time.sleep(0.002)
    for r in range(rounds):
        study = optuna.load_study(study_name=f"race-{r}", storage=storage)
        study.optimize(objective, n_trials=2 * QUEUED)
    with open(out, "w") as f:
        json.dump(seen, f)
""")


def _race(url: str, tmp_path) -> tuple[dict[tuple[str, int], int], list[dict[str, int]]]:
    """Run the race; returns how often each queued trial ran and each round's trial counts by state."""
    outs = [tmp_path / f"seen-{p}.json" for p in range(PROCESSES)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", PULLER, url, str(ROUNDS), str(go), str(out), str(QUEUED)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in outs]
    storage = make_storage(url)
    for r in range(ROUNDS):
        study = optuna.create_study(study_name=f"race-{r}", storage=storage)
        for i in range(QUEUED):
            study.enqueue_trial({"x": i}, user_attrs={"queued": True})
    deadline = time.time() + 120
    while not all(Path(f"{out}.ready").exists() for out in outs) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a puller died before the start"
        time.sleep(0.05)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    runs: dict[tuple[str, int], int] = {}
    for out in outs:
        seen = json.loads(out.read_text())
        assert sum(queued for _, _, queued in seen) >= ROUNDS, "a puller got (almost) no trials: no race was run"
        for study_name, number, queued in seen:
            if queued:
                runs[(study_name, number)] = runs.get((study_name, number), 0) + 1
    rounds = []
    for r in range(ROUNDS):
        trials = optuna.load_study(study_name=f"race-{r}", storage=storage).get_trials(deepcopy=False)
        rounds.append({state.name: sum(t.state == state for t in trials) for state in TrialState})
    return runs, rounds


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_processes_never_run_a_queued_trial_twice(backend, tmp_path, request):
    url = (f"sqlite:///{tmp_path}/race.db" if backend == "sqlite"
           else request.getfixturevalue("postgres").create("race"))
    runs, rounds = _race(url, tmp_path)
    duplicates = {k: n for k, n in runs.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} queued trials ran more than once: {sorted(duplicates)[:10]}"
    assert len(runs) == ROUNDS * QUEUED  # every queued trial ran
    assert len(rounds) == ROUNDS
    for counts in rounds:
        assert counts["RUNNING"] == counts["WAITING"] == counts["FAIL"] == 0, counts
        assert counts["COMPLETE"] >= QUEUED, counts
