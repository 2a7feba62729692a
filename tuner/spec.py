"""Study specifications: what to tune, against which objectives, with what budget.

A spec comes from a YAML file in ``studies/`` (read with ``yaml.safe_load``) and/or
command-line flags; flags override the file. Every key is validated with a clear
one-line error.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnn3d.config import PRESETS, ConfigError, preset, with_overrides
from cnn3d.errors import UserError
from cnn3d.train import CONTINUAL_METRICS, MULTI_TEACHER_PREFIXES, is_reported_metric

from .space import ParamSpace, parse_param

SAMPLERS = ("auto", "tpe", "random", "grid", "gp", "cmaes")
PRUNERS = ("auto", "median", "hyperband", "none")


def is_continual_metric(name: str) -> bool:
    """Metrics only runs over ``data.domains`` report (``cnn3d.continual``)."""
    return name in CONTINUAL_METRICS or name.startswith("cl_")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize

    @classmethod
    def parse(cls, text: str) -> Objective:
        metric, _, direction = text.partition(":")
        metric, direction = metric.strip(), (direction.strip().lower() or "max")
        aliases = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
        if direction not in aliases:
            raise UserError(f"objective {text!r}: direction must be max or min, e.g. val_cosine:max")
        if not is_reported_metric(metric):
            from cnn3d.train import REPORTED_METRICS

            close = difflib.get_close_matches(metric, REPORTED_METRICS, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known metrics: {', '.join(REPORTED_METRICS)}"
            raise UserError(f"unknown objective metric {metric!r}{hint}")
        return cls(metric, aliases[direction])

    def __str__(self) -> str:
        return f"{self.metric}:{'max' if self.direction == 'maximize' else 'min'}"


@dataclass
class StudySpec:
    """Everything ``run_study`` needs; field names are the YAML keys."""

    name: str = ""
    preset: str = "test"
    params: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["val_cosine:max"])
    sampler: str = "auto"
    pruner: str = "auto"
    trials: int = 10
    timeout: float | None = None
    workers: int | str = 1  # or "auto" (cnn3d-tune's default): see run.auto_workers
    seeds: int = 0  # sweep repeats per value; 0 = as many as the trial budget allows
    storage: str | None = None
    tracking_uri: str | None = None
    report: bool = True
    description: str = ""

    # -- derived

    def spaces(self) -> list[ParamSpace]:
        spaces = [parse_param(p) for p in self.params]
        keys = [s.key for s in spaces]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise UserError(f"--param {', '.join(dupes)} given more than once")
        fixed = sorted(set(keys) & set(self.set))
        if fixed:
            raise UserError(f"{', '.join(fixed)} is both tuned (--param) and fixed (--set); choose one")
        return spaces

    def parsed_objectives(self) -> list[Objective]:
        objectives = [Objective.parse(o) for o in self.objectives]
        if len({o.metric for o in objectives}) != len(objectives):
            raise UserError("the same metric is named twice in --objective")
        return objectives

    def base_config(self):
        """The preset with ``set`` applied (validated)."""
        return with_overrides(preset(self.preset), self.set)

    def study_name(self) -> str:
        if self.name:
            return self.name
        keys = "+".join(sorted(parse_param(p).key for p in self.params)) or "defaults"
        return f"{self.preset}-{keys}"

    def validate(self) -> StudySpec:
        if self.preset not in PRESETS:
            raise UserError(f"preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS[1:])}")
        if self.pruner not in PRUNERS:
            raise UserError(f"pruner {self.pruner!r} is unknown; choose one of {', '.join(PRUNERS[1:])}")
        if self.trials < 1:
            raise UserError(f"trials must be at least 1, got {self.trials}")
        if self.workers != "auto" and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                       or self.workers < 1):
            raise UserError(f"workers must be a whole number of at least 1, or auto; got {self.workers!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"timeout must be positive seconds, got {self.timeout}")
        if not self.objectives:
            raise UserError("at least one objective is needed, e.g. --objective val_cosine:max")
        self.spaces()
        objectives = self.parsed_objectives()
        if len(objectives) > 1 and self.pruner in ("median", "hyperband"):
            raise UserError("pruning needs a single objective; use --pruner none with several objectives")
        try:
            config = self.base_config()
        except ConfigError as exc:
            raise UserError(f"set: {exc}") from None
        _check_schedules(config, self.spaces())
        several = [o.metric for o in objectives
                   if o.metric == "val_cosine_fraction" or o.metric.startswith(MULTI_TEACHER_PREFIXES)]
        if several and not config.teacher.extra and "teacher.extra" not in {s.key for s in self.spaces()}:
            raise UserError(f"objective {several[0]} needs several teachers; add --set teacher.extra=NAME:POOLING "
                            "(e.g. cls:cls)")
        continual = [o.metric for o in objectives if is_continual_metric(o.metric)]
        if continual and len(config.data.domains) < 2 and "data.domains" not in {s.key for s in self.spaces()}:
            raise UserError(f"objective {continual[0]} needs a sequence of domains; "
                            "add --set data.domains=builtin:news,builtin:dialogue (or your corpora)")
        return self


EPOCH_KEYS = ("train.warmup_epochs", "train.main_epochs", "train.fine_tune_epochs")


def _check_schedules(config, spaces: list[ParamSpace]) -> None:
    """Each swept ``train.grow_schedule`` against the fixed epochs, before any trial starts (the grammar
    itself is checked when the value is parsed); skipped when an epoch count is tuned too."""
    keys = {s.key for s in spaces}
    for space in spaces:
        if space.key == "train.grow_schedule" and not keys & set(EPOCH_KEYS):
            for value in getattr(space.distribution, "choices", ()):
                try:
                    with_overrides(config, {space.key: value})
                except ConfigError as exc:
                    raise UserError(f"--param {space.key}: {exc}") from None


def load_spec(path: str | Path, base: StudySpec | None = None) -> StudySpec:
    """Read and validate a YAML study spec; errors name the file and the bad key. Keys it leaves out take
    ``base``'s values (default: ``StudySpec()``'s)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study spec {path} does not exist; see studies/*.yaml for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"study spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"study spec {path} must be a mapping of keys (name, params, objectives, ...)")
    data.setdefault("name", path.stem)  # studies/dropout.yaml -> study "dropout"
    try:
        return spec_from_dict(data, base).validate()
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def spec_from_dict(data: dict[str, Any], base: StudySpec | None = None) -> StudySpec:
    fields = {f.name: f for f in dataclasses.fields(StudySpec)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(fields)}"
        raise UserError(f"unknown study spec key {unknown[0]!r}{hint}")
    values = dataclasses.asdict(base or StudySpec())
    for key, value in data.items():
        values[key] = _coerce_spec_value(key, value)
    return StudySpec(**values)


def _coerce_spec_value(key: str, value: Any) -> Any:
    if key == "params" and isinstance(value, dict):  # {key: spec} or {key: [choices]} or {key: null}
        value = [k if v is None else f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in value.items()]
    if key in ("params", "objectives"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise UserError(f"{key} must be a list of strings")
        if key == "params":
            return [str(v) for v in value]
        return [str(v) for v in value]
    if key == "set":
        if not isinstance(value, dict):
            raise UserError("set must be a mapping of dotted config keys to values")
        return dict(value)
    if key == "workers" and value == "auto":
        return value
    if key in ("trials", "workers", "seeds") and (not isinstance(value, int) or isinstance(value, bool)):
        raise UserError(f"{key} must be an integer, got {value!r}")
    if key == "timeout" and value is not None and not isinstance(value, (int, float)):
        raise UserError(f"timeout must be a number of seconds, got {value!r}")
    return value
