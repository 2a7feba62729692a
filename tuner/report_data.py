"""The study report's data step: an Optuna study (+ optional MLflow runs) -> a ``ReportData`` object.

Nothing here draws. ``build_report_data`` reads the study once, turns every trial into a
``TrialRecord``, and derives what the page shows: the header (counts, wall time, best trial and its
config diff from the preset's defaults), per-parameter effects on quality, speed, memory and
emergence (with mean and spread across seeds where a value was repeated), parameter importances
(named by evaluator), learning curves and the best trial's decoded examples and lattice snapshot.
Whatever cannot be shown becomes a sentence in ``ReportData.notices`` (or a section's note), so the
render step (``tuner.report``) never has to guess and odd studies never crash it.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
import optuna.distributions as D
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from .stores import redact

logger = logging.getLogger(__name__)

BASELINES = {"baseline_pca_cosine": "PCA baseline", "baseline_mean_cosine": "mean-vector baseline"}
BASELINE_METRICS = ("val_cosine",)  # metrics on the baselines' scale (cosine to the teacher)
QUALITY_EXTRA = ("val_cosine", "decode_top1")  # quality panels shown beside the objectives
COST_METRICS = ("throughput_samples_per_s", "peak_memory_mb")
EMERGENCE_METRICS = ("effective_dim", "mutual_info_front_back", "cell_specialization", "expert_usage_entropy",
                     "activation_sparsity", "rsa_teacher")
# each emergence metric's nulls, measured in the same run (cnn3d.analysis): suffix -> name on the panel
EMERGENCE_NULLS = {"_null_untrained": "untrained cube", "_null_shuffled": "shuffled control"}
EXPERT_USAGE = "expert_usage"  # one panel; a trace per expert_usage_<name>
CURVE_METRICS = ("val_cosine", "train_loss", "val_loss", "val_mse", "decode_top1")
MLFLOW_HISTORY_KEYS = ("val_cosine", "train_loss", "val_mse", "throughput_samples_per_s", "peak_memory_mb",
                       "effective_dim", "cell_specialization", "expert_usage_entropy", "decode_top1",
                       "baseline_pca_cosine", "baseline_mean_cosine")
LABELS = {
    "val_cosine": "validation cosine",
    "val_mse": "validation MSE",
    "val_loss": "validation loss",
    "train_loss": "training loss",
    "decode_top1": "decode top-1",
    "throughput_samples_per_s": "throughput (samples/s)",
    "peak_memory_mb": "peak memory (MB)",
    "effective_dim": "effective dimensionality",
    "cell_specialization": "cell specialisation",
    "expert_usage_entropy": "expert usage entropy",
    "mutual_info_front_back": "mutual information front-back (nats)",
    "activation_sparsity": "activation sparsity",
    "rsa_teacher": "RSA with the teacher",
    EXPERT_USAGE: "expert usage (share of cells)",
}
EVALUATORS = ("PED-ANOVA", "fANOVA")


def label(metric: str) -> str:
    """A reader's name for a metric key."""
    return LABELS.get(metric, metric.replace("_", " "))


# --------------------------------------------------------------------------- data classes


@dataclass
class ObjectiveInfo:
    """One objective: the metric and whether higher is better."""

    metric: str
    direction: str  # maximize | minimize

    @property
    def label(self) -> str:
        return f"{label(self.metric)} ({'higher' if self.direction == 'maximize' else 'lower'} is better)"


@dataclass
class ParamInfo:
    """A tuned parameter and its search space."""

    key: str
    kind: str  # float | int | categorical
    log: bool = False
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None

    def describe(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(map(str, self.choices or []))
        return f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log scale)" if self.log else "")


@dataclass
class TrialRecord:
    """What the report knows about one trial."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict[str, Any]
    values: list[float] | None
    metrics: dict[str, float]  # final metrics, or the last epoch's for pruned/failed trials
    history: list[dict[str, float]]
    seed: int | None = None
    duration_s: float | None = None
    run_id: str | None = None
    run_url: str | None = None
    pruned_at_epoch: int | None = None
    fail_reason: str | None = None


@dataclass
class EffectPoint:
    """One trial's value of a metric at one parameter value."""

    x: Any
    y: float
    trial: int
    state: str
    seed: int | None = None
    series: str = ""  # for multi-trace panels (expert usage): which expert


