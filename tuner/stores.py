"""Checks and locks for the two stores a study uses: the Optuna storage and the MLflow tracking store.

Everything here runs before any worker starts, so that a setup mistake is one ``UserError`` line
(unknown scheme, unreachable server, read-only path, one database used for both stores) instead of a
traceback or a hang, and so that processes opening a fresh store together create it exactly once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cnn3d.errors import UserError

logger = logging.getLogger(__name__)

# URI schemes MLflow 3 can track to (database URLs may name a driver: postgresql+psycopg://)
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
PROBE_TIMEOUT = 5.0  # seconds a tracking server gets to answer /health


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: safe to print, log and store."""
    if not url or "://" not in url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc=netloc))


def scheme_of(uri: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql``; ``''`` for a bare path."""
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL, else None."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def check_sqlite_writable(url: str, what: str, flag: str) -> None:
    """Create the folder and open the database for writing; a read-only place is one ``UserError``."""
    path = sqlite_path(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=60, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or folder
            conn.execute("ROLLBACK")
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"cannot write {what} {path} ({_first_line(exc)}); pass {flag} with a writable path") from None


def check_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Known scheme, a server that answers ``/health`` within ``timeout``, a writable SQLite file."""
    scheme = scheme_of(uri)
    if scheme not in TRACKING_SCHEMES:
        raise UserError(
            f"tracking URI {redact(uri)!r} has an unknown scheme {scheme or uri!r}; use sqlite:///PATH/mlflow.db, "
            "postgresql://USER@HOST/DB or http://HOST:PORT"
        )
    if scheme in ("http", "https"):
        probe_server(uri, timeout)
    elif scheme == "sqlite":
        check_sqlite_writable(uri, "the MLflow store", "--tracking-uri")


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """GET ``URI/health`` once: MLflow's own client would retry an absent server for many minutes."""
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = _first_line(getattr(exc, "reason", exc))
    raise UserError(
        f"MLflow tracking server {redact(uri)} does not answer ({reason}); start it "
        "(mlflow server --host 127.0.0.1 --port PORT) or pass another --tracking-uri"
    )


def check_separate_stores(storage_url: str, tracking_uri: str) -> None:
    """Optuna and MLflow each keep an ``alembic_version`` table: one database cannot hold both."""
    a, b = _database_identity(storage_url), _database_identity(tracking_uri)
    if a is not None and a == b:
        raise UserError(
            f"--storage and --tracking-uri name the same database ({redact(tracking_uri)}); Optuna and MLflow "
            "each need their own (e.g. .../optuna and .../mlflow)"
        )


def _database_identity(url: str) -> tuple | None:
    """(engine, host, port, database) of a database URL, ignoring driver and credentials; None for others."""
    scheme = scheme_of(url)
    if scheme == "sqlite":
        path = sqlite_path(url)
        return ("sqlite", str(path.resolve())) if path else None
    if scheme not in ("postgresql", "mysql", "mssql"):
        return None
    parts = urlsplit(url)
    return scheme, (parts.hostname or "localhost").lower(), parts.port, parts.path.strip("/")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold a lock shared by every process opening ``uri`` on this machine (SQLite: beside the file;
    PostgreSQL: an advisory lock, which also serialises processes on other machines)."""
    path = sqlite_path(uri)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(f"{path}.lock", "a+")  # noqa: SIM115 - closed below
        except OSError:  # a read-only place: nothing to create there, and check_sqlite_writable says so
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if scheme_of(uri) == "postgresql":
        with _pg_advisory_lock(uri):
            yield
        return
    yield


@contextlib.contextmanager
def _pg_advisory_lock(uri: str) -> Iterator[None]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha1(f"cnn3d-store:{redact(uri)}".encode()).digest()[:8], "big", signed=True)
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        conn = engine.connect()
    except Exception as exc:  # noqa: BLE001 - no lock then; the caller's retries still cover the race
        logger.debug("no advisory lock on %s: %s", redact(uri), exc)
        yield
        return
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        yield
    finally:
        with contextlib.suppress(Exception):
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.close()
        engine.dispose()


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
