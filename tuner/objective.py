"""One Optuna trial = one ``cnn3d.train`` run, tracked as a child MLflow run.

The trainer's epoch callback feeds both Optuna (``trial.report`` / pruning, single
objective only) and MLflow through the ``cnn3d.tracking.MetricLogger`` interface (every metric
with ``step=epoch``); MLflow is the one store of per-epoch metrics and decoded examples. The MLflow run ends
in the state matching the Optuna trial: FINISHED for complete and pruned trials,
FAILED for errors, KILLED for Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import optuna
import torch

from cnn3d.config import ConfigError, flatten, with_overrides
from cnn3d.tracking import MetricLogger
from cnn3d.train import EpochReport, TrainingData, prepare_data, train
from cnn3d.transfer import stage_config

from .report_analysis import log_trial_checkpoint
from .space import ParamSpace, suggest
from .spec import Objective
from .tracking import EXAMPLES_ARTIFACT, SNAPSHOT_ARTIFACT, MlflowRunLogger, StudyTracker

logger = logging.getLogger(__name__)

SNAPSHOT_MAX_SIDE = 16  # the report's 3D lattice view is downsampled to at most 16 cells a side
DATA_KEYS = ("teacher.", "data.")  # config sections that decide the training data
DATA_MEMO = 4  # prepared datasets a worker keeps (the teacher itself is memoised by cnn3d.teacher)


class TrialRunner:
    """Callable objective for ``study.optimize``; one per worker process (it memoises prepared data)."""

    def __init__(self, base_config, spaces: list[ParamSpace], objectives: list[Objective], tracker: StudyTracker,
                 parent_run_id: str, device: torch.device):
        self.base_config = base_config
        self.spaces = spaces
        self.objectives = objectives
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.device = device
        self._data: dict[tuple, TrainingData] = {}
        self.overhead_seconds = 0.0  # time spent in Optuna/MLflow calls, for the overhead benchmark

    # -- config

    def sampled_values(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's dotted overrides: sampled parameters plus a sweep's seed."""
        values = {space.key: suggest(trial, space) for space in self.spaces}
        seed = trial.user_attrs.get("train.seed")
        if seed is not None:
            values["train.seed"] = seed
        return values

    def trial_config(self, values: dict[str, Any]):
        try:
            return with_overrides(self.base_config, values)
        except ConfigError as exc:  # a sampled combination the config rejects
            raise ValueError(f"invalid sampled configuration: {exc}") from None

    def data_for(self, config) -> TrainingData:
        flat = flatten(config)
        key = tuple((k, flat[k]) for k in sorted(flat) if k.startswith(DATA_KEYS)) + (
            ("train.seed", flat["train.seed"]), ("train.batch_size", flat["train.batch_size"]),
            ("train.warmup", flat["train.warmup_epochs"] > 0 and flat["train.warmup_synthetic"]),
        )
        if key in self._data:  # reused in memory: no cache lookups, no teacher passes
            data = self._data[key]
            n = len(data.train_texts) + len(data.val_texts)
            return replace(data, cache_metrics={**data.cache_metrics, "cache_hit_rate": 1.0, "cache_hits": float(n),
                                                "cache_misses": 0.0, "cache_computed": 0.0})
        if len(self._data) >= DATA_MEMO:  # a seed sweep alternates a few keys: keep the latest few
            self._data.pop(next(iter(self._data)))
        self._data[key] = prepare_data(config, self.device)
        return self._data[key]

    # -- the objective

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        values = self.sampled_values(trial)
        flat = {**flatten(self.base_config), **values}  # as sampled, even if the config rejects it
        tags = {"cnn3d.optuna_state": "RUNNING"}
        # Optuna keeps a retried trial's origin in system attrs, which Trial does not expose publicly;
        # reading this one trial's attrs avoids loading every trial of the study
        retry_of = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            tags["cnn3d.retry_of"] = str(retry_of)
        start = time.perf_counter()
        run_id = self.tracker.start_trial(self.parent_run_id, trial.number, flat, tags)
        metrics_log = MlflowRunLogger(self.tracker.client, run_id)  # the one store of per-epoch metrics
        try:  # from here on a Ctrl-C or a failure is recorded on both the trial and its run
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("config", {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()})
            self.overhead_seconds += time.perf_counter() - start
            config = self.trial_config(values)
            trial.set_user_attr("config", {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(config).items()})
            with self.tracker.system_metrics_for(run_id):
                train_start = time.perf_counter()
                result = train(config, device=self.device, callbacks=[self._epoch_callback(trial, metrics_log)],
                               progress=False, data=self.data_for(config))
                trial.set_user_attr("train_seconds", time.perf_counter() - train_start)
            if result.transfer:  # every trial of a train.init_from study says what it started from
                moved = {k: result.transfer[k] for k in ("source", "source_dims", "target_dims")}
                trial.set_user_attr("transfer", moved)
                self.tracker.set_tags(run_id, {"cnn3d.transfer_source": moved["source"], "cnn3d.transfer_dims":
                                               f"{moved['source_dims']} -> {moved['target_dims']}"})
            values = [result.metrics[o.metric] for o in self.objectives]
            self._attach_checkpoint(metrics_log.run_id, result, config)
            self._finish(trial, metrics_log, "COMPLETE", result.metrics, result.examples,
                         snapshot=lattice_snapshot(result.model, self.data_for(config), self.device))
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned:
            self._finish(trial, metrics_log, "PRUNED")
            raise
        except KeyboardInterrupt:
            self._finish(trial, metrics_log, "FAIL", reason="interrupted (Ctrl-C)", status="KILLED")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.warning("trial %d failed: %s", trial.number, reason)
            self._finish(trial, metrics_log, "FAIL", reason=reason)
            raise

    def _epoch_callback(self, trial: optuna.Trial, metrics_log: MetricLogger):
        single = len(self.objectives) == 1

        def on_epoch(report: EpochReport) -> None:
            start = time.perf_counter()
            metrics_log.log_metrics(report.metrics, report.epoch)
            metric = self.objectives[0].metric
            if single and metric in report.metrics:
                trial.report(report.metrics[metric], report.epoch)
                # a trial that did all its epochs is complete: pruning it now would only discard paid work
                if report.epoch < report.total_epochs and trial.should_prune():
                    trial.set_user_attr("pruned_at_epoch", report.epoch)
                    self.overhead_seconds += time.perf_counter() - start
                    raise optuna.TrialPruned(f"pruned at epoch {report.epoch}")
            self.overhead_seconds += time.perf_counter() - start

        return on_epoch

    def _attach_checkpoint(self, run_id: str, result, config) -> None:
        """The final weights as an MLflow artifact: the study report analyses the best trial's (tuner.report_analysis)."""
        start = time.perf_counter()
        try:
            # under train.grow_schedule the final cube is the last stage's
            stage = stage_config(config, max(len(result.history) - 1, 0))
            log_trial_checkpoint(self.tracker.client, run_id, result.model, stage, len(result.history))
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not fail a trained trial
            logger.warning("could not attach the checkpoint of MLflow run %s: %s", run_id, exc)
        self.overhead_seconds += time.perf_counter() - start

    def _finish(self, trial, metrics_log: MlflowRunLogger, state, metrics=None, examples=None, reason=None,
                status=None, snapshot=None) -> None:
        """Optuna keeps what Optuna and the summary need (final metrics, fail reason); MLflow keeps the
        per-epoch metrics (logged as they came), the examples, the lattice snapshot and the config."""
        start = time.perf_counter()
        if metrics is not None:
            trial.set_user_attr("metrics", metrics)
        if reason:
            trial.set_user_attr("fail_reason", reason)
        tags: dict[str, Any] = {"cnn3d.optuna_state": state}
        if "pruned_at_epoch" in trial.user_attrs:
            tags["cnn3d.pruned_at_epoch"] = trial.user_attrs["pruned_at_epoch"]
        if reason:
            tags["cnn3d.fail_reason"] = reason[:500]
        try:
            if examples:
                metrics_log.log_text(json.dumps(examples, indent=2, default=str), EXAMPLES_ARTIFACT)
            if snapshot is not None:
                metrics_log.log_text(json.dumps(snapshot), SNAPSHOT_ARTIFACT)
            metrics_log.log_text(json.dumps(trial.user_attrs["config"], indent=2, default=str), "config.json")
            self.tracker.set_tags(metrics_log.run_id, tags)
            metrics_log.finish(status or ("FAILED" if state == "FAIL" else "FINISHED"))
        except Exception as exc:  # noqa: BLE001 - never hide the trial's own outcome behind a tracking error
            logger.warning("could not finish MLflow run %s: %s", metrics_log.run_id, exc)
        self.overhead_seconds += time.perf_counter() - start


@torch.no_grad()
def lattice_snapshot(model, data: TrainingData, device: torch.device) -> dict[str, Any]:
    """Per-cell activation (mean |state|) and dominant expert for the first validation sentence.

    Downsampled by average pooling to at most ``SNAPSHOT_MAX_SIDE`` cells a side (a small MLflow artifact).
    """
    model.eval()
    out = model(data.val[:1].to(device))
    activation = out.state[0].float().abs().mean(0)  # [D, H, W]
    gates = out.gates[0].float()  # [E, D, H, W]
    stride = max(1, -(-max(activation.shape) // SNAPSHOT_MAX_SIDE))
    if stride > 1:
        pool = torch.nn.functional.avg_pool3d
        activation = pool(activation[None, None], stride, ceil_mode=True)[0, 0]
        gates = pool(gates[None], stride, ceil_mode=True)[0]
    return {
        "dims": list(activation.shape),
        "stride": stride,
        "activation": [round(v, 5) for v in activation.flatten().cpu().tolist()],
        "dominant_expert": gates.argmax(0).flatten().cpu().tolist(),
        "expert_names": list(model.expert_names),
        "input": data.val_texts[0],
    }