@dataclass
class GroupStat:
    """Mean and spread (sample std) of a metric over the complete trials that share one parameter value."""

    x: Any
    mean: float
    std: float
    n: int
    series: str = ""


@dataclass
class EffectPanel:
    """One metric against one parameter."""

    metric: str
    title: str
    role: str  # objective | quality | cost | emergence
    points: list[EffectPoint] = field(default_factory=list)
    groups: list[GroupStat] = field(default_factory=list)  # empty unless some value was repeated
    baselines: dict[str, list[tuple[Any, float]]] = field(default_factory=dict)  # name -> [(x, mean baseline)]
    series: list[str] = field(default_factory=list)  # names of the traces (expert usage), else [""]
    effect_to_noise: float | None = None  # range of the means / pooled seed std, when measurable


@dataclass
class ParamEffect:
    """Every panel for one tuned parameter."""

    param: ParamInfo
    panels: list[EffectPanel]
    note: str = ""


@dataclass
class Importance:
    """Parameter importances for one objective by one evaluator (a note instead when it could not run)."""

    evaluator: str
    objective: str
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class ConfigDiffRow:
    """One config field where the best trial differs from the preset's default."""

    key: str
    default: Any
    value: Any
    source: str  # tuned | --set | seed | other


@dataclass
class LatticeView:
    """Per-cell activation and dominant expert of the best model for one input (downsampled by ``stride``)."""

    dims: list[int]  # [D, H, W]
    stride: int
    activation: list[float]  # z-major, then y, then x
    dominant_expert: list[int]
    expert_names: list[str]
    input: str

    def coordinates(self) -> tuple[list[int], list[int], list[int]]:
        """(z, y, x) cell indices in the flattened order of ``activation``."""
        d, h, w = self.dims
        zs, ys, xs = [], [], []
        for z in range(d):
            for y in range(h):
                for x in range(w):
                    zs.append(z)
                    ys.append(y)
                    xs.append(x)
        return zs, ys, xs


@dataclass
class BestTrial:
    """The best trial (single objective) or the first Pareto-optimal one."""

    number: int
    values: dict[str, float]
    params: dict[str, Any]
    metrics: dict[str, float]
    config_diff: list[ConfigDiffRow]
    run_url: str | None
    examples: list[dict[str, Any]]
    lattice: LatticeView | None
    note: str = ""
    run_id: str | None = None  # its MLflow run (the report's analysis views read its checkpoint there)


@dataclass
class CurveData:
    """Per-epoch learning curves: for each metric, for each trial, (epochs, values)."""

    metrics: list[str]
    trials: dict[int, dict[str, tuple[list[int], list[float]]]]


@dataclass
class ReportData:
    """Everything the page shows; built by ``build_report_data``, drawn by ``tuner.report.render_report``."""

    study_name: str
    objectives: list[ObjectiveInfo]
    preset: str | None
    fixed: dict[str, Any]
    params: list[ParamInfo]
    param_specs: list[str]
    counts: dict[str, int]
    wall_seconds: float | None
    started: datetime | None
    ended: datetime | None
    trials: list[TrialRecord]
    best: BestTrial | None
    pareto: list[int]
    effects: list[ParamEffect]
    importances: list[Importance]
    top_pair: tuple[str, str] | None
    curves: CurveData
    tracking_uri: str | None
    experiment_url: str | None
    parent_run_url: str | None
    notices: list[str] = field(default_factory=list)
    directions: list[str] = field(default_factory=list)
    frozen_trials: list[FrozenTrial] = field(default_factory=list, repr=False)  # for optuna.visualization
    _light: optuna.Study | None = field(default=None, repr=False, compare=False)
    analysis: Any = field(default=None, repr=False)  # the best trial's cnn3d.analyze.Analysis (tuner.report_analysis)
    analysis_note: str = ""  # why there is no analysis, when write_report tried

    @property
    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "COMPLETE"]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def light_study(self) -> optuna.Study:
        """An in-memory study of the finished trials (no user attrs), for Optuna's own figures; built once."""
        if self._light is None:
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
            try:
                self._light = optuna.create_study(directions=self.directions or ["maximize"])
            finally:
                optuna.logging.set_verbosity(verbosity)
            self._light.add_trials(self.frozen_trials)
        return self._light


# --------------------------------------------------------------------------- the data step


