"""Command-line entry points (click): ``cnn3d-train``, ``cnn3d-decode`` and ``cnn3d-cache``.

Shared pieces for every command: ``CliGroup`` (usage errors as one line, exit 2), ``run_cli`` (a ``UserError``
becomes ``error: <message>`` on stderr and exit 2, never a traceback), ``setup_logging`` and ``config_options``
(``--config``, ``--set key=value``, ``--log-level``) with ``build_config`` to turn them into a ``Config``.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click

from .config import PRESETS, Config, DataConfig, load_config, parse_assignments, preset, with_overrides
from .device import resolve_device
from .errors import UserError

__all__ = [
    "CliGroup",
    "build_config",
    "cache_main",
    "config_options",
    "load_texts",
    "run_cli",
    "setup_logging",
]

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")
# Libraries that log a lot at INFO; a CLI's --log-level info is about our own progress.
_CHATTY = ("transformers", "huggingface_hub", "urllib3", "filelock", "httpx", "httpcore", "mlflow", "alembic", "optuna")

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- shared helpers


def setup_logging(level: str = "info") -> None:
    """Send log records to stderr, one line each, at ``level``; chatty libraries stay at WARNING or above."""
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise UserError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging.basicConfig(
        level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        stream=sys.stderr, force=True,
    )
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def fail(message: str, exit_code: int = 2) -> NoReturn:
    """Print ``error: <first line of message>`` on stderr and exit with ``exit_code``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    click.echo(f"error: {lines[0] if lines else 'failed'}", err=True)
    sys.exit(exit_code)


def run_cli(fn: F) -> F:
    """Decorate a command function so a ``UserError`` ends it with ``error: <message>`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


ABORT_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C, the shell's code for an interrupted command


def _main_one_line(call: Callable[[], Any]) -> Any:
    """Run a click ``main(standalone_mode=False)`` call; every error a user can cause ends as one line.

    Usage errors and ``UserError`` exit 2 (or the error's own code), Ctrl-C (click's ``Abort``) exits 130,
    the shell's code for an interrupted command. ``CliGroup`` and ``standalone`` (every cnn3d and tuner
    command) share this, so the same fault gives the same exit code everywhere.
    """
    try:
        return call()
    except click.UsageError as exc:
        fail(f"{exc.format_message()} (see --help)", exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("interrupted", ABORT_EXIT_CODE)
    except UserError as exc:
        fail(str(exc), exc.exit_code)


class CliGroup(click.Group):
    """A click group whose usage errors, like ``UserError``, print one ``error: ...`` line and exit 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        rv = _main_one_line(lambda: super(CliGroup, self).main(args, prog_name, complete_var, standalone_mode=False,
                                                              **extra))
        # Without standalone mode click returns the exit code of ctx.exit()/--help; commands return None.
        sys.exit(rv if isinstance(rv, int) else 0)


def config_options(fn: F) -> F:
    """``--config PATH``, ``--set key=value`` (repeatable) and ``--log-level`` for a command."""
    fn = click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info",
                      show_default=True, help="Logging verbosity (stderr).")(fn)
    fn = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                      help="Override a config field, e.g. --set teacher.pooling=cls (repeatable).")(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                      help="JSON/YAML config file (defaults apply otherwise).")(fn)
    return fn


def build_config(
    config_path: str | None, assignments: Iterable[str], extra: dict[str, Any] | None = None, preset_name: str | None = None
) -> Config:
    """Config from a preset or file, then ``--set`` assignments, then ``extra`` dotted overrides (CLI options)."""
    base = preset(preset_name) if preset_name else Config()
    config = load_config(config_path, base) if config_path else base
    config = with_overrides(config, parse_assignments(assignments))
    return with_overrides(config, extra or {})


def load_texts(data: DataConfig) -> list[str]:
    """All sentences (train and validation) of ``data.corpus``."""
    from .data import load_corpus

    return load_corpus(data).sentences


# --------------------------------------------------------------------------- cnn3d-cache


def _cache_option(fn: F) -> F:
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                        help="Cache folder (default: data.cache_dir).")(fn)


def _cache_config(config_path: str | None, assignments: Iterable[str], cache_dir: str | None,
                  log_level: str, **extra: Any) -> Config:
    setup_logging(log_level)
    if cache_dir:
        extra["data.cache_dir"] = cache_dir
    return build_config(config_path, assignments, extra)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cache_main() -> None:
    """Inspect, fill and empty the on-disk cache of teacher embeddings."""


