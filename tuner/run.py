"""ConfigurationTuner: Optuna studies over the cnn3d config, run by one or several worker processes.

Storage: SQLite under ``studies/`` by default (WAL journal, long busy timeout, so
several local workers share it), or any RDB URL such as ``postgresql://...``;
heartbeats mark trials of dead workers failed and a callback retries them.

Budget semantics: ``trials=N`` asks for N more *finished* (complete or pruned)
trials in this invocation; failed trials are replaced (up to a cap), retried
copies of dead workers' trials are run first, and a resumed sweep finishes the
grid points an interrupted run left queued.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import multiprocessing as mp
import os
import sqlite3
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
import torch
from optuna import distributions as D
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from cnn3d.config import with_overrides
from cnn3d.device import available_cores, resolve_device, threads_per_worker
from cnn3d.errors import UserError

from .space import ParamSpace
from .spec import Objective, StudySpec
from .stores import check_separate_stores, check_sqlite_writable, check_tracking_uri, redact
from .tracking import StudyTracker, resolve_tracking_uri, status_for_state, with_retries

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///studies/cnn3d.db"
HEARTBEAT_INTERVAL = 5
GRACE_PERIOD = 20
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# --------------------------------------------------------------------------- storage


def resolve_storage_url(url: str | None) -> str:
    """``--storage`` > ``CNN3D_STORAGE`` > ``sqlite:///studies/cnn3d.db``."""
    return url or os.environ.get("CNN3D_STORAGE") or DEFAULT_STORAGE


def _prepare_sqlite(url: str) -> None:
    """Create the folder and switch the database to WAL (persistent), so readers never block the writer."""
    check_sqlite_writable(url, "the study storage", "--storage")
    with contextlib.closing(sqlite3.connect(Path(url[len("sqlite:///"):]), timeout=60)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def check_stores(storage_url: str, tracking_uri: str) -> None:
    """Setup mistakes as one line before any work starts: a tracking URI MLflow cannot use or reach,
    read-only SQLite paths, one database named for both stores."""
    check_separate_stores(storage_url, tracking_uri)
    check_tracking_uri(tracking_uri)
    if storage_url.startswith("sqlite:///"):
        _prepare_sqlite(storage_url)


def make_storage(url: str, tracker_args: tuple[str, str] | None = None) -> RDBStorage:
    """An RDB storage with heartbeats; unreachable or malformed URLs are one-line ``UserError``s."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        _prepare_sqlite(url)
        engine_kwargs["connect_args"] = {"timeout": 120}
    elif "://" not in url:
        raise UserError(f"storage {url!r} is not a database URL; use sqlite:///PATH.db or postgresql://USER@HOST/DB")
    callback = StaleTrialRetry(*tracker_args) if tracker_args else _quiet_experimental(RetryHeartbeatStaleTrialCallback)(max_retry=3)
    # workers starting together on a fresh database race to create Optuna's tables: retry
    storage = with_retries(
        lambda: _quiet_experimental(RDBStorage)(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
            heartbeat_stale_trial_callback=callback,
        ),
        what=f"study storage {redact(url)}", attempts=1 if _refused(url) else 6,
    )
    if url.startswith("sqlite:///"):
        _serialise_sqlite_transactions(storage.engine)
    return storage


def _quiet_experimental(fn):
    """``fn`` without Optuna's ExperimentalWarning: heartbeats and ``fail_stale_trials`` are marked
    experimental and we rely on them deliberately (scoped to our calls, not a process-wide filter)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return fn(*args, **kwargs)

    return call


def _serialise_sqlite_transactions(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (``BEGIN IMMEDIATE``).

    Optuna claims a queued trial by reading it (``SELECT ... FOR UPDATE``) and then setting it RUNNING.
    SQLite ignores ``FOR UPDATE``, and Python's sqlite3 driver opens a transaction only at the first
    write, so the read ran outside any transaction: two processes both read WAITING and both ran the
    trial. With the lock taken at ``BEGIN``, the second claimant waits and then reads RUNNING.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's, opens transactions
        # WAL with NORMAL sync: one fsync per checkpoint instead of per commit; a crash loses nothing
        # committed by a live process, a power cut at most the last commits (never corrupts the file)
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while creating the tables lack the listener: drop them


def _refused(url: str) -> bool:
    """Whether a network database URL's port refuses connections (no point retrying then)."""
    import socket
    from urllib.parse import urlsplit

    if url.startswith("sqlite"):
        return False
    try:
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=3):
            return False
    except OSError:
        return True


class StaleTrialRetry:
    """Heartbeat-stale trials (their worker died): end their MLflow run as FAILED, then queue a retry."""

    def __init__(self, tracking_uri: str, study_name: str):
        self.tracking_uri, self.study_name = tracking_uri, study_name
        self.retry = _quiet_experimental(RetryHeartbeatStaleTrialCallback)(max_retry=3)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                tracker = StudyTracker(self.tracking_uri, self.study_name, system_metrics=False)
                tracker.set_tags(run_id, {"cnn3d.optuna_state": "FAIL", "cnn3d.fail_reason": "worker died (stale heartbeat)"})
                tracker.end_run(run_id, "FAILED")
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not mark MLflow run %s of dead trial %d: %s", run_id, trial.number, exc)
        logger.warning("trial %d lost its worker; queued a retry", trial.number)
        # the retry is a new run: it must not carry the dead trial's MLflow run, reason or results
        clean = copy.deepcopy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in DEAD_TRIAL_ATTRS}
        self.retry(study, clean)


