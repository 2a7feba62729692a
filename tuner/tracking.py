"""MLflow tracking for studies: one experiment per study, a parent run per study, a child run per trial.

Everything goes through an explicit ``MlflowClient`` and explicit run ids: MLflow's
active-run stack is per thread, so ``nested=True`` breaks with parallel workers.
The default store is SQLite under ``mlruns/`` with artifacts beside it (MLflow 3
refuses the old ``file:`` store).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from cnn3d.errors import UserError

from .stores import redact, store_lock

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_DIR = Path("mlruns")
PARENT_ROLE = "study"
TRIAL_ROLE = "trial"
MAX_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
EXAMPLES_ARTIFACT = "decoded_examples.json"
SNAPSHOT_ARTIFACT = "lattice_snapshot.json"


def download_artifact(client: MlflowClient, run_id: str, path: str, dst: str) -> str:
    """``client.download_artifacts`` without MLflow's per-file progress bars (the report downloads several small
    files; the bars buried its own log lines). A user's own ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` wins."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        return client.download_artifacts(run_id, path, dst)
    os.environ[key] = "false"
    try:
        return client.download_artifacts(run_id, path, dst)
    finally:
        os.environ.pop(key, None)


def default_tracking_uri(root: Path = DEFAULT_TRACKING_DIR) -> str:
    """``sqlite:///<abs>/mlruns/mlflow.db`` (created on first use)."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the embedded SQLite store under ``mlruns/``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_tracking_uri()
    if uri.startswith("file:") or (("://" not in uri) and not uri.startswith("databricks")):
        raise UserError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///PATH/mlflow.db or http://HOST:PORT"
        )
    return uri


def git_commit() -> str:
    """The code's git commit (``unknown`` outside a checkout); ``-dirty`` when files are modified."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def with_retries(fn, what: str, attempts: int = 6, first_delay: float = 0.5):
    """Call ``fn``, retrying with backoff: processes starting together race to create tables and rows."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors of every kind; the last one is reported
            if attempt == attempts - 1:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"cannot open {what}: {first[:200]}") from None
            logger.debug("retrying %s after %s", what, exc)
            time.sleep(delay)
            delay *= 2


def open_tracking_client(uri: str) -> MlflowClient:
    """A client whose store exists: the first process to open a fresh store creates its tables while
    holding ``store_lock``, so processes starting together never race on MLflow's migrations."""

    def ready() -> MlflowClient:
        client = MlflowClient(tracking_uri=uri)  # a database store creates its tables here
        client.search_experiments(max_results=1)
        return client

    with store_lock(uri):
        return with_retries(ready, what=f"the MLflow tracking store {redact(uri)}")


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class StudyTracker:
    """The MLflow side of one study; safe to create in every worker process."""

    def __init__(self, tracking_uri: str, study_name: str, system_metrics: bool = True):
        self.tracking_uri = tracking_uri
        self.client = open_tracking_client(tracking_uri)
        self.study_name = study_name
        self.system_metrics = system_metrics
        self.experiment_id = with_retries(self._experiment, what=f"the MLflow tracking store {redact(tracking_uri)}")

    # -- experiment and parent run

    def _experiment(self) -> str:
        name = f"cnn3d/{self.study_name}"
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):
                artifacts = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=artifacts, tags={"cnn3d.study": self.study_name})
        except Exception:  # a concurrent worker may have created it first
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            raise

    def _parent_runs(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`cnn3d.role` = '{PARENT_ROLE}'", max_results=50,
            order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
        )

    def parent_run_id(self, create: bool = True) -> str | None:
        """The study's parent run (found by tag, so every worker and every resume shares one).

        Two commands starting at once may both create one; each then keeps the earliest
        and deletes its own duplicate, so all of them agree on a single parent.
        """
        runs = self._parent_runs()
        if runs or not create:
            return runs[0].info.run_id if runs else None
        mine = self.client.create_run(
            self.experiment_id, run_name=self.study_name,
            tags={"cnn3d.role": PARENT_ROLE, "cnn3d.study": self.study_name, "cnn3d.git_commit": git_commit()},
        ).info.run_id
        first = self._parent_runs()[0].info.run_id
        if first != mine:
            self.client.delete_run(mine)
        return first

    # -- trial runs

    def start_trial(self, parent_id: str, trial_number: int, config: dict[str, Any], tags: dict[str, str]) -> str:
        """A child run with the flattened config as params (the same dotted keys); returns its id."""
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial_number}",
            tags={"mlflow.parentRunId": parent_id, "cnn3d.role": TRIAL_ROLE, "cnn3d.study": self.study_name,
                  "cnn3d.trial": str(trial_number), "cnn3d.git_commit": git_commit(), **tags},
        )
        run_id = run.info.run_id
        params = [Param(k, _param_value(v)) for k, v in config.items()]
        for i in range(0, len(params), MAX_BATCH):
            self.client.log_batch(run_id, params=params[i : i + MAX_BATCH])
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    @contextmanager
    def system_metrics_for(self, run_id: str, interval: float = 1.0):
        """CPU, memory (and GPU when present) sampled into the run while the block runs."""
        if not self.system_metrics:
            yield
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=self.tracking_uri)
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - system metrics are nice to have, never fatal
            logger.warning("system metrics unavailable: %s", exc)
            yield
            return
        try:
            yield
        finally:
            monitor.finish()

    # -- study summary

    def log_best(self, parent_id: str, params: dict[str, Any], metrics: dict[str, float], trial_number: int) -> None:
        """The best trial so far on the study's parent run: its params as ``best.<key>`` tags (tags, unlike
        params, can change when a later run finds a better trial) and its final metrics as ``best_<name>``."""
        tags = [RunTag(f"best.{k}", _param_value(v)) for k, v in params.items()]
        tags.append(RunTag("cnn3d.best_trial", str(trial_number)))
        ts = _now_ms()
        metrics_list = [Metric(f"best_{k}", float(v), ts, trial_number) for k, v in metrics.items()
                        if isinstance(v, (int, float))]
        self.client.log_batch(parent_id, metrics=metrics_list, tags=tags)

    def set_status(self, run_id: str, status: str) -> None:
        """RUNNING while a command works on the study, FINISHED or KILLED when it stops."""
        self.client.update_run(run_id, status=status)

    def ui_url(self, base: str, run_id: str | None = None) -> str:
        """Link into the MLflow UI served at ``base`` (e.g. http://127.0.0.1:5000)."""
        if run_id:
            return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs"


