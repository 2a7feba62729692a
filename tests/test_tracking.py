"""cnn3d.tracking: the metric-logger interface, its JSON-file logger, plugins by entry point, and
``cnn3d-train --tracking-uri`` tracking one run in a real MLflow store."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cnn3d.errors import UserError
from cnn3d.tracking import JsonFileLogger, NullLogger, installed_schemes, open_logger

TRAIN = str(Path(sys.executable).parent / "cnn3d-train")
TINY = ["--set", "lattice.size=4", "--set", "lattice.steps=4", "--set", "data.max_sentences=120",
        "--set", "train.main_epochs=2", "--no-progress", "--log-level", "warning"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def test_no_uri_is_the_null_logger():
    assert isinstance(open_logger(None, "run"), NullLogger)
    assert isinstance(open_logger("", "run"), NullLogger)


def test_json_logger_writes_one_valid_json_file_at_the_end(tmp_path):
    path = tmp_path / "out" / "run.json"
    log = open_logger(f"json:{path}", "run-a", {"who": "test"})
    assert isinstance(log, JsonFileLogger)
    log.log_params({"lattice.size": 4, "moe.experts": ("local", "distant")})
    log.log_metrics({"val_cosine": 0.5, "train_loss": float("nan")}, step=1)
    log.log_metrics({"val_cosine": 0.6}, step=2)
    log.log_text("[]", "decoded_examples.json")
    assert not path.exists()  # nothing half-written while the run goes on
    log.finish("FINISHED")
    record = json.loads(path.read_text())  # strict JSON: a NaN metric was left out, not written as NaN
    assert record["status"] == "FINISHED" and record["run_name"] == "run-a" and record["tags"] == {"who": "test"}
    assert record["params"]["moe.experts"] == ["local", "distant"]
    assert record["metrics"] == [{"step": 1, "val_cosine": 0.5}, {"step": 2, "val_cosine": 0.6}]
    assert record["artifacts"] == {"decoded_examples.json": "[]"}
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_a_scheme_without_a_plugin_is_one_line_naming_the_installed_ones():
    with pytest.raises(UserError) as caught:
        open_logger("foo://user:pw@bar", "run")
    message = str(caught.value)
    assert "'foo'" in message and "json" in message and "sqlite" in message and "pw" not in message


def test_mlflow_is_a_plugin_of_the_tuner_package():
    plugins = installed_schemes()
    assert {"sqlite", "postgresql", "http", "https"} <= set(plugins)
    assert plugins["sqlite"].value == "tuner.tracking:mlflow_logger"


def test_the_library_cli_imports_neither_mlflow_nor_the_tuner():
    code = "import sys, cnn3d.cli, cnn3d.tracking; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tuner', 'optuna')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_cnn3d_train_tracks_one_run_in_mlflow(tmp_path, warm_cache):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = subprocess.run([TRAIN, *TINY, "--set", f"data.cache_dir={warm_cache}"], capture_output=True, text=True,
                          env=_env(MLFLOW_TRACKING_URI=uri), timeout=600, cwd=tmp_path)  # the URI from the environment
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnn3d-train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lattice.size"] == "4"
    history = client.get_metric_history(run.info.run_id, "val_cosine")
    assert sorted(m.step for m in history) == [1, 2]  # one point per epoch
    # the last epoch's value is the one the command printed
    assert f"val_cosine {max(history, key=lambda m: m.step).value:.4f}" in proc.stdout
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run.info.run_id, "", tmp))
        assert {"config.json", "decoded_examples.json"} <= {p.name for p in folder.iterdir()}
        assert json.loads((folder / "config.json").read_text())["lattice.size"] == 4


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "no metric logger for tracking URI 'foo://bar'"),
    ("http://127.0.0.1:9", "does not answer"),
])
def test_cnn3d_train_with_an_unusable_tracking_uri_is_one_line_before_training(tmp_path, uri, message):
    proc = subprocess.run([TRAIN, *TINY, "--tracking-uri", uri], capture_output=True, text=True, env=_env(),
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
