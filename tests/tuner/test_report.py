"""The study report: the data step on hand-built studies (odd ones included), the page, the CLI, and a real
study's report checked in headless Chromium."""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import optuna
import optuna.distributions as D
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState, create_trial

from cnn3d.config import flatten, preset
from tuner.report import check_in_browser, default_report_path, find_chromium, render_report, write_report
from tuner.report_cli import report_cli
from tuner.report_data import build_report_data, config_diff

optuna.logging.set_verbosity(optuna.logging.WARNING)

DROPOUT = D.FloatDistribution(0.0, 0.5)
LR = D.FloatDistribution(1e-4, 1e-2, log=True)
KIND = D.CategoricalDistribution(["linear", "attention"])
EXPERTS = ["local", "functional", "distant"]
PLOTLY_BANNER = "plotly.js v"  # appears once at the top of the bundled library


# --------------------------------------------------------------------------- hand-built studies


def epoch_metrics(epoch: int, quality: float, rng: random.Random, face: int = 64) -> dict[str, float]:
    """One epoch's metrics, shaped like ``cnn3d.train``'s."""
    usage = [rng.random() + 0.1 for _ in EXPERTS]
    metrics = {
        "epoch": epoch, "train_loss": 1.5 - quality, "val_cosine": quality, "val_mse": 0.4 - quality / 4,
        "baseline_pca_cosine": 0.45 + face / 640, "baseline_mean_cosine": 0.28, "decode_top1": max(0.0, quality - 0.3),
        "throughput_samples_per_s": 900 + 100 * rng.random(), "peak_memory_mb": 800 + 10 * rng.random(),
        "effective_dim": 5 + 4 * quality, "cell_specialization": 0.1 + rng.random() / 10,
        "expert_usage_entropy": 0.95 + rng.random() / 20, "face_numbers": float(face),
    }
    metrics.update({f"expert_usage_{n}": u / sum(usage) for n, u in zip(EXPERTS, usage)})
    return metrics


def snapshot(side: int = 4) -> dict:
    cells = side**3
    return {"dims": [side, side, side], "stride": 1, "activation": [round((i % 7) / 7, 5) for i in range(cells)],
            "dominant_expert": [i % 3 for i in range(cells)], "expert_names": EXPERTS,
            "input": "Light from the sun takes about eight minutes to reach the Earth."}


def trial_attrs(params: dict, quality: float, epochs: int, rng: random.Random, seed: int | None = None,
                complete: bool = True) -> dict:
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(preset("test")).items()}
    config.update(params)
    config.update({"train.main_epochs": epochs, "data.max_sentences": 120})
    if seed is not None:
        config["train.seed"] = seed
    face = config["lattice.size"] ** 2
    history = [epoch_metrics(e, quality * e / epochs, rng, face) for e in range(1, epochs + 1)]
    attrs = {"config": config, "mlflow_run_id": f"run{rng.randrange(10**9):09d}", "history": history}
    if seed is not None:
        attrs["train.seed"] = seed
    if complete:
        attrs.update(metrics=history[-1], lattice_snapshot=snapshot(),
                     examples=[{"input": f"sentence {i}", "decoded": f"sentence {i if i % 2 else i + 1}",
                                "score": 0.9, "correct": bool(i % 2)} for i in range(4)])
    return attrs


