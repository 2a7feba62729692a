"""One narrow interface for metric logging, used by ``cnn3d-train`` and by the tuner.

A ``MetricLogger`` receives a run's params once, its metrics after every epoch (``step`` = epoch),
text artifacts (decoded examples, configs) and a final status. Two implementations live here:
``NullLogger`` (tracking off) and ``JsonFileLogger`` (one JSON file, written atomically at the end).
Others are plugins: a package registers a factory under the ``cnn3d.loggers`` entry-point group,
named by the URI scheme it handles (the tuner registers MLflow's ``sqlite``, ``postgresql``, ``http``
and ``https``), so this library never imports a tracking client itself.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

ENTRY_POINT_GROUP = "cnn3d.loggers"
STATUSES = ("FINISHED", "FAILED", "KILLED")


class MetricLogger(Protocol):
    """Where a training run's params, per-epoch metrics and artifacts go."""

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's flattened config (dotted keys), once, before the first epoch."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Numeric metrics of one epoch (``step`` is the 1-based epoch)."""

    def log_text(self, text: str, name: str) -> None:
        """A text artifact such as ``decoded_examples.json``."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``."""


# factory(uri, run_name, tags) -> MetricLogger
LoggerFactory = Callable[[str, str, dict[str, str]], MetricLogger]


class NullLogger:
    """Tracking off: every call does nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class JsonFileLogger:
    """Everything in one JSON file, written (temporary file, then rename) when the run finishes."""

    def __init__(self, path: str | Path, run_name: str = "", tags: dict[str, str] | None = None):
        self.path = Path(path)
        self.record: dict[str, Any] = {"run_name": run_name, "tags": dict(tags or {}), "params": {},
                                       "metrics": [], "artifacts": {}, "status": "RUNNING"}

    def log_params(self, params: dict[str, Any]) -> None:
        self.record["params"].update({k: list(v) if isinstance(v, tuple) else v for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if _finite_number(v)}
        self.record["metrics"].append({"step": step, **numbers})

    def log_text(self, text: str, name: str) -> None:
        self.record["artifacts"][name] = text

    def finish(self, status: str = "FINISHED") -> None:
        self.record["status"] = status
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self.record, out, indent=2, allow_nan=False, default=str)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def installed_schemes() -> dict[str, Any]:
    """URI scheme -> entry point, for every logger plugin installed."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def open_logger(uri: str | None, run_name: str, tags: dict[str, str] | None = None) -> MetricLogger:
    """The logger for ``uri``: none for an empty URI, ``json:PATH`` for a JSON file, else a plugin by scheme.

    A scheme no installed plugin handles is a one-line ``UserError`` naming the schemes that are.
    """
    tags = dict(tags or {})
    if not uri:
        return NullLogger()
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme == "json":
        return JsonFileLogger(uri[len("json:"):].removeprefix("//"), run_name, tags)
    plugins = installed_schemes()
    if scheme not in plugins:
        known = ", ".join(sorted(["json", *plugins]))
        raise UserError(
            f"no metric logger for tracking URI {_without_password(uri)!r} (scheme {scheme or 'none'!r}) is "
            f"installed; installed schemes: {known} (MLflow comes with the tuner: pip install -e .)"
        )
    factory: LoggerFactory = plugins[scheme].load()
    return factory(uri, run_name, tags)


def _without_password(uri: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rsplit('@', 1)[1]}"))