class MlflowRunLogger:
    """``cnn3d.tracking.MetricLogger`` over one MLflow run: the one store of per-epoch metrics and examples."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        batch = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(batch), MAX_BATCH):
            self.client.log_batch(self.run_id, params=batch[i : i + MAX_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = _now_ms()
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


TRAIN_EXPERIMENT = "cnn3d-train"


def mlflow_logger(uri: str, run_name: str, tags: dict[str, str]) -> MlflowRunLogger:
    """Entry point of the ``cnn3d.loggers`` group: a new run for ``cnn3d-train`` in experiment ``cnn3d-train``."""
    from .stores import check_tracking_uri

    check_tracking_uri(uri)
    client = open_tracking_client(uri)

    def experiment() -> str:
        found = client.get_experiment_by_name(TRAIN_EXPERIMENT)
        return found.experiment_id if found else client.create_experiment(TRAIN_EXPERIMENT)

    with store_lock(uri):
        experiment_id = with_retries(experiment, what=f"the MLflow experiment {TRAIN_EXPERIMENT}")
    run = client.create_run(experiment_id, run_name=run_name or None,
                            tags={"cnn3d.git_commit": git_commit(), **tags})
    return MlflowRunLogger(client, run.info.run_id)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def status_for_state(state: str) -> str:
    """MLflow run status matching an Optuna trial state name."""
    return {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")


__all__ = ["RunStatus", "StudyTracker", "default_tracking_uri", "resolve_tracking_uri", "status_for_state"]