def new_study(tmp_path: Path, name: str, params: list[str], directions=("maximize",),
              objectives=("val_cosine:max",), fixed=None) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name=name,
                                directions=list(directions))
    study.set_user_attr("objectives", list(objectives))
    study.set_user_attr("params", params)
    study.set_user_attr("preset", "test")
    study.set_user_attr("set", fixed or {"train.main_epochs": "3", "data.max_sentences": "120"})
    study.set_user_attr("mlflow_experiment_id", "7")
    study.set_user_attr("mlflow_parent_run_id", "parent0")
    study.set_user_attr("tracking_uri", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    return study


def add(study: optuna.Study, state: TrialState, params: dict, dists: dict, quality: float, rng: random.Random,
        epochs: int = 3, seed: int | None = None, values: list[float] | None = None, **extra) -> None:
    complete = state == TrialState.COMPLETE
    reached = epochs if state != TrialState.PRUNED else 1
    attrs = trial_attrs(params, quality, epochs if complete else reached, rng, seed, complete)
    if state == TrialState.PRUNED:
        attrs["pruned_at_epoch"] = 1
    if state == TrialState.FAIL:
        attrs = {"config": attrs["config"], "mlflow_run_id": attrs["mlflow_run_id"], "history": [],
                 "fail_reason": "RuntimeError: out of memory"}
    attrs.update(extra)
    inter = {h["epoch"]: h["val_cosine"] for h in attrs.get("history", [])} if len(study.directions) == 1 else {}
    study.add_trial(create_trial(
        state=state, params=params, distributions={k: dists[k] for k in params},
        values=(values or [quality]) if complete else None, user_attrs=attrs, intermediate_values=inter,
    ))


def multi_param_study(tmp_path: Path) -> optuna.Study:
    """Three parameters (one categorical), 10 complete, 3 pruned, 1 failed: quality grows with dropout."""
    rng = random.Random(0)
    study = new_study(tmp_path, "multi", ["transform.dropout", "train.lr", "transform.kind"])
    dists = {"transform.dropout": DROPOUT, "train.lr": LR, "transform.kind": KIND}
    for i in range(14):
        params = {"transform.dropout": round(rng.uniform(0, 0.5), 3), "train.lr": 10 ** rng.uniform(-4, -2),
                  "transform.kind": rng.choice(["linear", "attention"])}
        state = TrialState.COMPLETE if i < 10 else TrialState.PRUNED if i < 13 else TrialState.FAIL
        add(study, state, params, dists, 0.2 + params["transform.dropout"] + rng.gauss(0, 0.01), rng)
    return study


def sweep_study(tmp_path: Path, seeds: int = 3) -> optuna.Study:
    """A one-parameter sweep: 3 values x ``seeds`` seeds; the mean rises by 0.1 per value, noise ~0.01."""
    rng = random.Random(1)
    study = new_study(tmp_path, f"sweep{seeds}", ["transform.dropout"])
    for seed in range(seeds):
        for j, value in enumerate((0.0, 0.25, 0.5)):
            add(study, TrialState.COMPLETE, {"transform.dropout": value}, {"transform.dropout": DROPOUT},
                0.3 + 0.1 * j + rng.gauss(0, 0.01), rng, seed=seed)
    return study


# --------------------------------------------------------------------------- the data step


def test_multi_parameter_study_data(tmp_path):
    data = build_report_data(multi_param_study(tmp_path))
    assert data.counts == {"COMPLETE": 10, "PRUNED": 3, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    assert [p.key for p in data.params] == ["transform.dropout", "train.lr", "transform.kind"]
    assert data.params[2].kind == "categorical" and data.params[1].log
    best = max(data.complete, key=lambda t: t.values[0])
    assert data.best.number == best.number
    assert data.best.run_url == f"http://127.0.0.1:5000/#/experiments/7/runs/{best.run_id}"
    assert data.experiment_url == "http://127.0.0.1:5000/#/experiments/7/runs"
    diff = {row.key: row for row in data.best.config_diff}
    assert diff["transform.dropout"].source == "tuned" and diff["data.max_sentences"].source == "--set"
    assert "transform.hidden_sizes" not in diff  # tuple default vs stored list is not a difference
    assert {(i.evaluator, i.objective) for i in data.importances} == {("PED-ANOVA", "val_cosine"),
                                                                      ("fANOVA", "val_cosine")}
    fanova = next(i for i in data.importances if i.evaluator == "fANOVA")
    assert max(fanova.values, key=fanova.values.get) == "transform.dropout"
    assert data.top_pair is not None and "transform.dropout" in data.top_pair
    effect = data.effects[0]
    panels = {p.metric: p for p in effect.panels}
    assert {"val_cosine", "decode_top1", "throughput_samples_per_s", "peak_memory_mb", "effective_dim",
            "cell_specialization", "expert_usage_entropy", "expert_usage"} <= set(panels)
    objective = panels["val_cosine"]
    assert objective.role == "objective" and set(objective.baselines) == {"PCA baseline", "mean-vector baseline"}
    assert {p.state for p in objective.points} == {"COMPLETE", "PRUNED"}
    assert {p.state for p in panels["peak_memory_mb"].points} == {"COMPLETE"}  # pruned costs are not comparable
    assert panels["expert_usage"].series == sorted(EXPERTS)
    assert not objective.groups  # no value was repeated
    assert data.curves.metrics[0] == "val_cosine" and len(data.curves.trials) == 13  # the failed one has no epochs
    assert data.trials[13].fail_reason.startswith("RuntimeError")


def test_sweep_shows_mean_and_spread_per_value(tmp_path):
    data = build_report_data(sweep_study(tmp_path, seeds=3))
    assert data.importances == [] and data.top_pair is None
    (effect,) = data.effects
    objective = effect.panels[0]
    assert [g.x for g in objective.groups] == [0.0, 0.25, 0.5] and all(g.n == 3 for g in objective.groups)
    by_x = {g.x: g for g in objective.groups}
    expected = [p.y for p in objective.points if p.x == 0.5]
    assert math.isclose(by_x[0.5].mean, sum(expected) / 3)
    assert 0 < by_x[0.5].std < 0.05
    assert objective.effect_to_noise > 5  # 0.2 between means against ~0.01 noise
    assert {p.seed for p in objective.points} == {0, 1, 2}
    assert effect.note == ""


def test_sweep_with_one_seed_says_it_cannot_separate_effect_from_noise(tmp_path):
    data = build_report_data(sweep_study(tmp_path, seeds=1))
    assert "--seeds" in data.effects[0].note
    assert data.effects[0].panels[0].groups == []


def test_baselines_follow_the_face_size(tmp_path):
    rng = random.Random(2)
    study = new_study(tmp_path, "size", ["lattice.size"])
    dist = D.IntDistribution(4, 8)
    for size in (4, 6, 8):
        add(study, TrialState.COMPLETE, {"lattice.size": size}, {"lattice.size": dist}, 0.3, rng)
    pca = build_report_data(study).effects[0].panels[0].baselines["PCA baseline"]
    assert [x for x, _ in pca] == [4, 6, 8] and pca[0][1] < pca[1][1] < pca[2][1]


def test_emergence_panels_carry_both_nulls_and_the_best_trial_a_verdict(tmp_path):
    rng = random.Random(4)
    study = new_study(tmp_path, "nulls", ["moe.gate_temperature"])
    dist = D.FloatDistribution(0.05, 10.0, log=True)
    for temperature in (0.1, 1.0, 5.0):
        metrics = epoch_metrics(3, 0.5, rng)
        metrics.update({
            "cell_specialization": 0.3, "cell_specialization_null_untrained": temperature / 10,
            "cell_specialization_null_shuffled": 0.2, "cell_specialization_excess": 0.3 - max(0.2, temperature / 10),
            "cell_specialization_excess_std": 0.01, "effective_dim_null_untrained": 9.0,
            "effective_dim_null_shuffled": 8.0, "effective_dim_excess": -1.0, "effective_dim_excess_std": 0.5,
        })
        add(study, TrialState.COMPLETE, {"moe.gate_temperature": temperature}, {"moe.gate_temperature": dist}, 0.5,
            rng, metrics=metrics)
    data = build_report_data(study)
    panel = next(p for p in data.effects[0].panels if p.metric == "cell_specialization")
    assert panel.role == "emergence"
    assert panel.baselines["untrained cube"] == [(0.1, 0.01), (1.0, 0.1), (5.0, 0.5)]
    assert panel.baselines["shuffled control"] == [(0.1, 0.2), (1.0, 0.2), (5.0, 0.2)]
    page = render_report(data)
    assert "beyond both nulls" in page  # cell specialisation: +0.1 +- 0.01 at the best trial
    assert "indistinguishable from its nulls" in page  # effective dim: -1 +- 0.5
    assert '"fill":"tonexty"' in page  # the band between the nulls


def test_verdict_says_below_which_null_when_the_excess_is_clearly_negative():
    from cnn3d.analysis import verdict

    # cell specialisation as measured: between the nulls, far below the untrained cube
    below = {"cell_specialization_excess": -0.11, "cell_specialization_excess_std": 0.0014,
             "cell_specialization_null_untrained": 0.18, "cell_specialization_null_shuffled": 0.05}
    assert verdict("cell_specialization", below) == "less structure than the untrained cube"
    # expert-usage entropy counts lower as more structure: the shuffled control's lower entropy is the larger null
    entropy = {"expert_usage_entropy_excess": -0.01, "expert_usage_entropy_excess_std": 0.001,
               "expert_usage_entropy_null_untrained": 1.0, "expert_usage_entropy_null_shuffled": 0.9}
    assert verdict("expert_usage_entropy", entropy) == "less structure than the shuffled control"
    assert verdict("cell_specialization", {**below, "cell_specialization_excess_std": 0.1}) == \
        "indistinguishable from its nulls"
    assert verdict("rsa_teacher", {"rsa_teacher_excess": 0.4, "rsa_teacher_excess_std": 0.01}) == "beyond both nulls"


def test_config_diff_against_the_preset():
    defaults = flatten(preset("test"))
    config = {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()},
              "transform.dropout": 0.3, "lattice.size": 4, "train.seed": 5}
    rows, note = config_diff(config, "test", ["transform.dropout"], {"lattice.size": "4"})
    assert note == "" and [(r.key, r.source) for r in rows] == [
        ("transform.dropout", "tuned"), ("lattice.size", "--set"), ("train.seed", "seed")]
    assert config_diff(None, "test", [], {})[1].startswith("The best trial has no stored config")


def test_multi_objective_study_has_a_pareto_front(tmp_path):
    rng = random.Random(3)
    study = new_study(tmp_path, "mo", ["transform.dropout", "train.lr"], directions=("maximize", "maximize"),
                      objectives=("val_cosine:max", "throughput_samples_per_s:max"))
    dists = {"transform.dropout": DROPOUT, "train.lr": LR}
    for _ in range(8):
        params = {"transform.dropout": rng.uniform(0, 0.5), "train.lr": 10 ** rng.uniform(-4, -2)}
        quality = rng.uniform(0.2, 0.6)
        add(study, TrialState.COMPLETE, params, dists, quality, rng, values=[quality, 2000 - 2000 * quality])
    data = build_report_data(study)
    assert data.multi_objective and len(data.pareto) == 8  # a perfect trade-off: every trial is optimal
    assert data.best.number == max(data.complete, key=lambda t: t.values[0]).number
    assert {i.objective for i in data.importances} == {"val_cosine", "throughput_samples_per_s"}
    panels = [p.metric for p in data.effects[0].panels]
    assert panels.count("throughput_samples_per_s") == 1 and panels[:2] == ["val_cosine", "throughput_samples_per_s"]
    page = render_report(data)
    assert "Pareto front" in page and "A Pareto-optimal trial" in page


def test_missing_history_comes_from_mlflow_and_a_broken_store_is_asked_once(tmp_path):
    rng = random.Random(4)
    study = new_study(tmp_path, "dead", ["transform.dropout"])
    for value in (0.1, 0.2):
        add(study, TrialState.FAIL, {"transform.dropout": value}, {"transform.dropout": DROPOUT}, 0.3, rng)

    class Metric:
        def __init__(self, step, value):
            self.step, self.value = step, value

    class Client:
        calls = 0

        def get_metric_history(self, run_id, key):
            Client.calls += 1
            return [Metric(1, 0.1), Metric(2, 0.2)] if key == "val_cosine" else []

    data = build_report_data(study, mlflow_client=Client())
    assert data.curves.trials[0]["val_cosine"] == ([1, 2], [0.1, 0.2])

    class Broken:
        calls = 0

        def get_metric_history(self, run_id, key):
            Broken.calls += 1
            raise ConnectionError("tracking server down")

    data = build_report_data(study, mlflow_client=Broken())
    assert Broken.calls == 1 and data.curves.trials == {}


def odd_study(tmp_path: Path, case: str) -> optuna.Study:
    rng = random.Random(5)
    dists = {"transform.dropout": DROPOUT, "transform.kind": KIND}
    study = new_study(tmp_path, case, ["transform.dropout"] if case != "categorical" else ["transform.kind"])
    if case == "one trial":
        add(study, TrialState.COMPLETE, {"transform.dropout": 0.1}, dists, 0.3, rng)
    elif case == "all pruned":
        for value in (0.1, 0.2, 0.3):
            add(study, TrialState.PRUNED, {"transform.dropout": value}, dists, 0.2, rng)
    elif case == "categorical":
        for kind in ("linear", "attention", "linear", "attention"):
            add(study, TrialState.COMPLETE, {"transform.kind": kind}, dists, 0.3 + 0.1 * (kind == "linear"), rng)
    elif case == "failed only":
        for value in (0.1, 0.2):
            add(study, TrialState.FAIL, {"transform.dropout": value}, dists, 0.0, rng)
    elif case == "no snapshot":
        add(study, TrialState.COMPLETE, {"transform.dropout": 0.1}, dists, 0.3, rng,
            lattice_snapshot={"dims": [2, 2, 2], "activation": [0.1]}, examples=[])
    return study


ODD_CASES = {
    "no trials": "no trials yet",
    "one trial": "Only one trial completed",
    "all pruned": "No trial has completed",
    "categorical": "need at least two tuned parameters",
    "failed only": "out of memory",
    "no snapshot": "sizes disagree",
}


@pytest.mark.parametrize("case", list(ODD_CASES))
def test_odd_studies_give_a_readable_page(tmp_path, case):
    data = build_report_data(odd_study(tmp_path, case))
    page = render_report(data)
    assert ODD_CASES[case] in page
    assert page.count(PLOTLY_BANNER) == 1
    assert "Traceback" not in page


def test_all_pruned_study_still_plots_the_last_reported_values(tmp_path):
    data = build_report_data(odd_study(tmp_path, "all pruned"))
    assert data.best is None and data.counts["PRUNED"] == 3
    assert {p.state for p in data.effects[0].panels[0].points} == {"PRUNED"}
    assert set(data.curves.trials) == {0, 1, 2}


def test_categorical_sweep_groups_by_choice(tmp_path):
    data = build_report_data(odd_study(tmp_path, "categorical"))
    groups = data.effects[0].panels[0].groups
    assert {g.x: g.n for g in groups} == {"linear": 2, "attention": 2}


# --------------------------------------------------------------------------- the page


def test_write_report_defaults_to_studies_reports(tmp_path, monkeypatch):
    study = multi_param_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = write_report(study)
    assert path == Path("studies/reports/multi.html") and path.is_file()
    page = path.read_text()
    assert page.count(PLOTLY_BANNER) == 1  # plotly.js embedded once, figures only call it
    assert page.count("data-figure=") == page.count("Plotly.newPlot(") >= 8
    assert "https://cdn" not in page.split("</head>")[1]  # nothing fetched from the network
    assert path.stat().st_size < 6_000_000
    for text in ("PED-ANOVA", "fANOVA", "Parallel coordinates", "Contour", "Learning curves", "Decoded examples",
                 "mean-vector baseline", "colour by dominant expert", "out of memory", "transform.kind"):
        assert text in page, text
    assert default_report_path("a/b c") == Path("studies/reports/a_b_c.html")


# --------------------------------------------------------------------------- the CLI


def test_cli_writes_the_report_and_names_existing_studies(tmp_path):
    study = sweep_study(tmp_path)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    out = tmp_path / "out" / "r.html"
    runner = CliRunner()
    done = runner.invoke(report_cli, [study.study_name, "--storage", storage, "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert out.is_file() and "report:" in done.stdout
    missing = runner.invoke(report_cli, ["nope", "--storage", storage])
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"error: no study named 'nope' in {storage}; existing studies: sweep3"
    absent = runner.invoke(report_cli, ["x", "--storage", f"sqlite:///{tmp_path / 'none.db'}"])
    assert absent.exit_code == 2 and "no study storage" in absent.stderr
    assert not (tmp_path / "none.db").exists()
    unreachable = runner.invoke(report_cli, ["x", "--storage", "postgresql+psycopg://nobody@127.0.0.1:1/x"])
    assert unreachable.exit_code == 2 and len(unreachable.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a real study, in a real browser


def require_chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not on PATH (CI installs Debian's chromium)")
    return binary


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    """A tiny real sweep run by the tuner in-process (2 dropout values x 2 seeds), report written by the tuner."""
    import cnn3d.analyze
    import tuner.report_analysis as RA
    from tuner.run import ConfigurationTuner
    from tuner.spec import StudySpec

    tmp = tmp_path_factory.mktemp("real")
    old_cwd, old_env = Path.cwd(), os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.chdir(tmp)  # the tuner writes studies/reports/ relative to the working directory
    # the best trial's analysis at report time, sized for a test: few probing sentences and distractors
    saved = RA.PROBE_SENTENCES, RA.DISTRACTORS, cnn3d.analyze.RIDGE_TRAIN
    RA.PROBE_SENTENCES, RA.DISTRACTORS, cnn3d.analyze.RIDGE_TRAIN = 80, (20,), 64
    try:
        tuner = ConfigurationTuner(storage=f"sqlite:///{tmp}/s.db", tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
        summary = tuner.run_study(StudySpec(params=["transform.dropout"], trials=4, seeds=2, set={
            "train.main_epochs": 1, "data.max_sentences": 120, "lattice.size": 4, "lattice.steps": 4,
            "data.cache_dir": str(tmp / "cache")}))
    finally:
        RA.PROBE_SENTENCES, RA.DISTRACTORS, cnn3d.analyze.RIDGE_TRAIN = saved
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
    return tmp, summary


@pytest.mark.slow
def test_tuner_writes_and_attaches_the_report(real_study):
    tmp, summary = real_study
    assert summary.finished == 4 and summary.report_path == "studies/reports/test-transform.dropout.html"
    assert (tmp / summary.report_path).is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
    assert "test-transform.dropout.html" in [a.path for a in client.list_artifacts(summary.parent_run_id)]
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp}/s.db")
    data = build_report_data(study, mlflow_client=client)
    groups = data.effects[0].panels[0].groups
    assert [g.n for g in groups] == [2, 2]  # two values, two seeds each
    # MLflow is the one store of histories, examples and the lattice snapshot; Optuna keeps no copies
    assert data.best.lattice is not None and data.best.examples
    assert all(len(t.history) == 1 for t in data.trials)
    assert not any({"history", "examples", "lattice_snapshot"} & set(t.user_attrs) for t in study.trials)


@pytest.mark.slow
def test_report_shows_the_best_trials_analysis_computed_once(real_study, tmp_path, monkeypatch, capfd):
    """Trials attach their weights; the report analysed the best one once and attached the page and numbers to its run."""
    from mlflow.tracking import MlflowClient

    import tuner.report_analysis as RA

    tmp, summary = real_study
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp}/s.db")
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    for trial in study.trials:  # every complete trial carries a loadable checkpoint
        files = {a.path for a in client.list_artifacts(trial.user_attrs["mlflow_run_id"], "checkpoint")}
        assert {"checkpoint/config.json", "checkpoint/model.safetensors"} <= files, files
    assert {"analysis/analysis.json", "analysis/analysis.html"} <= {a.path for a in client.list_artifacts(best_run, "analysis")}
    page = (tmp / summary.report_path).read_text()
    assert "id=\"analysis\"" in page and page.count("id=\"fig-analysis-") == 7  # every view of cnn3d-analyze
    for title in ("Probing tasks", "Information flow along depth", "Similarity matrices", "Decoding against bank size"):
        assert title in page
    assert "Near neighbours: a bank of the" in page  # decoding among one-word edits of the validation sentences
    # a second report reads the stored analysis back instead of analysing again
    monkeypatch.setattr(RA, "_analyse", lambda *a, **k: pytest.fail("analysed the best trial twice"))
    capfd.readouterr()
    again = write_report(study, out=tmp_path / "again.html", mlflow_client=client)
    assert again.read_text().count("id=\"fig-analysis-") == 7
    assert "Downloading artifacts" not in capfd.readouterr().err  # no MLflow progress bar per small file
    # without MLflow the section says why it is missing
    bare = write_report(study, out=tmp_path / "bare.html").read_text()
    assert "needs its MLflow run" in bare and "id=\"fig-analysis-" not in bare


@pytest.mark.slow
def test_real_report_draws_every_figure_in_headless_chromium(real_study, tmp_path):
    chromium = require_chromium()
    tmp, summary = real_study
    page = tmp / summary.report_path
    shot = tmp_path / "report.png"
    result = check_in_browser(page, screenshot=shot, chromium=chromium)
    assert result.errors == []
    assert not result.webgl_missing
    assert len(result.figures) >= 4, result.figures  # effects, history, learning curves, lattice
    assert result.undrawn == [], result.figures
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/report-screenshot.png")
    assert page.stat().st_size < 6_000_000


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no trials", "all pruned", "failed only"])
def test_odd_pages_load_without_javascript_errors(tmp_path, case):
    chromium = require_chromium()
    page = write_report(odd_study(tmp_path, case), out=tmp_path / "odd.html")
    result = check_in_browser(page, chromium=chromium)
    assert result.errors == [] and result.undrawn == [], result.figures
