"""Issue 12 through the tuner: EWC and replay tuned against avg_final_cosine and forgetting, report heatmap."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tuner.report import render_report
from tuner.report_data import build_report_data

TUNE = str(Path(sys.executable).parent / "cnn3d-tune")
# science and dialogue open with built-in sentences: 40 of each come from the warmed cache
TINY = {"lattice.size": 4, "lattice.steps": 2, "lattice.state_size": 4, "data.max_sentences": 40,
        "train.main_epochs": 1, "train.batch_size": 16, "data.domains": "builtin:science,builtin:dialogue",
        "continual.replay_size": 16}


@pytest.mark.slow
def test_tune_ewc_and_replay_against_forgetting(tmp_path, warm_cache):
    storage, tracking = f"sqlite:///{tmp_path}/studies.db", f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [TUNE, "--name", "cl", "--storage", storage, "--tracking-uri", tracking, "--no-report", "--trials", "2",
           "--workers", "1",
           "--param", "continual.ewc_lambda", "--param", "continual.replay_fraction",
           "--objective", "avg_final_cosine:max", "--objective", "forgetting:min", "--log-level", "warning"]
    for key, value in {**TINY, "data.cache_dir": str(warm_cache)}.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr

    study = optuna.load_study(study_name="cl", storage=storage)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    client = MlflowClient(tracking_uri=tracking)
    for trial in trials:
        metrics = trial.user_attrs["metrics"]
        assert trial.values == [pytest.approx(metrics["avg_final_cosine"]), pytest.approx(metrics["forgetting"])]
        assert 0 <= trial.params["continual.replay_fraction"] <= 1
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        for name in ("cl_matrix/1/science", "cl_matrix/2/dialogue", "cl_pca/science", "forgetting",
                     "avg_final_cosine", "cl_fisher_seconds", "cl_replay_bytes"):
            assert name in run.data.metrics, name
        assert run.data.metrics["cl_replay_bytes"] == 16 * 384 * 4
        assert run.data.params["continual.ewc_lambda"] == str(trial.params["continual.ewc_lambda"])

    page = render_report(build_report_data(study))
    assert 'id="continual"' in page and "forgetting matrix" in page
    assert "Forgetting against the tuned parameters" in page


def test_a_continual_objective_without_domains_is_a_user_error():
    from cnn3d.errors import UserError
    from tuner.spec import StudySpec

    with pytest.raises(UserError, match="needs a sequence of domains"):
        StudySpec(params=["continual.ewc_lambda"], objectives=["forgetting:min"], pruner="none").validate()
    spec = StudySpec(params=["continual.ewc_lambda"], objectives=["forgetting:min", "avg_final_cosine:max"],
                     set={"data.domains": "builtin:news,builtin:dialogue"}).validate()
    assert [o.metric for o in spec.parsed_objectives()] == ["forgetting", "avg_final_cosine"]


def test_report_states_the_in_run_baselines_beside_the_heatmap():
    from types import SimpleNamespace

    from tuner.report import Note, _continual_section

    metrics = {"cl_matrix/1/news": 0.5, "cl_matrix/1/dialogue": 0.3, "cl_matrix/2/news": 0.45,
               "cl_matrix/2/dialogue": 0.55, "cl_pca/news": 0.72, "cl_pca/dialogue": 0.72, "forgetting": 0.05,
               "avg_final_cosine": 0.5, "cl_naive/forgetting": 0.1, "cl_naive/avg_final_cosine": 0.48,
               "cl_forgetting_cut": 0.5, "cl_joint/avg_final_cosine": 0.58, "cl_plasticity": 0.97}
    trial = SimpleNamespace(number=3, metrics=metrics, params={})
    section = _continual_section(SimpleNamespace(best=None, complete=[trial], params=[]))
    notes = [item.text for item in section.items if isinstance(item, Note)]
    assert any("naive sequential forgetting 0.1000 (this trial 0.0500, cut 50%)" in n
               and "joint avg final 0.5800" in n and "plasticity 0.970" in n for n in notes), notes
    del metrics["cl_naive/forgetting"]
    section = _continual_section(SimpleNamespace(best=None, complete=[trial], params=[]))
    assert not any("Baselines" in item.text for item in section.items if isinstance(item, Note))
