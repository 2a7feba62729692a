"""``cnn3d-report STUDY``: write a study's HTML report (the same page ``cnn3d-tune`` writes at the end)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from cnn3d.cli import LOG_LEVELS, run_cli, setup_logging
from cnn3d.errors import UserError

from .stores import probe_server, redact, scheme_of

logger = logging.getLogger(__name__)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("study")
@click.option("--storage", default=None, help="Optuna storage URL (default $CNN3D_STORAGE or sqlite:///studies/cnn3d.db).")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI (default: the one the study recorded, else $MLFLOW_TRACKING_URI).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default studies/reports/STUDY.html).")
@click.option("--mlflow-ui", default="http://127.0.0.1:5000", show_default=True,
              help="Base URL of the MLflow UI the page links to.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info")
@run_cli
def report_cli(study, storage, tracking_uri, out, mlflow_ui, log_level) -> None:
    """Write one self-contained HTML report of STUDY: effects, importances, history, best trial."""
    from . import run  # noqa: F401 - imports mlflow, which sets up its own logger on import: before ours
    from .report import write_report

    setup_logging(log_level)
    loaded = load_study(study, storage)
    client = mlflow_client(tracking_uri or _recorded_uri(loaded) or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        path = write_report(loaded, out=out, mlflow_ui_base=mlflow_ui, mlflow_client=client)
    except OSError as exc:  # a read-only or missing place for --out: the study itself is untouched
        raise UserError(f"cannot write the report to {exc.filename or out} ({exc.strerror or exc}); "
                        "pass --out with a writable path") from None
    click.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser (works offline)")


def load_study(name: str, storage: str | None):
    """The named study; a missing storage or study is a one-line ``UserError`` naming what exists."""
    import optuna

    from .run import make_storage, resolve_storage_url

    url = resolve_storage_url(storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise UserError(f"no study storage at {url[len('sqlite:///'):]}; run cnn3d-tune first or pass --storage URL")
    rdb = make_storage(url)
    names = sorted(optuna.get_all_study_names(storage=rdb))
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise UserError(f"no study named {name!r} in {redact(url)}; existing studies: {known}")
    return optuna.load_study(study_name=name, storage=rdb)


def _recorded_uri(study) -> str | None:
    """The tracking URI the study recorded; a redacted one (its password was removed) cannot be used."""
    uri = study.user_attrs.get("tracking_uri")
    if uri and ":***@" in uri:
        logger.warning("the study's tracking URI %s needs a password: pass --tracking-uri to read MLflow", uri)
        return None
    return uri


def mlflow_client(uri: str | None):
    """An ``MlflowClient`` for reading trial histories, or None when no usable store is known (never creates one)."""
    if not uri:
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        logger.warning("MLflow store %s does not exist; the report uses what the study stored", uri)
        return None
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use sqlite:///PATH or http://HOST")
    if scheme_of(uri) in ("http", "https"):
        probe_server(uri)  # a server that is down costs seconds, not minutes of MLflow's retries
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
