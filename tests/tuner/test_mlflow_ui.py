"""The MLflow UI, in a real (headless) browser, over the store a short study wrote.

A two-trial study runs with the embedded defaults (SQLite study under ``studies/``, MLflow store
``mlruns/mlflow.db``), then the documented command serves it:

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port PORT

Headless Chromium renders the experiment's runs table (sorted by ``val_cosine``, which lists child
runs flat instead of folded under the study's parent run) and a trial's run page; the test checks
that the trial runs, a parameter and the objective's value are on the pages. A screenshot of the
runs table is kept in the test's folder and copied to ``/tmp/mlflow-ui-screenshot.png``.
"""

from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
from mlflow.tracking import MlflowClient

try:  # tests/tuner is a package when it has an __init__.py, plain folder otherwise
    from .conftest import child_env, free_port, tool, unique_name, wait_http
except ImportError:
    from conftest import child_env, free_port, tool, unique_name, wait_http

SCREENSHOT_COPY = Path("/tmp/mlflow-ui-screenshot.png")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1600,1000",
]


def chromium() -> str:
    """Debian's chromium (or another Chrome on PATH); skip when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless browser: apt-get install -y chromium")


def browse(url: str, *action: str, timeout: float = 120.0) -> str:
    """Run headless Chromium on ``url`` with a fresh profile (``--dump-dom`` or ``--screenshot=PATH``)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, url],
                              capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"chromium failed on {url}:\n{done.stderr[-2000:]}"
    return done.stdout


def page_text(dom: str) -> str:
    """The visible text of a rendered DOM, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def numbers_after(label: str, text: str) -> list[float]:
    """Numbers printed right after ``label`` (a metric or parameter name) on a page."""
    return [float(m) for m in re.findall(rf"(?<![\w.]){re.escape(label)}\s+(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", text)]


@pytest.fixture(scope="module")
def ui_study(tune_command, processes, tmp_path_factory):
    """A two-trial study in the embedded default stores, served by ``mlflow ui`` (the documented command)."""
    root = tmp_path_factory.mktemp("embedded")
    name = unique_name("ui")
    done = subprocess.run(tune_command(name, None, None, 2, "--param", "transform.dropout"), cwd=root,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"cnn3d-tune failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert (root / "mlruns" / "mlflow.db").is_file() and (root / "studies" / "cnn3d.db").is_file()
    port = free_port()
    server = processes.spawn("mlflow-ui", [tool("mlflow"), "ui", "--backend-store-uri", "sqlite:///mlruns/mlflow.db",
                                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=root)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health", server, timeout=180)
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"cnn3d/{name}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'studies' / 'cnn3d.db'}")
    yield {"base": base, "root": root, "name": name, "experiment_id": experiment.experiment_id,
           "client": client, "study": study}
    processes.stop(server, timeout=3.0)


def test_runs_table_lists_the_trial_runs(ui_study, tmp_path):
    """The experiment's runs page shows every trial run by name (and the study's parent run)."""
    order = quote("metrics.`val_cosine`")
    url = f"{ui_study['base']}/#/experiments/{ui_study['experiment_id']}/runs?orderByKey={order}&orderByAsc=false"
    text = page_text(browse(url, "--dump-dom"))
    trials = ui_study["study"].trials
    assert len(trials) == 2
    missing = [f"trial-{t.number}" for t in trials if f"trial-{t.number}" not in text]
    assert not missing, f"runs table lacks {missing}: {text[:1500]}"
    assert ui_study["name"] in text, "the study's parent run is listed too"
    assert "val_cosine" in text, "the table is sorted by the objective"

    shot = tmp_path / "mlflow-ui-runs.png"
    browse(url, f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000, "screenshot missing or blank"
    shutil.copyfile(shot, SCREENSHOT_COPY)


def test_run_page_shows_params_and_metrics(ui_study):
    """The best trial's run page lists its parameters and the objective's value."""
    best = ui_study["study"].best_trial
    run_id = best.user_attrs["mlflow_run_id"]
    url = f"{ui_study['base']}/#/experiments/{ui_study['experiment_id']}/runs/{run_id}"
    text = page_text(browse(url, "--dump-dom"))
    assert f"trial-{best.number}" in text
    shown = numbers_after("val_cosine", text)
    assert any(math.isclose(v, best.value, rel_tol=1e-6, abs_tol=1e-9) for v in shown), \
        f"val_cosine={best.value} not on the page (found {shown})"
    dropout = numbers_after("transform.dropout", text)
    assert any(math.isclose(v, best.params["transform.dropout"], abs_tol=1e-9) for v in dropout), dropout
    assert "Finished" in text and ui_study["name"] in text  # status and parent run