DEAD_TRIAL_ATTRS = ("mlflow_run_id", "fail_reason", "metrics", "train_seconds", "pruned_at_epoch")
DEAD_WORKER_REASON = "worker died (no heartbeat for {} s)"


def fail_dead_workers_trials(study: optuna.Study, storage: RDBStorage) -> None:
    """Fail trials whose worker died, each with a ``fail_reason`` user attr, then queue their retries.

    Optuna's ``fail_stale_trials`` marks them FAIL without a reason, and a FAIL trial's attrs can no
    longer be set: the reason is written first, while the trial is still RUNNING. Finding stale trials
    needs the storage's ``_get_stale_trial_ids`` (the same query ``fail_stale_trials`` runs).
    """
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        with contextlib.suppress(Exception):  # another worker may fail it first
            storage.set_trial_user_attr(trial_id, "fail_reason", DEAD_WORKER_REASON.format(GRACE_PERIOD))
    _quiet_experimental(fail_stale_trials)(study)


# --------------------------------------------------------------------------- samplers, pruners


def make_sampler(spec: StudySpec, spaces: list[ParamSpace], seed: int) -> optuna.samplers.BaseSampler:
    name = spec.sampler
    if name == "auto":
        name = "random" if len(spaces) <= 1 else "tpe"  # one parameter: a queued sweep (random only as fallback)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise UserError("--sampler cmaes needs the 'cmaes' package: pip install cmaes") from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "grid":
        points = max(2, round(spec.trials ** (1 / max(1, len(spaces)))))
        return optuna.samplers.GridSampler({s.key: s.grid(points) for s in spaces}, seed=seed)
    raise UserError(f"unknown sampler {name!r}")


def make_pruner(spec: StudySpec, objectives: list[Objective], epochs: int) -> optuna.pruners.BasePruner:
    name = spec.pruner
    if len(objectives) > 1 or name == "none" or (name == "auto" and epochs < 2):
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2))
    # epochs are reported 1-based; never prune on the first, noisiest epoch
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


# --------------------------------------------------------------------------- sweeps


