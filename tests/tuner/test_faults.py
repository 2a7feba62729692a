"""Faults of a real study: passwords never leak, a run whose every trial failed says so, the pruner never
discards a finished trial, and local workers' logs reach stderr."""

import json
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cnn3d.config import Config
from cnn3d.train import EpochReport
from tuner.objective import TrialRunner
from tuner.spec import Objective

try:  # tests/tuner is a package when it has an __init__.py, plain folder otherwise
    from .conftest import TINY_TRIAL, child_env, tool
except ImportError:
    from conftest import TINY_TRIAL, child_env, tool

PASSWORD = "s3cretPW"


def _with_password(url: str) -> str:
    """PostgreSQL here trusts every local user, so any password is accepted (and must never be shown)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{host}"


@pytest.mark.slow
def test_passwords_never_leak_and_worker_logs_reach_stderr(tmp_path, postgres, warm_cache):
    storage, tracking = _with_password(postgres.create("optuna")), _with_password(postgres.create("mlflow"))
    cmd = [tool("cnn3d-tune"), "--name", "secret", "--param", "transform.dropout", "--trials", "2", "--workers", "2",
           "--storage", storage, "--tracking-uri", tracking, *TINY_TRIAL, "--set", f"data.cache_dir={warm_cache}",
           "--log-level", "info"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr
    assert ":***@" in proc.stdout  # the summary names the stores, redacted
    # item 10: both spawned workers log their epochs to the command's stderr, with timestamps
    epoch_lines = [line for line in proc.stderr.splitlines() if "cnn3d.train: epoch 1/1" in line]
    assert len(epoch_lines) >= 2 and all(line[:2].isdigit() and line[2] == ":" for line in epoch_lines), proc.stderr

    study = optuna.load_study(study_name="secret", storage=storage)
    everything = [study.user_attrs] + [
        [t.user_attrs, t.system_attrs, t.params] for t in study.trials]
    assert PASSWORD not in json.dumps(everything, default=str)
    report = tmp_path / "studies" / "reports" / "secret.html"
    assert report.is_file() and PASSWORD not in report.read_text()

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("cnn3d/secret")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two trials
    for run in runs:
        assert PASSWORD not in json.dumps([run.data.params, run.data.tags, run.info.run_name])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(client.download_artifacts(run.info.run_id, "", tmp))
            files = [p for p in folder.rglob("*") if p.is_file()]
            assert all(PASSWORD not in p.read_text(errors="replace") for p in files)
            if run.data.tags.get("cnn3d.role") == "study":
                assert "secret.html" in {p.name for p in files}  # the uploaded report was checked too
            else:  # item 12: per-epoch metrics and examples live in MLflow, not in Optuna's user attrs
                assert "decoded_examples.json" in {p.name for p in files}
                assert client.get_metric_history(run.info.run_id, "val_cosine")
    for trial in study.trials:
        assert not {"history", "examples", "lattice_snapshot"} & set(trial.user_attrs)


@pytest.mark.slow
def test_a_run_whose_every_trial_failed_exits_1_with_one_line(tmp_path):
    # every sampled min_words exceeds the fixed max_words: each trial's config is rejected when it starts
    cmd = [tool("cnn3d-tune"), "--param", "data.min_words=10:20", "--set", "data.max_words=6", "--trials", "2",
           "--workers", "1",
           "--storage", f"sqlite:///{tmp_path}/s.db", "--tracking-uri", f"sqlite:///{tmp_path}/m/mlflow.db",
           "--no-report", "--log-level", "error"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "every trial of this run failed" in errors[0] and "max_words" in errors[0]
    assert "Traceback" not in proc.stderr


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.parametrize("total", [1, 3])
def test_the_pruner_never_prunes_a_trial_at_its_last_epoch(tmp_path, total):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", pruner=_AlwaysPrune(), direction="maximize")
    runner = TrialRunner(Config(), [], [Objective("val_cosine", "maximize")], tracker=None, parent_run_id="",
                         device=None)
    trial = study.ask()

    class NoTracking:  # the epoch callback's metric logger; this test is about Optuna's side only
        def log_metrics(self, metrics, step):
            pass

    callback = runner._epoch_callback(trial, NoTracking())
    pruned_at = None
    for epoch in range(1, total + 1):
        try:
            callback(EpochReport(epoch, total, "main", {"val_cosine": 0.1 * epoch}))
        except optuna.TrialPruned:
            pruned_at = epoch
            break
    # with more than one epoch the always-prune pruner stops at the first; at the last epoch it never may
    assert pruned_at == (1 if total > 1 else None)
    study.tell(trial, state=TrialState.PRUNED if pruned_at else TrialState.COMPLETE,
               values=None if pruned_at else 0.1 * total)
    assert study.trials[0].intermediate_values  # the last epoch's value was still reported
