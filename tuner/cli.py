"""``cnn3d-tune`` and ``cnn3d-report``: thin click commands over ``tuner.run`` and ``tuner.report``."""

from __future__ import annotations

import logging

import click

from cnn3d.cli import LOG_LEVELS, fail, run_cli, setup_logging, standalone
from cnn3d.config import PRESETS, parse_assignments
from cnn3d.errors import UserError

from .spec import PRUNERS, SAMPLERS, StudySpec, load_spec, spec_from_dict

logger = logging.getLogger(__name__)


def _spec_from_cli(spec_path, name, preset, params, assignments, objectives, sampler, pruner, trials, timeout,
                   workers, seeds, storage, tracking_uri, report) -> StudySpec:
    cli_default = StudySpec(workers="auto")  # the command uses the machine; the Python API runs in-process
    base = load_spec(spec_path, cli_default) if spec_path else cli_default
    given = {
        "name": name, "preset": preset, "sampler": sampler, "pruner": pruner, "trials": trials,
        "timeout": timeout, "workers": _workers_option(workers), "seeds": seeds, "storage": storage, "tracking_uri": tracking_uri,
        "report": report,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if params:
        overrides["params"] = list(params)
    if objectives:
        overrides["objectives"] = list(objectives)
    if assignments:
        overrides["set"] = {**base.set, **parse_assignments(assignments)}
    spec = spec_from_dict(overrides, base).validate()
    if not spec.params:
        raise UserError("nothing to tune: give --param KEY (e.g. --param transform.dropout) or --spec studies/NAME.yaml")
    return spec


def _workers_option(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--workers {value!r}: give a whole number of processes (e.g. --workers 2) or auto") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False), help="A study spec YAML (see studies/).")
@click.option("--param", "params", multiple=True, metavar="KEY[=RANGE]",
              help="Tuned key, e.g. transform.dropout, train.lr=1e-4:1e-2:log, transform.kind=linear,attention.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Fix a config field for every trial.")
@click.option("--objective", "objectives", multiple=True, metavar="METRIC[:max|min]",
              help="Metric to optimise (repeat for multi-objective). Default val_cosine:max.")
@click.option("--trials", type=int, default=None, help="Finished trials to add in this run (default 10).")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds.")
@click.option("--workers", default=None, metavar="N|auto",
              help="Worker processes on this machine (default auto: one per core on CPU, as memory allows).")
@click.option("--sampler", type=click.Choice(SAMPLERS[1:]), default=None,
              help="Default: a seeded sweep for one parameter, TPE for several.")
@click.option("--pruner", type=click.Choice(PRUNERS[1:]), default=None, help="Default: median (single objective).")
@click.option("--seeds", type=int, default=None, help="Sweep repeats per value (default: as the budget allows).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="Base config (default test).")
@click.option("--name", default=None, help="Study name (default from the preset and parameters).")
@click.option("--storage", default=None, help="Optuna storage URL (default $CNN3D_STORAGE or sqlite:///studies/cnn3d.db).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or mlruns/).")
@click.option("--report/--no-report", default=None, help="Write the HTML report at the end (default on).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info")
@run_cli
def tune_cli(spec_path, params, assignments, objectives, trials, timeout, workers, sampler, pruner, seeds, preset,
             name, storage, tracking_uri, report, log_level) -> None:
    """Tune cnn3d configuration parameters with Optuna; every trial is an MLflow run."""
    from .run import ConfigurationTuner  # import first: mlflow sets up its own logger on import

    setup_logging(log_level)
    logging.captureWarnings(True)  # Python warnings as timestamped log lines (workers do the same)

    spec = _spec_from_cli(spec_path, name, preset, params, assignments, objectives, sampler, pruner, trials, timeout,
                          workers, seeds, storage, tracking_uri, report)
    tuner = ConfigurationTuner(storage=spec.storage, tracking_uri=spec.tracking_uri)
    try:
        summary = tuner.run_study(spec)
    except KeyboardInterrupt:
        fail(f"interrupted: study {spec.study_name()!r} keeps its finished trials; run the same command to resume", 130)
    click.echo(f"study {summary.study_name}: {summary.finished} complete, {summary.pruned} pruned, "
               f"{summary.failed} failed ({summary.seconds:.0f} s)")
    for best in summary.best[:3]:
        values = ", ".join(f"{v:.4f}" for v in best["values"])
        click.echo(f"best trial {best['number']}: {values}  {best['params']}")
    click.echo(f"storage: {summary.storage}")
    click.echo(f"MLflow: {summary.tracking_uri} (experiment {summary.experiment_id}); browse with "
               f"`mlflow ui --backend-store-uri {summary.tracking_uri}` then open "
               f"http://127.0.0.1:5000/#/experiments/{summary.experiment_id}/runs")
    if summary.report_path:
        click.echo(f"report: {summary.report_path}")
    if summary.failed_now and not summary.finished_now:
        fail(f"every trial of this run failed ({summary.failed_now}); most common reason: {summary.fail_reason}", 1)


def tune_main() -> None:
    """Entry point of ``cnn3d-tune``."""
    standalone(tune_cli)


def report_main() -> None:
    """Entry point of ``cnn3d-report``."""
    from .report_cli import report_cli

    standalone(report_cli)