@cache_main.command("stats")
@_cache_option
@config_options
@run_cli
def cache_stats(config_path: str | None, assignments: tuple[str, ...], cache_dir: str | None, log_level: str) -> None:
    """Namespaces (teacher, pooling, ...), vectors and bytes held by the cache."""
    from .cache import EmbeddingCache

    cfg = _cache_config(config_path, assignments, cache_dir, log_level)
    cache = EmbeddingCache(cfg.data.cache_dir, cfg.data.max_cache_size_gb, cfg.data.cache_dtype)
    infos = cache.namespaces()
    total = sum(i.bytes for i in infos)
    cap = f"{cfg.data.max_cache_size_gb:g} GB" if cfg.data.max_cache_size_gb > 0 else "none"
    click.echo(f"cache {cache.cache_dir}: {len(infos)} namespaces, {sum(i.vectors for i in infos)} vectors, "
               f"{_human(total)} on disk (cap {cap})")
    for i in infos:
        spec = i.spec
        used = datetime.fromtimestamp(i.last_used).strftime("%Y-%m-%d %H:%M") if i.last_used else "never"
        click.echo(
            f"  {i.name}  {spec.get('identity', '?')}  pooling={spec.get('pooling', '?')} "
            f"normalize={spec.get('normalize', '?')} max_length={spec.get('max_length', '?')}  "
            f"dim={i.dim} {i.dtype}  {i.shards} shards, {i.vectors} vectors, {_human(i.bytes)}, last used {used}"
        )


@cache_main.command("warm")
@click.option("--corpus", default=None, help="'builtin', a .txt file (one sentence a line), or what cnn3d.data reads.")
@click.option("--device", default=None, help="Device for the teacher (default: train.device; auto picks cuda/mps/cpu).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar while embedding.")
@_cache_option
@config_options
@run_cli
def cache_warm(corpus: str | None, device: str | None, progress: bool, config_path: str | None,
               assignments: tuple[str, ...], cache_dir: str | None, log_level: str) -> None:
    """Embed a corpus with the configured teacher so later runs find it in the cache."""
    from .cache import EmbeddingCache, embed_with_cache
    from .teacher import load_teacher

    extra = {"data.corpus": corpus} if corpus else {}
    cfg = _cache_config(config_path, assignments, cache_dir, log_level, **extra)
    texts = load_texts(cfg.data)
    if not texts:
        raise UserError(f"data.corpus={cfg.data.corpus!r} holds no sentences")
    teacher = load_teacher(cfg.teacher, resolve_device(device or cfg.train.device))
    cache = EmbeddingCache(cfg.data.cache_dir, cfg.data.max_cache_size_gb, cfg.data.cache_dtype)
    start = time.perf_counter()
    embed_with_cache(teacher, texts, cache, progress=progress)
    s = cache.stats
    click.echo(f"warmed {len(texts)} sentences with {teacher.identity}: {s.hits} already cached, "
               f"{s.computed} computed in {time.perf_counter() - start:.1f} s; cache {cache.cache_dir} "
               f"holds {_human(cache.disk_usage())}")


@cache_main.command("clear")
@_cache_option
@config_options
@run_cli
def cache_clear(config_path: str | None, assignments: tuple[str, ...], cache_dir: str | None, log_level: str) -> None:
    """Delete every cached embedding under the cache folder (not while training runs use it)."""
    from .cache import EmbeddingCache

    cfg = _cache_config(config_path, assignments, cache_dir, log_level)
    cache = EmbeddingCache(cfg.data.cache_dir, cfg.data.max_cache_size_gb, cfg.data.cache_dtype)
    freed = cache.clear()
    click.echo(f"cleared {_human(freed)} from {cache.cache_dir}")


# --------------------------------------------------------------------------- cnn3d-train


def _write_metrics_json(path: str, metrics: dict[str, Any], config: Config, examples: list[dict]) -> None:
    from .checkpoint import write_json_file
    from .config import flatten

    payload = {**metrics, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(config).items()},
               "examples": examples}
    write_json_file(path, payload)  # strict JSON (non-finite metrics become null), written through a rename


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="test", show_default=True,
              help="Starting configuration: test (8^3), wide (16x16 face) or full (37^3).")
