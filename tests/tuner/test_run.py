"""The tuner against real stores: SQLite and PostgreSQL studies, an MLflow SQLite store read back with MlflowClient."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cnn3d.config import flatten
from cnn3d.device import available_cores
from tuner.run import ConfigurationTuner
from tuner.spec import StudySpec

TINY = {
    "lattice.size": 4,
    "lattice.steps": 4,
    "lattice.state_size": 8,
    "data.max_sentences": 120,
    "train.main_epochs": 2,
    "train.batch_size": 16,
}
TUNE = str(Path(sys.executable).parent / "cnn3d-tune")
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="module")
def cache_dir(warm_cache):
    return warm_cache


def tiny_set(cache_dir, **extra):
    return {**TINY, "data.cache_dir": str(cache_dir), **extra}


def tune_cmd(tmp_path, cache_dir, *args, **extra_set):
    cmd = [TUNE, "--storage", f"sqlite:///{tmp_path}/studies.db", "--tracking-uri",
           f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--no-report", "--log-level", "warning"]
    for key, value in tiny_set(cache_dir, **extra_set).items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + list(args)


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_study_tracks_every_trial_in_mlflow_and_resumes(tmp_path, cache_dir):
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tuner = ConfigurationTuner(storage=f"sqlite:///{tmp_path}/s.db", tracking_uri=tracking)
    spec = StudySpec(name="dropout", params=["transform.dropout=0.0:0.2"], trials=3, set=tiny_set(cache_dir),
                     report=False)
    summary = tuner.run_study(spec)
    assert (summary.finished + summary.pruned, summary.failed) == (3, 0)

    study = optuna.load_study(study_name="dropout", storage=f"sqlite:///{tmp_path}/s.db")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["transform.dropout"] for t in trials) == [0.0, 0.1, 0.2]  # an even sweep, not TPE

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("cnn3d/dropout")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cnn3d.role` = 'trial'")
    assert len(runs) == 3
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        assert run.data.tags["cnn3d.trial"] == str(trial.number)
        assert run.data.tags["cnn3d.optuna_state"] == "COMPLETE"
        assert run.data.tags["cnn3d.git_commit"]
        # the full flattened config as params, under the same dotted keys
        assert run.data.params["transform.dropout"] == str(trial.params["transform.dropout"])
        assert set(run.data.params) == set(trial.user_attrs["config"])
        history = client.get_metric_history(run.info.run_id, "val_cosine")
        assert [m.step for m in history] == [1, 2]
        assert history[-1].value == pytest.approx(trial.value)
        for name in ("baseline_pca_cosine", "decode_top1", "throughput_samples_per_s", "cell_steps_per_s",
                     "peak_memory_mb", "cache_hit_rate", "effective_dim", "expert_usage_entropy", "rsa_teacher"):
            assert name in run.data.metrics, name
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "decoded_examples.json"} <= artifacts

    parent = client.get_run(summary.parent_run_id)
    best = study.best_trial
    assert parent.data.tags["cnn3d.best_trial"] == str(best.number)
    assert parent.data.metrics["best_val_cosine"] == pytest.approx(best.value)

    # the same study again adds trials instead of starting over
    summary = tuner.run_study(StudySpec(name="dropout", params=["transform.dropout=0.0:0.2"], trials=2,
                                        set=tiny_set(cache_dir), report=False))
    assert summary.finished + summary.pruned == 5


def test_trial_runs_get_mlflow_system_metrics(tmp_path):
    """CPU and memory are sampled into a trial's run while it trains (MLflow's system-metrics monitor)."""
    from tuner.tracking import StudyTracker

    tracker = StudyTracker(f"sqlite:///{tmp_path}/mlflow.db", "sysmetrics")
    run_id = tracker.start_trial(tracker.parent_run_id(), 0, {"lattice.size": 4}, {})
    with tracker.system_metrics_for(run_id, interval=0.5):
        time.sleep(3.0)  # a trial's training, as far as the monitor can tell
    metrics = tracker.client.get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in metrics), metrics
    assert any("memory" in k for k in metrics), metrics


def test_failing_trial_is_recorded_and_the_study_continues(tmp_path, cache_dir):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    tuner = ConfigurationTuner(storage=f"sqlite:///{tmp_path}/s.db", tracking_uri=tracking)
    spec = StudySpec(name="topk", params=["moe.top_k=1:3:int"], trials=3,
                     set=tiny_set(cache_dir, **{"moe.experts": "local,distant", "moe.gating": "topk"}), report=False)
    summary = tuner.run_study(spec)
    assert summary.finished + summary.pruned == 3
    study = optuna.load_study(study_name="topk", storage=f"sqlite:///{tmp_path}/s.db")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all("moe.top_k=3 exceeds" in t.user_attrs["fail_reason"] for t in failed)
    client = MlflowClient(tracking_uri=tracking)
    for trial in failed:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert "moe.top_k=3 exceeds" in run.data.tags["cnn3d.fail_reason"]


def test_postgresql_study(tmp_path, cache_dir):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    tuner = ConfigurationTuner(storage=POSTGRES, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    summary = tuner.run_study(StudySpec(name=name, params=["train.lr=1e-3:1e-2:log", "transform.dropout=0.0:0.2"],
                                        trials=2, set=tiny_set(cache_dir), report=False))
    try:
        assert summary.finished + summary.pruned == 2
        study = optuna.load_study(study_name=name, storage=POSTGRES)
        assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2
        assert study.user_attrs["objectives"] == ["val_cosine:max"]
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "transform.dropuot"], "did you mean transform.dropout"),
        (["--param", "transform.dropout=0.4:0.1"], "above high"),
        (["--param", "train.lr", "--objective", "val_cosin:max"], "unknown objective metric 'val_cosin'"),
        (["--param", "train.lr", "--storage", "postgresql+psycopg://nobody@127.0.0.1:9/none"],
         "cannot open study storage"),
        (["--param", "train.lr", "--storage", "not-a-url"], "not a database URL"),
        (["--spec", "missing.yaml"], "does not exist"),
        ([], "nothing to tune"),
        (["--param", "train.lr", "--trials", "0"], "trials must be at least 1"),
        (["--param", "train.lr", "--workers", "two"], "--workers 'two': give a whole number"),
        (["--param", "train.lr", "--workers", "0"], "workers must be a whole number of at least 1, or auto"),
        (["--param", "train.lr", "--set", "lattice.size=1"], "out of range"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = subprocess.run([TUNE, "--storage", f"sqlite:///{tmp_path}/s.db", "--tracking-uri",
                           f"sqlite:///{tmp_path}/m.db", *args] if "--storage" not in args else [TUNE, *args],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_four_sqlite_workers_share_one_study_without_lock_errors(tmp_path, cache_dir):
    proc = subprocess.run(tune_cmd(tmp_path, cache_dir, "--param", "transform.dropout=0.0:0.3", "--trials", "8",
                                   "--workers", "4", "--name", "four", **{"train.main_epochs": 1}),
                          capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "database is locked" not in proc.stderr
    study = optuna.load_study(study_name="four", storage=f"sqlite:///{tmp_path}/studies.db")
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) >= 8
    assert not study.get_trials(states=(TrialState.FAIL,))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


@pytest.mark.slow
def test_the_command_runs_a_worker_per_core_by_default(tmp_path, cache_dir):
    cmd = tune_cmd(tmp_path, cache_dir, "--param", "transform.dropout=0.0:0.3", "--trials", "2", "--name", "auto",
                   **{"train.main_epochs": 1})
    cmd[cmd.index("--log-level") + 1] = "info"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = min(2, available_cores())
    assert f"--workers auto: {expected} worker process" in proc.stderr, proc.stderr[-2000:]
    study = optuna.load_study(study_name="auto", storage=f"sqlite:///{tmp_path}/studies.db")
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2
    assert not study.get_trials(states=(TrialState.FAIL,))
    if expected == 2:  # both trials ran at once, one per worker process
        first, second = sorted(study.trials, key=lambda t: t.datetime_start)
        assert second.datetime_start < first.datetime_complete


def _wait_for(condition, timeout, interval=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(tmp_path, cache_dir):
    storage = f"sqlite:///{tmp_path}/studies.db"
    proc = subprocess.Popen(tune_cmd(tmp_path, cache_dir, "--param", "transform.dropout=0.0:0.3", "--trials", "4",
                                     "--workers", "2", "--name", "kill", **{"train.main_epochs": 3}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())

    def running():
        try:
            study = optuna.load_study(study_name="kill", storage=storage)
        except Exception:  # noqa: BLE001 - not created yet
            return []
        return study.get_trials(states=(TrialState.RUNNING,))

    try:
        assert _wait_for(lambda: len(running()) == 2, 180), "two workers never ran trials at once"
        time.sleep(1.0)
        workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="kill", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(complete) >= 4
    assert len(failed) == 1
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == failed[0].params
    # the dead trial says why; its retry ran before the command ended, in its own MLflow run
    assert failed[0].user_attrs.get("fail_reason", "").startswith("worker died"), failed[0].user_attrs
    assert retried[0].user_attrs["mlflow_run_id"] != failed[0].user_attrs["mlflow_run_id"]
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("cnn3d/kill")
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert "RUNNING" not in statuses.values()
    assert statuses[failed[0].user_attrs["mlflow_run_id"]] == "FAILED"


def _default_sigint() -> None:
    """In the child, before exec: SIGINT handled by default and not blocked, as under a terminal.

    A shell's background job starts its children with SIGINT ignored, and a signal mask is inherited
    across fork and exec: either would leave the command deaf to Ctrl-C for reasons outside the code under test.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _signal_masks(pid: int) -> str:
    """The child's blocked/ignored/caught signal masks (Linux), for the failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"no /proc status: {exc}"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


@pytest.mark.slow
def test_ctrl_c_marks_the_trial_and_the_same_command_resumes(tmp_path, cache_dir):
    storage = f"sqlite:///{tmp_path}/studies.db"
    # 8 tiny epochs: long enough that the interrupt lands inside a trial even when trials are fast
    # one worker: SIGINT goes to the command's process only (a terminal's Ctrl-C reaches every worker)
    cmd = tune_cmd(tmp_path, cache_dir, "--param", "transform.dropout=0.0:0.2", "--trials", "2", "--name", "intr",
                   "--workers", "1", **{"train.main_epochs": 8})
    # a shell's background job ignores SIGINT and children inherit that: give the command the default
    # disposition so Python installs its KeyboardInterrupt handler, as it does under a terminal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=_default_sigint)

    def training():
        """A RUNNING trial that has its MLflow run, i.e. whose training has begun."""
        try:
            running = optuna.load_study(study_name="intr", storage=storage).get_trials(states=(TrialState.RUNNING,))
        except Exception:  # noqa: BLE001
            return False
        return any("mlflow_run_id" in t.user_attrs for t in running)

    assert _wait_for(training, 180, interval=0.1)
    dispositions = _signal_masks(proc.pid)  # read before the signal: what the child did with SIGINT
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{dispositions}\n{err[-2000:]}"
    assert "interrupted" in err and "Traceback" not in err
    study = optuna.load_study(study_name="intr", storage=storage)
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    assert "interrupted" in stopped.user_attrs["fail_reason"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert client.get_run(stopped.user_attrs["mlflow_run_id"]).info.status == "KILLED"

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = optuna.load_study(study_name="intr", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2
    values = sorted(t.params["transform.dropout"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert values == [0.0, 0.2]  # the interrupted sweep point was run on resume


def test_flattened_config_of_a_trial_round_trips(tmp_path, cache_dir):
    """The config a trial stores is the same dotted vocabulary cnn3d reads back."""
    from cnn3d.config import unflatten

    tuner = ConfigurationTuner(storage=f"sqlite:///{tmp_path}/s.db", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    tuner.run_study(StudySpec(name="rt", params=["transform.kind=linear"], trials=1, set=tiny_set(cache_dir),
                              report=False))
    trial = optuna.load_study(study_name="rt", storage=f"sqlite:///{tmp_path}/s.db").best_trial
    config = unflatten(json.loads(json.dumps(trial.user_attrs["config"])))
    assert flatten(config)["transform.kind"] == "linear"
    assert flatten(config)["lattice.size"] == 4