def build_report_data(study: optuna.Study, mlflow_client: Any = None,
                      mlflow_ui_base: str = "http://127.0.0.1:5000", evaluators: tuple[str, ...] = EVALUATORS,
                      experiment_id: str | None = None) -> ReportData:
    """Read ``study`` and its trials' MLflow runs into ``ReportData``.

    MLflow is the one store of per-epoch metrics, decoded examples and the lattice snapshot: with
    ``mlflow_client`` the report reads them from each trial's run (``mlflow_run_id``). Without it (or for
    studies written before, which kept copies in user attrs) it falls back to what Optuna holds: user
    attrs, else the intermediate values. ``evaluators`` names the importance evaluators to run.
    """
    attrs = study.user_attrs
    objectives = _objectives(study)
    experiment_id = experiment_id or attrs.get("mlflow_experiment_id")
    ui = _UiLinks(mlflow_ui_base, experiment_id)
    frozen = study.get_trials(deepcopy=False)
    mlflow_history = _MlflowHistory(mlflow_client)
    trials = [_record(t, objectives, ui, mlflow_history) for t in frozen]
    params = _params(frozen)
    notices: list[str] = []
    counts = {s: sum(t.state == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    started, ended = _time_span(frozen)
    finished = [t for t in frozen if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    directions = ["maximize" if d == StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    data = ReportData(
        study_name=study.study_name, objectives=objectives, preset=attrs.get("preset"), fixed=dict(attrs.get("set", {})),
        params=params, param_specs=list(attrs.get("params", [])), counts=counts,
        wall_seconds=(ended - started).total_seconds() if started and ended else None, started=started, ended=ended,
        trials=trials, best=None, pareto=[], effects=[], importances=[], top_pair=None,
        curves=_curves(trials, objectives), tracking_uri=redact(attrs.get("tracking_uri") or "") or None,
        experiment_url=ui.experiment(), parent_run_url=ui.run(attrs.get("mlflow_parent_run_id")),
        notices=notices, directions=directions, frozen_trials=[_light_copy(t) for t in finished],
    )
    _study_notices(data)
    data.pareto, best_frozen = _best(study, frozen)
    if best_frozen is not None:
        data.best = _best_trial(best_frozen, data, ui, mlflow_history)
    if len(params) > 1 and data.complete:
        data.importances = _importances(data, evaluators)
    data.effects = _effects(data)
    data.top_pair = _top_pair(data)
    return data


class _UiLinks:
    def __init__(self, base: str, experiment_id: str | None):
        self.base, self.experiment_id = base.rstrip("/"), experiment_id

    def experiment(self) -> str | None:
        return f"{self.base}/#/experiments/{self.experiment_id}/runs" if self.experiment_id else None

    def run(self, run_id: str | None) -> str | None:
        if not (self.experiment_id and run_id):
            return None
        return f"{self.base}/#/experiments/{self.experiment_id}/runs/{run_id}"


def _objectives(study: optuna.Study) -> list[ObjectiveInfo]:
    saved = study.user_attrs.get("objectives") or []
    directions = ["maximize" if d == StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    out = []
    for i, direction in enumerate(directions):
        metric = saved[i].partition(":")[0] if i < len(saved) else ("objective" if len(directions) == 1 else f"objective {i}")
        out.append(ObjectiveInfo(metric, direction))
    return out


def _params(trials: list[FrozenTrial]) -> list[ParamInfo]:
    """Tuned parameters, in the order they first appear; ranges merged across trials."""
    found: dict[str, ParamInfo] = {}
    for trial in trials:
        for key, dist in trial.distributions.items():
            info = _param_info(key, dist)
            known = found.get(key)
            if known is None:
                found[key] = info
            elif known.kind == "categorical" and info.kind == "categorical":
                known.choices = list(dict.fromkeys([*(known.choices or []), *(info.choices or [])]))
            elif known.kind != "categorical" and info.kind != "categorical":
                known.low, known.high = min(known.low, info.low), max(known.high, info.high)
    return list(found.values())


def _param_info(key: str, dist: D.BaseDistribution) -> ParamInfo:
    if isinstance(dist, D.CategoricalDistribution):
        return ParamInfo(key, "categorical", choices=list(dist.choices))
    kind = "int" if isinstance(dist, D.IntDistribution) else "float"
    return ParamInfo(key, kind, log=bool(getattr(dist, "log", False)), low=dist.low, high=dist.high)


def _record(trial: FrozenTrial, objectives: list[ObjectiveInfo], ui: _UiLinks,
            mlflow_history: _MlflowHistory) -> TrialRecord:
    attrs = trial.user_attrs
    history = [dict(h) for h in attrs.get("history") or [] if isinstance(h, dict)]
    run_id = attrs.get("mlflow_run_id")
    if not history and run_id and trial.state != TrialState.WAITING:
        history = mlflow_history(run_id)
    if not history and trial.intermediate_values and len(objectives) == 1:
        history = [{"epoch": step, objectives[0].metric: value} for step, value in sorted(trial.intermediate_values.items())]
    metrics = dict(attrs.get("metrics") or (history[-1] if history else {}))
    values = list(trial.values) if trial.values is not None and trial.state == TrialState.COMPLETE else None
    seed = attrs.get("train.seed", (attrs.get("config") or {}).get("train.seed"))
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialRecord(
        number=trial.number, state=trial.state.name, params=dict(trial.params), values=values,
        metrics={k: v for k, v in metrics.items() if _is_number(v)}, history=history, seed=seed,
        duration_s=duration, run_id=run_id, run_url=ui.run(run_id), pruned_at_epoch=attrs.get("pruned_at_epoch"),
        fail_reason=attrs.get("fail_reason"),
    )


class _MlflowHistory:
    """Per-epoch metrics of a run from MLflow (step = epoch); after one failure it stops asking."""

    def __init__(self, client: Any):
        self.client = client

    def __call__(self, run_id: str) -> list[dict[str, float]]:
        if self.client is None:
            return []
        per_epoch: dict[int, dict[str, float]] = {}
        try:
            for key in MLFLOW_HISTORY_KEYS:
                for m in self.client.get_metric_history(run_id, key):
                    per_epoch.setdefault(int(m.step), {"epoch": int(m.step)})[key] = float(m.value)
        except Exception as exc:  # noqa: BLE001 - MLflow is a bonus source; the report must still render
            logger.warning("could not read MLflow history of run %s (%s); not asking MLflow again", run_id, exc)
            self.client = None
            return []
        return [per_epoch[e] for e in sorted(per_epoch)]


    def artifact_json(self, run_id: str | None, name: str) -> Any:
        """A JSON artifact of a run, or None (no client, no run, no such artifact)."""
        if self.client is None or not run_id:
            return None
        import tempfile
        from pathlib import Path

        from .tracking import download_artifact

        try:
            with tempfile.TemporaryDirectory() as tmp:
                return json.loads(Path(download_artifact(self.client, run_id, name, tmp)).read_text())
        except Exception as exc:  # noqa: BLE001 - a missing artifact is a note in the report, not a failure
            logger.warning("could not read %s of MLflow run %s (%s)", name, run_id, _short(exc))
            return None


def _short(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _light_copy(trial: FrozenTrial) -> FrozenTrial:
    """A copy without user attrs (histories, snapshots): Optuna's figures only need params and values."""
    complete = trial.state == TrialState.COMPLETE
    return optuna.trial.create_trial(
        state=trial.state, values=trial.values if complete else None, params=trial.params,
        distributions=trial.distributions,
        intermediate_values=trial.intermediate_values if trial.state != TrialState.FAIL else None,
        system_attrs={k: v for k, v in trial.system_attrs.items() if k == "constraints"},
    )


def _time_span(trials: list[FrozenTrial]) -> tuple[datetime | None, datetime | None]:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (min(starts) if starts else None, max(ends) if ends else None)


def _study_notices(data: ReportData) -> None:
    c = data.counts
    total = sum(c.values())
    if total == 0:
        data.notices.append("The study has no trials yet: run cnn3d-tune on it, then write this report again.")
        return
    if c["COMPLETE"] == 0:
        why = []
        if c["PRUNED"]:
            why.append(f"{c['PRUNED']} pruned")
        if c["FAIL"]:
            why.append(f"{c['FAIL']} failed (reasons in the trials table)")
        if c["RUNNING"] or c["WAITING"]:
            why.append(f"{c['RUNNING'] + c['WAITING']} running or waiting")
        data.notices.append("No trial has completed (" + ", ".join(why) + "): there is no best trial, no importance "
                            "and no optimisation history; pruned trials appear with their last reported value.")
    elif c["COMPLETE"] == 1:
        data.notices.append("Only one trial completed: effects and importances need more trials to mean anything.")
    if not data.params:
        data.notices.append("No trial recorded a tuned parameter, so there are no parameter effects to show.")
    if c["RUNNING"] or c["WAITING"]:
        data.notices.append(f"{c['RUNNING']} trial(s) running and {c['WAITING']} waiting: this report is a snapshot "
                            "of an unfinished study.")


def _best(study: optuna.Study, trials: list[FrozenTrial]) -> tuple[list[int], FrozenTrial | None]:
    """(Pareto-optimal trial numbers, the trial to detail) — none without a complete trial."""
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return [], None
    try:
        if len(study.directions) == 1:
            best = study.best_trial
            return [best.number], best
        front = sorted(study.best_trials, key=lambda t: t.values[0], reverse=study.directions[0] == StudyDirection.MAXIMIZE)
        return sorted(t.number for t in front), (front[0] if front else None)
    except (ValueError, RuntimeError) as exc:
        logger.warning("no best trial: %s", exc)
        return [], None


# --------------------------------------------------------------------------- best trial


def _best_trial(trial: FrozenTrial, data: ReportData, ui: _UiLinks, mlflow: _MlflowHistory) -> BestTrial:
    attrs = trial.user_attrs
    run_id = attrs.get("mlflow_run_id")
    diff, note = config_diff(attrs.get("config"), data.preset, [p.key for p in data.params], data.fixed)
    # MLflow holds them (studies written before it did kept copies in user attrs)
    lattice, lattice_note = _lattice(attrs.get("lattice_snapshot") or mlflow.artifact_json(run_id, "lattice_snapshot.json"))
    notes = [n for n in (note, lattice_note) if n]
    stored = attrs.get("examples") or mlflow.artifact_json(run_id, "decoded_examples.json") or []
    examples = [e for e in stored if isinstance(e, dict)]
    if not examples:
        notes.append("The best trial stored no decoded examples.")
    return BestTrial(
        number=trial.number, values={o.metric: v for o, v in zip(data.objectives, trial.values or [])},
        params=dict(trial.params), metrics={k: v for k, v in (attrs.get("metrics") or {}).items() if _is_number(v)},
        config_diff=diff, run_url=ui.run(attrs.get("mlflow_run_id")), examples=examples, lattice=lattice,
        note=" ".join(notes), run_id=run_id,
    )


def config_diff(config: dict[str, Any] | None, preset_name: str | None, tuned: list[str],
                fixed: dict[str, Any]) -> tuple[list[ConfigDiffRow], str]:
    """Fields of a trial's flattened ``config`` that differ from the preset's defaults, with where each came from."""
    if not config:
        return [], "The best trial has no stored config, so its difference from the defaults is unknown."
    from cnn3d.config import ConfigError, flatten, preset

    try:
        defaults = flatten(preset(preset_name or "test"))
    except ConfigError as exc:
        return [], f"Cannot compare with the defaults: {exc}"
    rows = []
    for key, value in config.items():
        default = defaults.get(key)
        if _same(value, default):
            continue
        source = "tuned" if key in tuned else "--set" if key in fixed else "seed" if key == "train.seed" else "other"
        rows.append(ConfigDiffRow(key, _plain(default), _plain(value), source))
    order = {"tuned": 0, "--set": 1, "seed": 2, "other": 3}
    rows.sort(key=lambda r: (order[r.source], r.key))
    return rows, ""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if _is_number(a) and _is_number(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _lattice(snapshot: Any) -> tuple[LatticeView | None, str]:
    if not isinstance(snapshot, dict):
        return None, "The best trial stored no lattice snapshot."
    try:
        view = LatticeView(
            dims=[int(v) for v in snapshot["dims"]], stride=int(snapshot.get("stride", 1)),
            activation=[float(v) for v in snapshot["activation"]],
            dominant_expert=[int(v) for v in snapshot.get("dominant_expert") or []],
            expert_names=[str(v) for v in snapshot.get("expert_names") or []], input=str(snapshot.get("input", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"The lattice snapshot is malformed ({type(exc).__name__}: {exc})."
    cells = math.prod(view.dims) if len(view.dims) == 3 else -1
    if cells != len(view.activation) or (view.dominant_expert and len(view.dominant_expert) != cells):
        return None, f"The lattice snapshot's sizes disagree (dims {view.dims}, {len(view.activation)} activations)."
    return view, ""


# --------------------------------------------------------------------------- importances


def _importances(data: ReportData, evaluators: tuple[str, ...]) -> list[Importance]:
    study = data.light_study()
    out = []
    for i, objective in enumerate(data.objectives):
        target = (lambda t, i=i: t.values[i]) if data.multi_objective else None
        for name in evaluators:
            out.append(_importance(study, name, objective.metric, target))
    return out


def make_evaluator(name: str) -> optuna.importance.BaseImportanceEvaluator:
    """``PED-ANOVA`` (Optuna 5's default) or ``fANOVA``, seeded so the page is reproducible."""
    if name == "fANOVA":
        return optuna.importance.FanovaImportanceEvaluator(seed=0)
    if name == "PED-ANOVA":
        return optuna.importance.PedAnovaImportanceEvaluator()
    raise ValueError(f"unknown importance evaluator {name!r}; choose {', '.join(EVALUATORS)}")


def _importance(study: optuna.Study, name: str, metric: str, target: Callable | None) -> Importance:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return Importance(name, metric, note=f"{name} needs at least 2 complete trials ({len(complete)} so far).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=make_evaluator(name), target=target)
    except Exception as exc:  # noqa: BLE001 - evaluators fail on tiny or degenerate studies; say so
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Importance(name, metric, note=f"{name} could not rank the parameters: {first}")
    values = {k: float(v) for k, v in values.items() if _is_number(v)}
    if not values or not any(values.values()):
        return Importance(name, metric, values, note=f"{name} found no parameter that explains any variation yet.")
    return Importance(name, metric, values)


def _ranking(data: ReportData) -> list[str]:
    """Parameters by importance (first usable evaluator, first objective), else in study order."""
    for imp in data.importances:
        if imp.values and any(imp.values.values()):
            ranked = sorted(imp.values, key=lambda k: -imp.values[k])
            return ranked + [p.key for p in data.params if p.key not in ranked]
    return [p.key for p in data.params]


def _top_pair(data: ReportData) -> tuple[str, str] | None:
    ranked = _ranking(data)
    return (ranked[0], ranked[1]) if len(ranked) >= 2 else None


# --------------------------------------------------------------------------- parameter effects


def _effects(data: ReportData) -> list[ParamEffect]:
    by_key = {p.key: p for p in data.params}
    usable = [t for t in data.trials if t.state in ("COMPLETE", "PRUNED") and t.metrics]
    experts = sorted({k[len(EXPERT_USAGE) + 1:] for t in usable for k in t.metrics
                      if k.startswith(EXPERT_USAGE + "_") and k != "expert_usage_entropy"})
    effects = []
    for key in _ranking(data):
        param = by_key[key]
        trials = [t for t in usable if key in t.params]
        panels = [p for p in _panels(param, trials, data.objectives, experts) if p.points]
        note = "" if trials else "No complete or pruned trial has a value for this parameter yet."
        if panels and data.objectives and not any(g.n > 1 for g in panels[0].groups) and len(data.params) == 1:
            note = ("Each value was run once: the scatter cannot separate an effect from seed noise; "
                    "repeat the sweep with --seeds 3 (or more) for a mean and spread per value.")
        effects.append(ParamEffect(param, panels, note))
    return effects


def _panels(param: ParamInfo, trials: list[TrialRecord], objectives: list[ObjectiveInfo],
            experts: list[str]) -> list[EffectPanel]:
    panels = []
    shown = set()
    for i, objective in enumerate(objectives):
        panels.append(_panel(param, trials, objective.metric, f"{objective.label}", "objective", objective_index=i))
        shown.add(objective.metric)
    for metric in QUALITY_EXTRA:
        if metric not in shown:
            panels.append(_panel(param, trials, metric, label(metric), "quality"))
            shown.add(metric)
    for role, metrics in (("cost", COST_METRICS), ("emergence", EMERGENCE_METRICS)):
        for metric in metrics:
            if metric not in shown:
                panels.append(_panel(param, trials, metric, label(metric), role))
    if experts:
        panels.append(_panel(param, trials, EXPERT_USAGE, label(EXPERT_USAGE), "emergence", series=experts))
    return panels


def _panel(param: ParamInfo, trials: list[TrialRecord], metric: str, title: str, role: str,
           objective_index: int | None = None, series: list[str] | None = None) -> EffectPanel:
    panel = EffectPanel(metric, title, role, series=series or [""])
    if role in ("cost", "emergence") and any(t.state == "COMPLETE" for t in trials):
        trials = [t for t in trials if t.state == "COMPLETE"]  # a pruned trial's epoch-1 cost is not comparable
    for trial in trials:
        x = trial.params[param.key]
        for name in panel.series:
            key = f"{EXPERT_USAGE}_{name}" if name else metric
            y = trial.metrics.get(key)
            if objective_index is not None and trial.values is not None:
                y = trial.values[objective_index]
            if _is_number(y):
                panel.points.append(EffectPoint(x, float(y), trial.number, trial.state, trial.seed, name))
    panel.groups = _groups([p for p in panel.points if p.state == "COMPLETE"])
    panel.effect_to_noise = _effect_to_noise(panel.groups)
    if metric in BASELINE_METRICS:
        panel.baselines = _baselines(param, [t for t in trials if t.state == "COMPLETE"] or trials)
    elif metric in EMERGENCE_METRICS:
        nulls = {metric + suffix: name for suffix, name in EMERGENCE_NULLS.items()}
        panel.baselines = _baselines(param, [t for t in trials if t.state == "COMPLETE"] or trials, nulls)
    return panel


def _groups(points: list[EffectPoint]) -> list[GroupStat]:
    """Mean and std per (series, value), only when at least one value was run more than once."""
    buckets: dict[tuple[str, Any], list[float]] = {}
    for p in points:
        buckets.setdefault((p.series, _key(p.x)), []).append(p.y)
    if not any(len(ys) > 1 for ys in buckets.values()):
        return []
    stats = [GroupStat(x, statistics.fmean(ys), statistics.stdev(ys) if len(ys) > 1 else 0.0, len(ys), series)
             for (series, x), ys in buckets.items()]
    return sorted(stats, key=lambda g: (g.series, _sort_key(g.x)))


def _effect_to_noise(groups: list[GroupStat]) -> float | None:
    """Range of the per-value means over the pooled within-value std (first series only)."""
    first = [g for g in groups if g.series == (groups[0].series if groups else "")]
    repeated = [g for g in first if g.n > 1]
    if len(first) < 2 or not repeated:
        return None
    dof = sum(g.n - 1 for g in repeated)
    pooled = math.sqrt(sum((g.n - 1) * g.std**2 for g in repeated) / dof) if dof else 0.0
    spread = max(g.mean for g in first) - min(g.mean for g in first)
    if pooled == 0:
        return None if spread == 0 else math.inf
    return spread / pooled


def _baselines(param: ParamInfo, trials: list[TrialRecord],
               names: dict[str, str] | None = None) -> dict[str, list[tuple[Any, float]]]:
    """Per parameter value, the mean in-run baseline or null (``names``: metric key -> shown name)."""
    out = {}
    for metric, name in (names or BASELINES).items():
        buckets: dict[Any, list[float]] = {}
        for t in trials:
            if _is_number(t.metrics.get(metric)):
                buckets.setdefault(_key(t.params[param.key]), []).append(float(t.metrics[metric]))
        if buckets:
            out[name] = sorted(((x, statistics.fmean(v)) for x, v in buckets.items()), key=lambda p: _sort_key(p[0]))
    return out


def _key(x: Any) -> Any:
    """Group key: floats rounded to 6 significant digits so 0.1 and 0.10000000001 share a bucket."""
    return float(f"{x:.6g}") if isinstance(x, float) else x


def _sort_key(x: Any) -> tuple:
    return (0, x, "") if _is_number(x) else (1, 0, str(x))


# --------------------------------------------------------------------------- learning curves


def _curves(trials: list[TrialRecord], objectives: list[ObjectiveInfo]) -> CurveData:
    wanted = list(dict.fromkeys([o.metric for o in objectives] + list(CURVE_METRICS)))
    present = [m for m in wanted if any(m in h for t in trials for h in t.history)]
    out: dict[int, dict[str, tuple[list[int], list[float]]]] = {}
    for t in trials:
        per_metric = {}
        for metric in present:
            pairs = [(int(h.get("epoch", i + 1)), float(h[metric])) for i, h in enumerate(t.history)
                     if _is_number(h.get(metric))]
            if pairs:
                per_metric[metric] = ([e for e, _ in pairs], [v for _, v in pairs])
        if per_metric:
            out[t.number] = per_metric
    return CurveData(present, out)