@click.option("--corpus", default=None, help="Shorthand for --set data.corpus=... ('builtin', a file, a folder).")
@click.option("--then-corpus", "then_corpus", multiple=True, metavar="CORPUS",
              help="Train on this corpus after --corpus (repeatable): sets data.domains for continual learning.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Checkpoint folder (weights, config.json, meta.json), written after every epoch.")
@click.option("--resume", "resume_from", default=None, type=click.Path(file_okay=False),
              help="Continue from a checkpoint folder written by --out.")
@click.option("--init-from", "init_from", default=None, type=click.Path(file_okay=False),
              help="Start from a trained checkpoint of any lattice size (shorthand for --set train.init_from=...).")
@click.option("--metrics-json", default=None, type=click.Path(dir_okay=False),
              help="Write the final epoch's metrics and the flattened config to this JSON file.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="Track this run: an MLflow URI (sqlite:///PATH, postgresql://..., http://HOST:PORT; needs the "
                   "tuner package) or json:PATH (default $MLFLOW_TRACKING_URI, else off).")
@click.option("--list-keys", is_flag=True, help="List every config key with its default and range, then exit.")
@config_options
@run_cli
def train_cli(preset_name, corpus, then_corpus, out_dir, resume_from, init_from, metrics_json, progress,
              tracking_uri, list_keys, config_path, assignments, log_level) -> None:
    """Train the lattice student against the teacher and report quality beside in-run baselines."""
    if list_keys:
        _print_keys()
        return
    setup_logging(log_level)
    from .train import NonFiniteLoss, train

    extra = {"data.corpus": corpus} if corpus else {}
    if init_from:
        extra["train.init_from"] = init_from
    config = build_config(config_path, assignments, extra, preset_name)
    if then_corpus:
        config = _with_then_corpus(config, then_corpus)
    if metrics_json:  # fail now, not after the training time is spent (train() checks --out and --resume)
        from .checkpoint import check_output_file

        check_output_file(metrics_json, "--metrics-json")
    tracker = _open_tracking(tracking_uri, config, preset_name)
    try:
        result = train(config, out_dir=out_dir, resume_from=resume_from, progress=progress,
                       callbacks=[lambda report: tracker.log_metrics(report.metrics, report.epoch)])
    except NonFiniteLoss as exc:
        tracker.finish("FAILED")
        fail(str(exc), 1)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    _finish_tracking(tracker, result)
    m = result.metrics
    if "avg_final_cosine" in m:
        click.echo(_continual_line(m))
    click.echo(
        f"val_cosine {m['val_cosine']:.4f} (baselines: pca {m['baseline_pca_cosine']:.4f}, mean "
        f"{m['baseline_mean_cosine']:.4f}; {m['val_cosine'] / m['baseline_pca_cosine']:.1%} of pca) | "
        f"val_mse {m['val_mse']:.5f} | decode top1 {m['decode_top1']:.3f} top5 {m['decode_top5']:.3f} | "
        f"{m['throughput_samples_per_s']:.0f} samples/s | {result.seconds:.0f} s"
    )
    for name in (k.split("/", 1)[1] for k in m if k.startswith("val_cosine_fraction/")):  # teacher.extra runs
        click.echo(f"teacher {name}: val_cosine {m['val_cosine/' + name]:.4f} = {m['val_cosine_fraction/' + name]:.1%} "
                   f"of its pca {m['baseline_pca_cosine/' + name]:.4f} (mean {m['baseline_mean_cosine/' + name]:.4f}) | "
                   f"decode top1 {m['decode_top1/' + name]:.3f}")
    if "val_cosine_fraction" in m:
        click.echo(f"val_cosine_fraction {m['val_cosine_fraction']:.4f} (mean over teachers of val_cosine / pca)")
    if metrics_json:
        _write_metrics_json(metrics_json, m, config, result.examples)
    if out_dir:
        click.echo(f"checkpoint: {out_dir}")


def _with_then_corpus(config: Config, then_corpus: Sequence[str]) -> Config:
    """``data.domains`` = (``data.corpus``, *``--then-corpus``); an empty entry is a user error."""
    if any(not c.strip() or "," in c for c in then_corpus):
        bad = next(c for c in then_corpus if not c.strip() or "," in c)
        raise UserError(f"--then-corpus {bad!r} is not a corpus; give a file, folder, builtin:NAME or hf:NAME "
                        "(one per --then-corpus, no commas)")
    return with_overrides(config, {"data.domains": (config.data.corpus, *then_corpus)})


def _continual_line(m: dict[str, Any]) -> str:
    """One line of the continual figures: the final row of the matrix beside each domain's PCA ceiling."""
    final = [k for k in m if k.startswith("cl_matrix/")]
    stages = {k.split("/")[1] for k in final}
    last_stage = "joint" if "joint" in stages else str(max(int(s) for s in stages))
    cells = [f"{k.split('/')[2]} {m[k]:.4f} (pca {m.get('cl_pca/' + k.split('/')[2], float('nan')):.4f})"
             for k in final if k.split("/")[1] == last_stage]
    return (f"continual: avg_final_cosine {m['avg_final_cosine']:.4f}, forgetting {m['forgetting']:.4f}, "
            f"new_domain_cosine {m['new_domain_cosine']:.4f} | final: {', '.join(cells)}")


def _open_tracking(uri: str | None, config: Config, preset_name: str):
    """The run's metric logger (``cnn3d.tracking``), its params logged; a no-op one when ``uri`` is empty."""
    from .config import flatten
    from .tracking import open_logger

    tracker = open_logger(uri, run_name=f"train-{preset_name}", tags={"cnn3d.role": "train"})
    tracker.log_params(flatten(config))
    return tracker


def _finish_tracking(tracker, result) -> None:
    import json

    from .config import flatten

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(result.config).items()}
    tracker.log_text(json.dumps(config, indent=2), "config.json")
    if result.examples:
        tracker.log_text(json.dumps(result.examples, indent=2, default=str), "decoded_examples.json")
    tracker.finish("FINISHED")


