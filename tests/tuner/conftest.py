"""Shared fixtures for the distributed tuner tests.

The compose stack's topology, natively: PostgreSQL at 127.0.0.1:5432 (a fresh database per
test session, dropped afterwards), an ``mlflow server`` process on a free loopback port with
PostgreSQL as its backend store and served artifacts, and ``cnn3d-tune`` worker processes.
Every process started here runs in its own session and is terminated (its whole group) at teardown.

Environment knobs:
    CNN3D_TEST_PG          libpq conninfo of the admin connection (default ``host=127.0.0.1 port=5432 dbname=postgres``)
    CNN3D_TEST_CACHE_DIR   reuse this embedding cache folder instead of warming a fresh one per session
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PG_CONNINFO = os.environ.get("CNN3D_TEST_PG", "host=127.0.0.1 port=5432 dbname=postgres")
# tiny trials: a 4^3 lattice, 4 steps, one epoch over 120 sentences (a few seconds on 2 cores)
TINY_TRIAL = [
    "--set", "train.main_epochs=1", "--set", "data.max_sentences=120",
    "--set", "lattice.size=4", "--set", "lattice.steps=4",
]


def tool(name: str) -> str:
    """A console script of this venv (``cnn3d-tune``, ``mlflow``, ...), else the one on PATH."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment, offline for Hugging Face, without tracking/storage defaults leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNN3D_STORAGE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


# --------------------------------------------------------------------------- processes


