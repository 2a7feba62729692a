"""The tuner can sweep the grow schedule and fix a transfer source, in the dotted vocabulary."""

import optuna.distributions as D
import pytest

from cnn3d import preset, with_overrides
from cnn3d.config import ConfigError
from tuner.space import parse_param


def test_grow_schedule_is_swept_by_values():
    space = parse_param("train.grow_schedule=none,8x2,8x2+12x2")
    assert isinstance(space.distribution, D.CategoricalDistribution)
    assert list(space.distribution.choices) == ["none", "8x2", "8x2+12x2"]
    for value in space.distribution.choices:  # every choice builds a trial config
        with_overrides(preset("wide"), {"train.main_epochs": 6, "train.grow_schedule": value})
    # a malformed value is refused when the space is parsed, before any trial starts
    with pytest.raises(ConfigError, match="train.grow_schedule='8-2' is malformed"):
        parse_param("train.grow_schedule=none,8-2")
    with pytest.raises(ConfigError, match="train.grow_schedule"):
        with_overrides(preset("wide"), {"train.grow_schedule": "8-2"})


@pytest.mark.parametrize("how", ["param", "set", "spec", "epochs"])
def test_bad_grow_schedule_fails_in_one_line_before_any_trial(how, tmp_path):
    """--param, --set, a study spec: a malformed schedule (or one using every epoch) is one line, exit 2."""
    from click.testing import CliRunner

    from tuner.cli import tune_cli

    storage = tmp_path / "s.db"
    args = ["--storage", f"sqlite:///{storage}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--trials", "1"]
    if how == "param":
        args += ["--param", "train.grow_schedule=none,8x1+4"]
    elif how == "set":
        args += ["--param", "transform.dropout", "--set", "train.grow_schedule=8by2"]
    elif how == "spec":
        spec = tmp_path / "grow.yaml"
        spec.write_text("params:\n  train.grow_schedule: [none, 8x2x2]\n")
        args += ["--spec", str(spec)]
    else:  # well formed, but 4x3 uses all 3 main epochs of the test preset
        args += ["--param", "train.grow_schedule=none,4x3"]
    result = CliRunner().invoke(tune_cli, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "train.grow_schedule" in lines[0], result.stderr
    assert not storage.exists()  # nothing was started


def test_init_from_is_a_plain_setting():
    config = with_overrides(preset("wide"), {"train.init_from": "runs/small"})
    assert config.train.init_from == "runs/small"


# --------------------------------------------------------------------------- real studies (tiny cubes)

TINY = {"lattice.steps": 2, "lattice.state_size": 4, "data.max_sentences": 48, "train.batch_size": 16,
        "train.main_epochs": 2, "train.num_threads": 1}


def _run_study(tmp, **spec):
    import os

    from tuner.run import ConfigurationTuner
    from tuner.spec import StudySpec

    old_cwd = os.getcwd()
    os.chdir(tmp)  # the tuner writes studies/reports/ relative to the working directory
    try:
        tuner = ConfigurationTuner(storage=f"sqlite:///{tmp}/s.db", tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        return tuner.run_study(StudySpec(pruner="none", **spec))
    finally:
        os.chdir(old_cwd)


@pytest.fixture(scope="module")
def small_source(warm_cache, tmp_path_factory):
    """A trained 4x4x4 student: the checkpoint every transferred trial starts from."""
    from cnn3d.train import train

    folder = tmp_path_factory.mktemp("source") / "small"
    config = with_overrides(preset("test"), {**TINY, "lattice.size": 4, "train.main_epochs": 1,
                                             "data.cache_dir": str(warm_cache)})
    train(config, out_dir=folder, progress=False)
    return folder


@pytest.mark.slow
def test_size_sweep_starts_every_trial_from_one_checkpoint_and_reports_curves(small_source, warm_cache, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from tuner.report import check_in_browser, find_chromium, transfer_curves_figure
    from tuner.report_data import build_report_data

    summary = _run_study(tmp_path, name="sizes", params=["lattice.size=5,6", f"train.init_from=none,{small_source}"],
                         sampler="grid", trials=4, set={**TINY, "data.cache_dir": str(warm_cache)})
    assert summary.finished == 4 and summary.failed == 0
    study = optuna.load_study(study_name="sizes", storage=f"sqlite:///{tmp_path}/s.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    arms = set()
    for trial in study.trials:
        size, source = trial.params["lattice.size"], trial.params["train.init_from"]
        arms.add((size, source != "none"))
        tags = client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags
        if source == "none":
            assert "transfer" not in trial.user_attrs and "cnn3d.transfer_source" not in tags
        else:  # this trial's cube was filled from the 4^3 checkpoint, at its own size
            moved = trial.user_attrs["transfer"]
            assert moved == {"source": str(small_source), "source_dims": [4, 4, 4], "target_dims": [size] * 3}
            assert tags["cnn3d.transfer_source"] == str(small_source)
    assert arms == {(5, False), (5, True), (6, False), (6, True)}

    data = build_report_data(study, mlflow_client=client)
    fig = transfer_curves_figure(data)  # one panel per size, a line per trial over its 2 epochs
    assert [a.text for a in fig.layout.annotations] == ["lattice.size=5", "lattice.size=6"]
    assert len(fig.data) == 4 and all(list(t.x) == [1, 2] for t in fig.data)
    assert {t.name for t in fig.data} == {"from scratch", "from train.init_from"}
    page = tmp_path / summary.report_path
    assert 'id="transfer"' in page.read_text()
    if find_chromium() is None:
        pytest.skip("chromium is not on PATH (CI installs Debian's chromium)")
    result = check_in_browser(page)
    assert result.errors == [] and result.undrawn == [], result.figures


@pytest.mark.slow
def test_two_teacher_trials_log_each_teacher_to_mlflow_and_tune_the_combined_objective(warm_cache, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    summary = _run_study(tmp_path, name="two", params=["lattice.size=4"], trials=1, report=False,
                         objectives=["val_cosine_fraction:max"],
                         set={**TINY, "data.cache_dir": str(warm_cache), "teacher.extra": "cls:cls"})
    assert summary.finished == 1
    trial = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path}/s.db").trials[0]
    metrics = trial.user_attrs["metrics"]
    assert trial.value == pytest.approx(metrics["val_cosine_fraction"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = trial.user_attrs["mlflow_run_id"]
    for name in ("val_cosine/main", "val_cosine/cls", "baseline_pca_cosine/cls", "baseline_mean_cosine/cls",
                 "val_cosine_fraction"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
    assert [s.value for s in client.get_metric_history(run_id, "val_cosine_fraction")][-1] == pytest.approx(trial.value)
    # the final weights are attached with every teacher, so the trial's student decodes with each
    from cnn3d.multiteacher import load_multi

    folder = client.download_artifacts(run_id, "checkpoint", str(tmp_path))
    student, teachers = load_multi(folder)
    assert sorted(teachers) == ["cls", "main"] and sorted(student.teacher_dims) == ["cls", "main"]


def test_a_several_teacher_objective_without_teacher_extra_is_a_user_error():
    from cnn3d.errors import UserError
    from tuner.spec import StudySpec

    with pytest.raises(UserError, match="needs several teachers"):
        StudySpec(params=["transform.dropout"], objectives=["val_cosine_fraction:max"]).validate()
    StudySpec(params=["transform.dropout"], objectives=["val_cosine_fraction:max"],
              set={"teacher.extra": "cls:cls"}).validate()
