"""Search spaces from the config's field metadata, in the dotted vocabulary.

``--param transform.dropout`` alone takes the field's range and scale;
``transform.dropout=0.0:0.5``, ``train.lr=1e-4:1e-2:log``, ``lattice.size=6:16:int``
and ``transform.kind=linear,attention`` override it; list-valued fields take choices
separated by ``|``: ``moe.experts=local,distant|local``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna.distributions as D

from cnn3d.config import ConfigError, FieldSpec, check_value, coerce, field_spec


@dataclass(frozen=True)
class ParamSpace:
    """One tuned parameter: a dotted key and its Optuna distribution."""

    key: str
    distribution: D.BaseDistribution

    def grid(self, points: int) -> list[Any]:
        """``points`` values spread evenly across the range (log-spaced for log scales); all choices for categoricals."""
        dist = self.distribution
        if isinstance(dist, D.CategoricalDistribution):
            return list(dist.choices)
        low, high = dist.low, dist.high
        if points <= 1:
            return [low if low == high else (low + high) / 2 if not dist.log else math.sqrt(low * high)]
        if dist.log:
            values = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (points - 1)) for i in range(points)]
        else:
            values = [low + i * (high - low) / (points - 1) for i in range(points)]
        if isinstance(dist, D.IntDistribution):
            return sorted(set(int(round(v)) for v in values))
        return [float(f"{v:.6g}") for v in values]


def parse_param(text: str) -> ParamSpace:
    """``key`` or ``key=spec``; errors are one-line ``ConfigError``s naming what was wrong."""
    key, sep, spec_text = text.partition("=")
    key = key.strip()
    spec = field_spec(key)  # unknown keys raise with suggestions
    if not sep:
        return ParamSpace(key, default_distribution(spec))
    return ParamSpace(key, _parse_range(spec, spec_text.strip()))


def default_distribution(spec: FieldSpec) -> D.BaseDistribution:
    """The field's own range: choices, bools, or [low, high] with its scale."""
    if spec.choices:
        return D.CategoricalDistribution(list(spec.choices))
    if spec.type is bool:
        return D.CategoricalDistribution([False, True])
    if spec.type in (int, float) and spec.low is not None and spec.high is not None:
        if spec.type is int:
            return D.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
        return D.FloatDistribution(float(spec.low), float(spec.high), log=spec.log)
    raise ConfigError(
        f"{spec.key} has no range to search; give one, e.g. --param {spec.key}=a,b,c (values) or =low:high"
    )


def _parse_range(spec: FieldSpec, text: str) -> D.BaseDistribution:
    if not text:
        raise ConfigError(f"--param {spec.key}= is empty; give low:high[:log|:int] or a,b,c")
    if ":" in text:
        return _parse_interval(spec, text)
    # choices are comma-separated; for list-valued fields (moe.experts) separate choices with '|'
    separator = "|" if "|" in text or spec.type is tuple else ","
    raw = [v.strip() for v in text.split(separator) if v.strip()]
    values = [coerce(spec, v) for v in raw]
    for v in values:
        check_value(spec, v)
    if len(set(map(repr, values))) != len(values) or not values:
        raise ConfigError(f"--param {spec.key}={text}: list distinct values, e.g. {spec.key}=a,b,c")
    if spec.type is tuple:  # Optuna choices must be scalars: keep the text, the config coerces it
        values = [",".join(map(str, v)) for v in values]
    return D.CategoricalDistribution(values)


def _parse_interval(spec: FieldSpec, text: str) -> D.BaseDistribution:
    parts = text.split(":")
    flags = {p.strip().lower() for p in parts[2:]}
    unknown = flags - {"log", "int", "float"}
    if len(parts) < 2 or unknown:
        raise ConfigError(f"--param {spec.key}={text} is malformed; use low:high, low:high:log or low:high:int")
    if spec.type not in (int, float):
        raise ConfigError(f"{spec.key} is not numeric; list its values instead, e.g. {spec.key}=a,b")
    is_int = "int" in flags or (spec.type is int and "float" not in flags)
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--param {spec.key}={text}: low and high must be numbers") from None
    if low > high:
        raise ConfigError(f"--param {spec.key}={text}: low {low:g} is above high {high:g}")
    for bound in (low, high):

        check_value(spec, int(bound) if spec.type is int else bound)
    log = "log" in flags
    if log and low <= 0:
        raise ConfigError(f"--param {spec.key}={text}: a log scale needs low > 0")
    if is_int:
        if spec.type is float:
            raise ConfigError(f"{spec.key} is a float; drop ':int'")
        return D.IntDistribution(int(low), int(high), log=log)
    return D.FloatDistribution(low, high, log=log)


def suggest(trial, space: ParamSpace) -> Any:
    """Ask an Optuna trial for this parameter's value (name = the dotted key)."""
    dist = space.distribution
    if isinstance(dist, D.CategoricalDistribution):
        return trial.suggest_categorical(space.key, list(dist.choices))
    if isinstance(dist, D.IntDistribution):
        return trial.suggest_int(space.key, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(space.key, dist.low, dist.high, log=dist.log)