@dataclass
class Spawned:
    """A process started by the tests, with its combined stdout/stderr in ``log``."""

    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Processes:
    """Starts processes in their own session and ends exactly those (their groups) at teardown."""

    log_dir: Path
    started: list[Spawned] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Spawned:
        log = self.log_dir / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        spawned = Spawned(name, proc, log)
        self.started.append(spawned)
        return spawned

    @staticmethod
    def kill(spawned: Spawned, sig: int = signal.SIGKILL) -> None:
        """Signal the process's group (it leads one: ``start_new_session``)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(spawned.proc.pid, sig)

    def stop(self, spawned: Spawned, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; also reaps leftovers of the group (server workers)."""
        if spawned.alive():
            self.kill(spawned, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spawned.proc.wait(timeout)
        self.kill(spawned, signal.SIGKILL)  # children of a server may outlive their parent
        with contextlib.suppress(subprocess.TimeoutExpired):
            spawned.proc.wait(5)

    def stop_all(self) -> None:
        for spawned in reversed(self.started):
            self.stop(spawned)


@pytest.fixture(scope="session")
def processes(tmp_path_factory) -> Processes:
    """The session's process registry; everything it started is terminated at the end."""
    registry = Processes(tmp_path_factory.mktemp("logs"))
    yield registry
    registry.stop_all()


def wait_http(url: str, spawned: Spawned | None = None, timeout: float = 120.0) -> str:
    """Poll ``url`` until it answers 200; fail early (with the log) if ``spawned`` dies."""
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if spawned is not None and not spawned.alive():
            pytest.fail(f"{spawned.name} exited with {spawned.proc.returncode}:\n{spawned.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    tail = spawned.tail() if spawned else ""
    pytest.fail(f"{url} did not answer within {timeout:.0f} s ({last})\n{tail}")


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """The server at ``PG_CONNINFO``; ``create`` makes a fresh database, all dropped at session end."""

    user: str
    host: str
    port: int
    created: list[str] = field(default_factory=list)

    def create(self, label: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (``postgresql+psycopg://``)."""
        import psycopg

        name = f"cnn3d_test_{label}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """PostgreSQL reachable at 127.0.0.1:5432, else the test is skipped with the reason."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    try:
        with psycopg.connect(PG_CONNINFO, autocommit=True, connect_timeout=3) as conn:
            info = conn.info
            server = Postgres(info.user, info.host if info.host.startswith(("127.", "localhost")) else "127.0.0.1",
                              info.port)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at {PG_CONNINFO!r}: {str(exc).strip().splitlines()[0]}")
    yield server
    server.drop_all()


def create_optuna_schema(url: str) -> None:
    """Create Optuna's tables once, as the first ``cnn3d-tune`` on a new database would."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    storage.engine.dispose()


@pytest.fixture(scope="session")
def optuna_db(postgres: Postgres) -> str:
    """A database for Optuna studies, schema created (each test uses its own study name).

    Workers racing to create the schema of a brand-new database are tested on their own
    (``test_workers_start_together_on_a_fresh_database``).
    """
    url = postgres.create("optuna")
    create_optuna_schema(url)
    return url


# --------------------------------------------------------------------------- MLflow server


@dataclass
class MlflowServer:
    url: str
    backend: str
    artifacts: Path
    process: Spawned


def start_mlflow_server(processes: Processes, backend: str, artifacts: Path, name: str = "mlflow",
                        extra: list[str] | None = None) -> MlflowServer:
    """``mlflow server`` on a free loopback port over ``backend``, serving artifacts from ``artifacts``."""
    port = free_port()
    cmd = [tool("mlflow"), "server", "--backend-store-uri", backend, "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           *(extra or [])]
    spawned = processes.spawn(name, cmd, cwd=artifacts.parent, env=child_env())
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", spawned, timeout=180)
    return MlflowServer(url, backend, artifacts, spawned)


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, processes: Processes, tmp_path_factory) -> MlflowServer:
    """A tracking server with PostgreSQL as backend store and a served artifact store, like the compose stack."""
    backend = postgres.create("mlflow")
    artifacts = tmp_path_factory.mktemp("mlflow-server") / "artifacts"
    artifacts.mkdir()
    server = start_mlflow_server(processes, backend, artifacts)
    yield server
    processes.stop(server.process, timeout=3.0)  # a throwaway server: no need for a long graceful shutdown


# --------------------------------------------------------------------------- tuner workers


@dataclass
class WarmCache:
    """An embedding cache being filled with the built-in corpus by a background ``cnn3d-cache warm``."""

    path: Path
    warming: Spawned | None

    def ready(self, timeout: float = 600.0) -> Path:
        """Wait for the warm-up (once); fail with its log if it did not succeed."""
        if self.warming is not None:
            code = self.warming.proc.wait(timeout)
            assert code == 0, f"warming the embedding cache failed ({code}):\n{self.warming.tail()}"
            self.warming = None
        return self.path


@pytest.fixture(scope="session")
def embedding_cache(processes: Processes, tmp_path_factory) -> WarmCache:
    """Starts filling an embedding cache (overlapping the MLflow server's start-up), so that workers
    never load the teacher and embed the corpus cold, all at once."""
    given = os.environ.get("CNN3D_TEST_CACHE_DIR")
    folder = Path(given) if given else tmp_path_factory.mktemp("embeddings")
    cmd = [tool("cnn3d-cache"), "warm", "--corpus", "builtin", "--cache-dir", str(folder), "--no-progress",
           "--log-level", "warning"]
    return WarmCache(folder, processes.spawn("cache-warm", cmd))


@pytest.fixture(scope="session")
def tune_command(embedding_cache: WarmCache):
    """``tune_command(name, storage, tracking_uri, trials, *extra)``: a tiny-trial ``cnn3d-tune`` command line.

    ``storage``/``tracking_uri`` None: the embedded defaults (``studies/cnn3d.db``, ``mlruns/mlflow.db``
    under the working directory). Request this fixture before ``mlflow_server`` so that the cache
    warms while the server starts.
    """

    def build(name: str, storage: str | None, tracking_uri: str | None, trials: int, *extra: str) -> list[str]:
        stores = (["--storage", storage] if storage else []) + (["--tracking-uri", tracking_uri] if tracking_uri else [])
        return [
            tool("cnn3d-tune"), "--name", name, *stores, "--trials", str(trials), *TINY_TRIAL,
            "--set", f"data.cache_dir={embedding_cache.ready()}", "--no-report", "--log-level", "warning",
            "--workers", "1", *extra,  # one process per command, like one machine's worker (extra may say more)
        ]

    return build


def unique_name(prefix: str) -> str:
    """A study name no other test (or earlier session) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
