"""The compose stack's topology, natively: PostgreSQL + ``mlflow server`` + several ``cnn3d-tune`` processes.

Two worker processes run the *same* command against one PostgreSQL study and one tracking server
(as workers on two machines would). Checks: every trial finishes exactly once, each has its nested
MLflow run on the server (read back over HTTP), the best trial agrees between Optuna and MLflow,
optuna-dashboard lists the study, and a worker SIGKILLed mid-trial still leaves a complete study.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import dataclass

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

try:  # tests/tuner is a package when it has an __init__.py, plain folder otherwise
    from .conftest import free_port, tool, unique_name, wait_http
except ImportError:
    from conftest import free_port, tool, unique_name, wait_http

TRIALS = 4
PARAMS = ("--param", "train.lr", "--param", "transform.dropout")  # two parameters: TPE, no queued sweep
WORKER_TIMEOUT = 300


@dataclass
class SharedStudy:
    name: str
    storage: str
    tracking_uri: str
    outputs: list[str]


def load(study: SharedStudy | str, storage: str | None = None) -> optuna.Study:
    """The study as Optuna sees it (read-only use)."""
    if isinstance(study, SharedStudy):
        return optuna.load_study(study_name=study.name, storage=study.storage)
    return optuna.load_study(study_name=study, storage=storage)


def mlflow_runs(tracking_uri: str, study_name: str) -> tuple[MlflowClient, list, list]:
    """(client, parent runs, trial runs) of a study's experiment, read over HTTP."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(f"cnn3d/{study_name}")
    assert experiment is not None, f"no MLflow experiment cnn3d/{study_name} on {tracking_uri}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("cnn3d.role") == "study"]
    assert parents, f"no parent run in cnn3d/{study_name}"
    children = [r for r in runs if r.data.tags.get("cnn3d.role") == "trial"]
    return client, parents, children


def wait_all(workers, timeout: float = WORKER_TIMEOUT) -> list[str]:
    """Wait for every worker; assert each exited 0; return their outputs."""
    deadline = time.time() + timeout
    for worker in workers:
        try:
            worker.proc.wait(max(1.0, deadline - time.time()))
        except Exception:  # noqa: BLE001 - TimeoutExpired: report with the log
            pytest.fail(f"{worker.name} still running after {timeout:.0f} s:\n{worker.tail()}")
        assert worker.proc.returncode == 0, f"{worker.name} exited {worker.proc.returncode}:\n{worker.tail()}"
    return [w.log.read_text(errors="replace") for w in workers]


def assert_trials_unique(study: optuna.Study) -> None:
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))), f"trial numbers are not 0..n-1 without repeats: {numbers}"
    left = [t.number for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not left, f"trials left RUNNING/WAITING: {left}"


def assert_one_run_per_trial(study: optuna.Study, parents: list, children: list) -> None:
    """Every COMPLETE trial has exactly one FINISHED child run under the parent, with its params and value."""
    by_trial: dict[int, list] = {}
    for run in children:
        by_trial.setdefault(int(run.data.tags["cnn3d.trial"]), []).append(run)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        runs = by_trial.get(trial.number, [])
        assert len(runs) == 1, f"trial {trial.number} has {len(runs)} MLflow runs"
        run = runs[0]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.info.status == "FINISHED", f"trial {trial.number}: run {run.info.status}"
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
        assert run.data.tags["cnn3d.optuna_state"] == "COMPLETE"
        assert math.isclose(run.data.metrics["val_cosine"], trial.value, rel_tol=1e-6, abs_tol=1e-9)
        for key, value in trial.params.items():
            assert math.isclose(float(run.data.params[key]), float(value), rel_tol=1e-6), key
    running = [r.info.run_name for r in children if r.info.status == "RUNNING"]
    assert not running, f"trial runs left RUNNING: {running}"


# --------------------------------------------------------------------------- two workers, one study


@pytest.fixture(scope="module")
def shared_study(tune_command, optuna_db, mlflow_server, processes, tmp_path_factory) -> SharedStudy:
    """Two ``cnn3d-tune`` processes started together with the same command (two "machines")."""
    name = unique_name("two-workers")
    cmd = tune_command(name, optuna_db, mlflow_server.url, TRIALS, *PARAMS)
    cwd = tmp_path_factory.mktemp("workers")
    workers = [processes.spawn(f"worker-{i}", cmd, cwd=cwd) for i in range(2)]
    return SharedStudy(name, optuna_db, mlflow_server.url, wait_all(workers))


def test_every_trial_finishes_exactly_once(shared_study):
    study = load(shared_study)
    assert_trials_unique(study)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    # each command asks for TRIALS more finished trials; two workers racing for the last slot may add one
    assert TRIALS <= len(complete) <= TRIALS + 1, [(t.number, t.state.name) for t in study.trials]
    assert not study.get_trials(states=(TrialState.FAIL,)), "no trial should fail"
    for output in shared_study.outputs:
        assert f"study {shared_study.name}:" in output


def test_each_trial_has_its_nested_run_on_the_server(shared_study):
    study = load(shared_study)
    _, parents, children = mlflow_runs(shared_study.tracking_uri, shared_study.name)
    assert_one_run_per_trial(study, parents, children)
    assert len(children) == len(study.trials)


def test_workers_share_one_parent_run(shared_study):
    """Two commands started together must find (not both create) the study's parent run."""
    study = load(shared_study)
    _, parents, children = mlflow_runs(shared_study.tracking_uri, shared_study.name)
    assert len(parents) == 1, f"{len(parents)} parent runs for one study: {[p.info.run_id for p in parents]}"
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_best_trial_agrees_between_optuna_and_mlflow(shared_study):
    study = load(shared_study)
    best = study.best_trial
    client, parents, _ = mlflow_runs(shared_study.tracking_uri, shared_study.name)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    top = client.search_runs([parent.info.experiment_id], filter_string="tags.`cnn3d.role` = 'trial'",
                             order_by=["metrics.val_cosine DESC"], max_results=1)[0]
    assert math.isclose(top.data.metrics["val_cosine"], best.value, rel_tol=1e-6)
    tied = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,)) if math.isclose(t.value, best.value)}
    assert int(top.data.tags["cnn3d.trial"]) in tied  # equal values may sort either way
    assert parent.data.tags["cnn3d.best_trial"] == str(best.number)
    assert math.isclose(parent.data.metrics["best_val_cosine"], best.value, rel_tol=1e-6)
    for key, value in best.params.items():
        assert math.isclose(float(parent.data.tags[f"best.{key}"]), float(value), rel_tol=1e-6), key