def sweep_points(space: ParamSpace, trials: int, seeds: int) -> list[tuple[Any, int]]:
    """(value, repeat) pairs: evenly spread values, repeated with new seeds as the budget allows, round-major."""
    # by default about three seeds per value once the budget passes five trials
    default_points = trials if trials <= 5 else max(5, trials // 3)
    points = max(1, trials // seeds) if seeds > 0 else default_points
    values = space.grid(points)
    rounds = math.ceil(trials / len(values))
    plan = [(value, r) for r in range(rounds) for value in values]
    return plan[:trials]


def enqueue_sweep(study: optuna.Study, space: ParamSpace, trials: int, seeds: int, base_seed: int) -> int:
    """Queue a sweep's trials; returns how many were queued.

    Points an interrupted run left waiting count towards ``trials``, and points whose trial
    was interrupted (Ctrl-C) are queued again first, so a resumed sweep completes its grid.
    """
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    requeued = set(study.user_attrs.get("requeued_trials", []))
    interrupted = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("fail_reason", "").startswith("interrupted") and t.number not in requeued
        and space.key in t.params
    ][: max(0, trials - waiting)]
    for t in interrupted:
        study.enqueue_trial(t.params, user_attrs={"train.seed": t.user_attrs.get("train.seed", base_seed)})
    if interrupted:
        study.set_user_attr("requeued_trials", sorted(requeued | {t.number for t in interrupted}))
    wanted = trials - waiting - len(interrupted)
    if wanted <= 0:
        return len(interrupted)
    seeds_used = [t.user_attrs.get("train.seed") for t in study.get_trials(deepcopy=False)]
    next_seed = max((s for s in seeds_used if s is not None), default=base_seed - 1) + 1  # resumed: fresh seeds
    for value, repeat in sweep_points(space, wanted, seeds):
        study.enqueue_trial({space.key: value}, user_attrs={"train.seed": next_seed + repeat})
    return wanted + len(interrupted)


# --------------------------------------------------------------------------- results


@dataclass
class StudySummary:
    study_name: str
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    finished: int
    pruned: int
    failed: int
    best: list[dict[str, Any]] = field(default_factory=list)  # best trial(s): number, values, params
    report_path: str | None = None
    seconds: float = 0.0
    finished_now: int = 0  # complete or pruned in this invocation
    failed_now: int = 0
    fail_reason: str | None = None  # the most common fail reason of this invocation's failed trials


# --------------------------------------------------------------------------- the tuner


class ConfigurationTuner:
    """Tune cnn3d configurations with Optuna, tracking every trial in MLflow.

    >>> tuner = ConfigurationTuner()                       # SQLite under studies/, MLflow under mlruns/
    >>> tuner.tune_parameter("transform.dropout", trials=6)  # a sensitivity sweep
    >>> tuner.run_study(StudySpec(params=["train.lr", "transform.kind"], trials=20))
    """

    def __init__(self, storage: str | None = None, tracking_uri: str | None = None, device: str | None = None):
        self.storage_url = resolve_storage_url(storage)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.device_name = device

    def tune_parameter(self, param_name: str, values: list[Any] | None = None, **spec_fields: Any) -> StudySummary:
        """Sweep one parameter: over ``values`` if given, else evenly across the field's range."""
        param = param_name if values is None else f"{param_name}={','.join(map(str, values))}"
        return self.run_study(StudySpec(params=[param], **spec_fields))

    def run_study(self, spec: StudySpec) -> StudySummary:
        """Run (or resume) the study described by ``spec``; returns a summary once its budget is spent."""
        spec.validate()
        check_stores(self.storage_url, self.tracking_uri)
        started = time.perf_counter()
        study, tracker, parent_id = self._open(spec)
        before = {t.number for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL))}
        target = _count(study, FINISHED) + spec.trials
        spaces = spec.spaces()
        if len(spaces) == 1 and spec.sampler == "auto":
            queued = enqueue_sweep(study, spaces[0], spec.trials, spec.seeds, spec.base_config().train.seed)
            logger.info("queued %d sweep trials of %s", queued, spaces[0].key)
        deadline = time.time() + spec.timeout if spec.timeout else None
        workers = spec.workers if spec.workers != "auto" else self._auto_workers(spec)
        args = (spec, self.storage_url, self.tracking_uri, target, deadline, self.device_name, workers)
        tracker.set_status(parent_id, "RUNNING")
        try:
            if workers == 1:
                _worker(*args)
            else:
                _run_workers(args, workers)
        except KeyboardInterrupt:
            reconcile_runs(study, tracker)
            tracker.set_status(parent_id, "KILLED")
            raise
        summary = self._summarise(spec, study, tracker, parent_id, started, before)
        tracker.set_status(parent_id, "FINISHED")
        return summary

    def _auto_workers(self, spec: StudySpec) -> int:
        base = spec.base_config()
        device = resolve_device(self.device_name or base.train.device)
        workers, why = auto_workers(base, spec.spaces(), spec.trials, device)
        logger.info("--workers auto: %d worker process%s (%s)", workers, "" if workers == 1 else "es", why)
        return workers

    def _open(self, spec: StudySpec) -> tuple[optuna.Study, StudyTracker, str]:
        name = spec.study_name()
        storage = make_storage(self.storage_url, (self.tracking_uri, name))
        tracker = StudyTracker(self.tracking_uri, name)
        objectives = spec.parsed_objectives()
        study = optuna.create_study(
            storage=storage, study_name=name, load_if_exists=True,
            directions=[o.direction for o in objectives],
            sampler=make_sampler(spec, spec.spaces(), spec.base_config().train.seed),
        )
        _check_same_objectives(study, objectives)
        parent_id = tracker.parent_run_id()
        study.set_user_attr("objectives", [str(o) for o in objectives])
        study.set_user_attr("params", spec.params)
        study.set_user_attr("preset", spec.preset)
        study.set_user_attr("set", {k: str(v) for k, v in spec.set.items()})
        study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
        study.set_user_attr("mlflow_parent_run_id", parent_id)
        study.set_user_attr("tracking_uri", redact(self.tracking_uri))  # shown by dashboards: never a password
        return study, tracker, parent_id

    def _summarise(self, spec, study, tracker, parent_id, started, before: set[int]) -> StudySummary:
        reconcile_runs(study, tracker)
        objectives = spec.parsed_objectives()
        best = best_trials(study, objectives)
        if best:
            top = study.trials[best[0]["number"]]
            tracker.log_best(parent_id, top.params, top.user_attrs.get("metrics", {}), top.number)
        new = [t for t in study.get_trials(deepcopy=False) if t.number not in before]
        failed_now = [t for t in new if t.state == TrialState.FAIL]
        reasons = [t.user_attrs.get("fail_reason", "no reason recorded") for t in failed_now]
        summary = StudySummary(
            study_name=study.study_name, storage=redact(self.storage_url), tracking_uri=redact(self.tracking_uri),
            experiment_id=tracker.experiment_id, parent_run_id=parent_id,
            finished=_count(study, (TrialState.COMPLETE,)), pruned=_count(study, (TrialState.PRUNED,)),
            failed=_count(study, (TrialState.FAIL,)), best=best, seconds=time.perf_counter() - started,
            finished_now=sum(t.state in FINISHED for t in new), failed_now=len(failed_now),
            fail_reason=max(set(reasons), key=reasons.count) if reasons else None,
        )
        if spec.report:
            try:
                summary.report_path = write_study_report(study, tracker, parent_id)
            except Exception as exc:  # noqa: BLE001 - the study is done; a report failure must not hide it
                logger.warning("could not write the study report: %s", exc)
        return summary


