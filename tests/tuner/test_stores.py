"""Setup mistakes and faults of the two stores, caused for real: a dead tracking server, unknown schemes,
one database for both stores, read-only paths, and processes opening a fresh MLflow store together."""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cnn3d.errors import UserError
from tuner.run import ConfigurationTuner
from tuner.spec import StudySpec
from tuner.stores import redact

try:  # tests/tuner is a package when it has an __init__.py, plain folder otherwise
    from .conftest import child_env, tool
except ImportError:
    from conftest import child_env, tool

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write to: chmod for ordinary users, a read-only tmpfs for root (root ignores modes)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _setup_error(tmp_path, storage: str, tracking_uri: str) -> str:
    spec = StudySpec(name="setup", params=["transform.dropout"], trials=1, report=False)
    with pytest.raises(UserError) as caught:
        ConfigurationTuner(storage=storage, tracking_uri=tracking_uri).run_study(spec)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_tracking_scheme_is_one_line(tmp_path):
    message = _setup_error(tmp_path, f"sqlite:///{tmp_path}/s.db", "foo://bar")
    assert "unknown scheme 'foo'" in message and "http://HOST:PORT" in message


@pytest.mark.parametrize("same", ["postgresql", "sqlite"])
def test_one_database_for_both_stores_is_refused(tmp_path, same):
    url = POSTGRES if same == "postgresql" else f"sqlite:///{tmp_path}/both.db"
    other = POSTGRES.replace("postgresql+psycopg", "postgresql") if same == "postgresql" else url
    message = _setup_error(tmp_path, url, other)
    assert "same database" in message


def test_read_only_storage_and_tracking_paths_are_one_line(tmp_path, read_only_dir):
    message = _setup_error(tmp_path, f"sqlite:///{read_only_dir}/s.db", f"sqlite:///{tmp_path}/m.db")
    assert message.startswith("cannot write the study storage") and "--storage" in message
    message = _setup_error(tmp_path, f"sqlite:///{tmp_path}/s.db", f"sqlite:///{read_only_dir}/mlruns/m.db")
    assert message.startswith("cannot write the MLflow store") and "--tracking-uri" in message


@pytest.mark.slow
def test_unreachable_tracking_server_is_one_line_within_30_seconds(tmp_path):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run([tool("cnn3d-tune"), "--param", "transform.dropout", "--trials", "1",
                           "--storage", f"sqlite:///{tmp_path}/s.db", "--tracking-uri", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, env=child_env(), timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not answer" in lines[0] and str(port) in lines[0], proc.stderr[-2000:]
    assert elapsed < 30, f"took {elapsed:.0f} s"


@pytest.mark.slow
def test_report_to_a_read_only_place_is_one_line(tmp_path, read_only_dir):
    import optuna

    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="ro", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    proc = subprocess.run([tool("cnn3d-report"), "ro", "--storage", storage, "--out", f"{read_only_dir}/r.html"],
                          capture_output=True, text=True, env=child_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " WARNING " not in line]
    assert len(lines) == 1 and "cannot write the report" in lines[0] and "--out" in lines[0], proc.stderr[-2000:]


OPENER = textwrap.dedent("""
    import os, sys, time
    from tuner.tracking import StudyTracker

    folder, uris = sys.argv[1], sys.argv[2:]
    for r, uri in enumerate(uris):
        open(os.path.join(folder, f"ready-{r}-{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(folder, f"go-{r}")):  # both open the fresh store at once
            time.sleep(0.002)
        StudyTracker(uri, "together").parent_run_id()
""")


@pytest.mark.slow
def test_processes_opening_a_fresh_mlflow_store_together_create_it_once(tmp_path, postgres):
    uris = [f"sqlite:///{tmp_path}/a/mlflow.db", f"sqlite:///{tmp_path}/b/mlflow.db", postgres.create("mlrace")]
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(tmp_path), *uris], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        for r in range(len(uris)):
            deadline = time.time() + 120
            while len(list(tmp_path.glob(f"ready-{r}-*"))) < 2:
                assert time.time() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
                time.sleep(0.01)
            (tmp_path / f"go-{r}").touch()
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    from mlflow.tracking import MlflowClient

    for uri in uris:  # one experiment and one parent run per store, whoever created them
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("cnn3d/together")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cnn3d.role` = 'study'")
        assert len(runs) == 1


def test_redact_hides_only_the_password():
    assert redact("postgresql+psycopg://user:s3cretPW@db:5432/optuna") == "postgresql+psycopg://user:***@db:5432/optuna"
    assert redact("http://alice:pw@host:5000") == "http://alice:***@host:5000"
    assert redact("postgresql://user@db/optuna") == "postgresql://user@db/optuna"
    assert redact(f"sqlite:///{Path('/tmp/x.db')}") == "sqlite:////tmp/x.db"