def _print_keys() -> None:
    from .config import field_specs

    for key, spec in field_specs().items():
        allowed = (
            "|".join(map(str, spec.choices)) if spec.choices
            else f"[{spec.low}, {spec.high}]{' log' if spec.log else ''}" if spec.low is not None else spec.kind
        )
        click.echo(f"{key:36} {spec.default!s:24} {allowed:28} {spec.doc}")


def train_main() -> None:
    """Entry point of ``cnn3d-train``."""
    standalone(train_cli)


# --------------------------------------------------------------------------- cnn3d-decode


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(file_okay=False),
              help="A folder written by cnn3d-train --out.")
@click.option("--bank", default=None, type=click.Path(dir_okay=False),
              help="Extra phrases (one per line) for the decoder's bank, beside validation and built-in sentences.")
@click.option("--top", default=3, show_default=True, type=click.IntRange(1, 20), help="Candidates shown per text.")
@click.option("--teacher", "teacher_name", default=None,
              help="Several-teacher checkpoints: decode with this teacher only (default: each teacher in turn).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="warning")
@click.argument("texts", nargs=-1, required=True)
@run_cli
def decode_cli(checkpoint_dir, bank, top, teacher_name, log_level, texts) -> None:
    """Print what the trained student's output for each TEXT decodes to (nearest bank phrases by cosine)."""
    setup_logging(log_level)
    from .checkpoint import read_checkpoint_meta
    from .decode import decode_with_checkpoint

    if "teachers" in read_checkpoint_meta(checkpoint_dir)[1]:  # one cube, several teachers (teacher.extra)
        from .multiteacher import decode_checkpoint

        for name, results in decode_checkpoint(checkpoint_dir, list(texts), bank, top, teacher_name).items():
            click.echo(f"teacher {name}:")
            for result in results:
                click.echo(f"  {result.text}  (student vs teacher cosine {result.fidelity:.3f})")
                for phrase, score in result.candidates:
                    click.echo(f"    {score:.3f}  {phrase}")
        return
    if teacher_name is not None:
        raise UserError(f"--teacher {teacher_name}: {checkpoint_dir} was trained with one teacher; drop --teacher")
    for result in decode_with_checkpoint(checkpoint_dir, list(texts), bank, top):
        click.echo(f"{result.text}  (student vs teacher cosine {result.fidelity:.3f})")
        for phrase, score in result.candidates:
            click.echo(f"  {score:.3f}  {phrase}")


def decode_main() -> None:
    """Entry point of ``cnn3d-decode``."""
    standalone(decode_cli)


def standalone(command: click.Command) -> None:
    """Run a click command with usage errors reported as one line and exit code 2 (Ctrl-C: 130)."""
    _main_one_line(lambda: command.main(standalone_mode=False))