def _check_same_objectives(study: optuna.Study, objectives: list[Objective]) -> None:
    saved = study.user_attrs.get("objectives")
    if saved and saved != [str(o) for o in objectives]:
        raise UserError(
            f"study {study.study_name!r} was created with objectives {', '.join(saved)}; "
            f"use those or pick another --name"
        )


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def best_trials(study: optuna.Study, objectives: list[Objective]) -> list[dict[str, Any]]:
    if not _count(study, (TrialState.COMPLETE,)):
        return []
    trials = study.best_trials if len(objectives) > 1 else [study.best_trial]
    return [{"number": t.number, "values": t.values, "params": t.params} for t in trials]


def reconcile_runs(study: optuna.Study, tracker: StudyTracker) -> int:
    """End any MLflow run still RUNNING whose trial has finished or failed; returns how many were fixed."""
    fixed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        try:
            if tracker.run_status(run_id) == "RUNNING":
                tracker.set_tags(run_id, {"cnn3d.optuna_state": trial.state.name})
                tracker.end_run(run_id, status_for_state(trial.state.name))
                fixed += 1
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not reconcile MLflow run %s: %s", run_id, exc)
    return fixed


def write_study_report(study, tracker, parent_id) -> str | None:
    """Write the HTML report into studies/reports/ and attach it to the parent run (when the report module exists)."""
    try:
        from .report import write_report
    except ImportError:
        return None
    path = write_report(study, tracker=tracker)
    tracker.client.log_artifact(parent_id, str(path))
    return str(path)


# --------------------------------------------------------------------------- workers

WORKER_BASE_BYTES = 1.5 * 2**30  # a worker before its cube: torch, the teacher, MLflow, Optuna (~0.8 GB resident measured)
# float32 [batch, cells, channels] tensors a training step keeps per lattice step, at most: about 10 at 8^3 (the
# run-own peak_memory_mb), 23 for the full preset without checkpointing (BENCHMARKS.md, full_memory.py)
STATES_PER_STEP = 24
CUBE_KEYS = ("lattice.size", "lattice.depth", "lattice.height", "lattice.width", "lattice.steps",
             "lattice.state_size", "train.batch_size")


def worker_memory_bytes(config, spaces: list[ParamSpace] = ()) -> float:
    """A generous estimate of one worker's memory: its process, plus the activations of the largest cube
    the study's ``spaces`` can sample (each tuned size key at its upper end)."""
    largest = {}
    for space in spaces:
        if space.key in CUBE_KEYS:
            dist = space.distribution
            values = dist.choices if isinstance(dist, D.CategoricalDistribution) else (dist.high,)
            largest[space.key] = max(int(v) for v in values)
    cube = with_overrides(config, largest) if largest else config
    lattice = cube.lattice
    cells = math.prod(lattice.dims)
    state = 4 * cube.train.batch_size * cells * lattice.state_size
    return WORKER_BASE_BYTES + STATES_PER_STEP * state * max(1, lattice.steps)