def test_optuna_dashboard_lists_the_study(shared_study, processes):
    """A third-party client (optuna-dashboard) reads our PostgreSQL study and lists its trials."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed")
    port = free_port()
    dashboard = processes.spawn("optuna-dashboard", [tool("optuna-dashboard"), shared_study.storage,
                                                    "--host", "127.0.0.1", "--port", str(port), "--quiet"])
    try:
        base = f"http://127.0.0.1:{port}"
        summaries = json.loads(wait_http(f"{base}/api/studies", dashboard, timeout=60))["study_summaries"]
        found = [s for s in summaries if s["study_name"] == shared_study.name]
        assert found, f"{shared_study.name} not in {[s['study_name'] for s in summaries]}"
        with urllib.request.urlopen(f"{base}/api/studies/{found[0]['study_id']}", timeout=30) as response:
            detail = json.loads(response.read())
        study = load(shared_study)
        assert len(detail["trials"]) == len(study.trials)
        assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number]
    finally:
        processes.stop(dashboard)


def test_workers_start_together_on_a_fresh_database(tune_command, postgres, mlflow_server, processes, tmp_path):
    """``docker compose up --scale worker=4`` on a new volume: workers create the schema concurrently.

    Every worker must get through opening the storage (none may die on the schema-creation race).
    """
    storage = postgres.create("fresh")
    name = unique_name("fresh-db")
    cmd = tune_command(name, storage, mlflow_server.url, 2, *PARAMS)
    workers = [processes.spawn(f"fresh-worker-{i}", cmd, cwd=tmp_path) for i in range(3)]
    wait_all(workers)
    study = load(name, storage)
    assert_trials_unique(study)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) >= 2


# --------------------------------------------------------------------------- a worker dies mid-trial


def wait_for_running(study_name: str, storage: str, count: int, workers, timeout: float = 120.0) -> list[int]:
    """Numbers of ``count`` RUNNING trials that already have their MLflow run (so training has begun)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for worker in workers:
            assert worker.alive(), f"{worker.name} exited early:\n{worker.tail()}"
        try:
            running = load(study_name, storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        with_run = [t.number for t in running if "mlflow_run_id" in t.user_attrs]
        if len(with_run) >= count:
            return with_run
        time.sleep(0.2)
    pytest.fail(f"fewer than {count} trials running after {timeout:.0f} s")


@pytest.mark.slow
def test_killing_a_worker_mid_trial_leaves_a_complete_study(tune_command, optuna_db, mlflow_server, processes,
                                                             tmp_path):
    """SIGKILL one of two workers mid-trial: its trial goes stale, fails, is retried; the study still completes.

    Both workers run the same ``--trials 4`` command, started together (so both count from 0 finished).
    The survivor runs trials until finished + running reaches 4, then waits for the dead worker's trial:
    after the heartbeat grace period it is marked FAIL, its retry queued and run by the survivor.
    """
    name = unique_name("kill")
    cmd = tune_command(name, optuna_db, mlflow_server.url, TRIALS, *PARAMS)
    victim = processes.spawn("victim-worker", cmd, cwd=tmp_path)
    time.sleep(1.5)  # "shortly after": still before any trial finishes, so both commands count from 0
    survivor = processes.spawn("survivor-worker", cmd, cwd=tmp_path)
    wait_for_running(name, optuna_db, 2, [victim, survivor])
    time.sleep(0.5)
    processes.kill(victim)
    victim.proc.wait(10)
    wait_all([survivor])

    study = load(name, optuna_db)
    assert_trials_unique(study)
    states = {t.number: t.state.name for t in study.trials}
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1, f"exactly the killed trial should fail: {states}"
    dead = failed[0]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1, f"trial {dead.number} should be retried once: {states}"
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params, "a retry runs the same configuration"
    assert dead.number in retries[0].system_attrs.get("retry_history", [])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) >= TRIALS, states

    _, parents, children = mlflow_runs(mlflow_server.url, name)
    assert_one_run_per_trial(study, parents, children)
    dead_runs = [r for r in children if r.data.tags["cnn3d.trial"] == str(dead.number)]
    assert len(dead_runs) == 1 and dead_runs[0].info.status == "FAILED", [r.info.status for r in dead_runs]
    assert dead_runs[0].data.tags.get("cnn3d.optuna_state") == "FAIL"
    retry_runs = [r for r in children if r.data.tags["cnn3d.trial"] == str(retries[0].number)]
    assert retry_runs[0].data.tags.get("cnn3d.retry_of") == str(dead.number)
