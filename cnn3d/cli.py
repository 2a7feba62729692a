"""Command-line entry points (click). ``cnn3d-cache`` lives here; ``train``/``decode`` join later.

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

from .config import Config, DataConfig, load_config, parse_assignments, with_overrides
from .errors import UserError

__all__ = [
    "CliGroup",
    "build_config",
    "cache_main",
    "config_options",
    "load_texts",
    "resolve_device",
    "run_cli",
    "setup_logging",
]

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")
# Libraries that log a lot at INFO; a CLI's --log-level info is about our own progress.
_CHATTY = ("transformers", "huggingface_hub", "urllib3", "filelock", "httpx", "httpcore")

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


class CliGroup(click.Group):
    """A click group whose usage errors, like ``UserError``, print one ``error: ...`` line and exit 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            fail(f"{exc.format_message()} (see --help)", exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except UserError as exc:
            fail(str(exc), exc.exit_code)
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


def build_config(config_path: str | None, assignments: Iterable[str], extra: dict[str, Any] | None = None) -> Config:
    """Config from an optional file, then ``--set`` assignments, then ``extra`` dotted overrides (CLI options)."""
    config = load_config(config_path) if config_path else Config()
    config = with_overrides(config, parse_assignments(assignments))
    return with_overrides(config, extra or {})


def resolve_device(name: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device that is not available is a ``UserError``."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available here; use train.device=auto or cpu")
    if name == "mps" and not mps_ok:
        raise UserError("train.device=mps but MPS is not available here; use train.device=auto or cpu")
    return name


def load_texts(data: DataConfig) -> list[str]:
    """Sentences of ``data.corpus``: via ``cnn3d.data.load_corpus`` when present, else builtin or a .txt file."""
    loader = _corpus_loader()
    if loader is not None:
        return _as_texts(loader(data), data.corpus)
    return _read_corpus_fallback(data)


def _corpus_loader() -> Callable[[DataConfig], Any] | None:
    try:
        from . import data as data_module
    except ModuleNotFoundError as exc:
        if exc.name in ("cnn3d.data", f"{__package__}.data"):
            return None
        raise
    return getattr(data_module, "load_corpus", None)


def _as_texts(corpus: Any, name: str) -> list[str]:
    """Accept what a corpus loader may return: a list of strings, an object with texts, or train/val splits."""
    if isinstance(corpus, str):
        raise UserError(f"corpus {name!r} loaded as one string, expected sentences")
    for attr in ("texts", "sentences"):
        if hasattr(corpus, attr):
            value = getattr(corpus, attr)
            return _as_texts(value() if callable(value) else value, name)
    if hasattr(corpus, "train"):
        parts = [getattr(corpus, a) for a in ("train", "validation", "val", "test") if hasattr(corpus, a)]
        return [t for part in parts for t in _as_texts(part, name)]
    try:
        texts = list(corpus)
    except TypeError:
        raise UserError(f"corpus {name!r}: cannot read sentences from a {type(corpus).__name__}") from None
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"corpus {name!r}: expected sentences (strings)")
    return texts


def _read_corpus_fallback(data: DataConfig) -> list[str]:
    from importlib import resources
    from pathlib import Path

    if data.corpus == "builtin":
        resource = resources.files("cnn3d").joinpath("corpus/builtin.txt")
        if not resource.is_file():
            raise UserError("data.corpus=builtin but this install has no cnn3d/corpus/builtin.txt; give a .txt file")
        text = resource.read_text(encoding="utf-8")
    else:
        path = Path(data.corpus).expanduser()
        if path.suffix != ".txt" or not path.is_file():
            raise UserError(f"data.corpus={data.corpus!r}: give 'builtin' or an existing .txt file (one sentence a line)")
        text = path.read_text(encoding="utf-8")
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    return texts[: data.max_sentences] if data.max_sentences else texts


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