def auto_workers(config, spaces: list[ParamSpace], trials: int, device: torch.device, cores: int | None = None,
                 free_bytes: float | None = None) -> tuple[int, str]:
    """``--workers auto``: how many worker processes this machine runs well, and why, in words.

    One per core (each then runs single-threaded torch) on CPU, since trials are independent: on 2 cores two
    single-threaded workers ran the dropout study 1.16-1.36x faster than one with two threads (BENCHMARKS.md;
    a lone process's threads meet at every small parallel op, and its single-threaded parts leave a core
    idle). Never more than the trials to run, the cores over ``train.num_threads`` when that is set, or what
    the free memory holds at ``worker_memory_bytes`` each; one on an accelerator, which the workers would share.
    ``cores`` and ``free_bytes`` default to this machine's (usable cores, available memory).
    """
    if device.type != "cpu":
        return 1, f"one {device.type} device"
    cores = available_cores() if cores is None else cores
    by_cores = max(1, cores // max(1, config.train.num_threads))
    need = worker_memory_bytes(config, spaces)
    free = psutil.virtual_memory().available if free_bytes is None else free_bytes
    by_memory = max(1, int(free // need))
    workers = max(1, min(by_cores, trials, by_memory))
    threads = threads_per_worker(workers, config.train.num_threads, cores)
    return workers, (f"{cores} core{'s' * (cores != 1)}, {threads} torch thread{'s' * (threads != 1)} each; "
                     f"{free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB per worker; "
                     f"{trials} trial{'s' * (trials != 1)} to run")


def _run_workers(args: tuple, workers: int) -> None:
    ctx = mp.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()  # the command's --log-level
    procs = [ctx.Process(target=_worker_process, args=(*args, i), kwargs={"log_level": level},
                         name=f"cnn3d-tune-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=60)
        raise
    bad = [p for p in procs if p.exitcode not in (0, None)]
    if bad:
        logger.warning("%d worker(s) exited abnormally: %s", len(bad), ", ".join(f"{p.name}={p.exitcode}" for p in bad))


def _worker_process(*args: Any, log_level: str = "info") -> None:
    """Entry point of a spawned worker: logs like the command (epoch lines, timestamped warnings on
    stderr); Ctrl-C ends it quietly (the trial is already marked)."""
    from cnn3d.cli import setup_logging

    setup_logging(log_level if log_level in ("debug", "info", "warning", "error") else "info")
    logging.captureWarnings(True)  # Python warnings as log lines, with a time, like everything else
    try:
        _worker(*args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _worker(spec: StudySpec, storage_url: str, tracking_uri: str, target: int, deadline: float | None,
            device_name: str | None, workers: int, index: int = 0) -> None:
    """Run trials until the study holds ``target`` finished trials (shared by every worker of the study)."""
    from .objective import TrialRunner

    # Optuna logs every failed trial with a traceback; the objective logs one line with the reason instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name = spec.study_name()
    tracker = StudyTracker(tracking_uri, name)
    storage = make_storage(storage_url, (tracking_uri, name))
    objectives = spec.parsed_objectives()
    base = spec.base_config()
    torch.set_num_threads(threads_per_worker(workers, base.train.num_threads))  # a share of the cores, set once
    device = resolve_device(device_name or base.train.device)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(spec, spec.spaces(), base.train.seed + 1000 * index),
                              pruner=make_pruner(spec, objectives, base.total_epochs))
    runner = TrialRunner(base, spec.spaces(), objectives, tracker, tracker.parent_run_id(), device)
    max_failures = max(5, spec.trials)
    failures_before = _count(study, (TrialState.FAIL,))
    while True:
        fail_dead_workers_trials(study, storage)
        finished = _count(study, FINISHED)
        running = _count(study, (TrialState.RUNNING,))
        waiting_trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        waiting = len(waiting_trials)
        retries = sum("failed_trial" in t.system_attrs for t in waiting_trials)  # dead workers' trials
        failures = _count(study, (TrialState.FAIL,)) - failures_before
        if (finished >= target and not retries) or failures >= max_failures or (deadline and time.time() > deadline):
            break
        if waiting or finished + running < target:
            study.optimize(runner, n_trials=1, catch=(Exception,))
        else:  # the last trials run elsewhere: wait for them (or for their heartbeat to go stale)
            time.sleep(1.0)
    if failures >= max_failures:
        logger.error("stopping: %d trials failed in this run (see their fail_reason)", failures)
    if retries:
        logger.warning("%d retried trial(s) of dead workers are still queued; run the same command to run them",
                       retries)
