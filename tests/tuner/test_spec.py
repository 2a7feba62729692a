import pytest

from cnn3d.errors import UserError
from tuner.run import sweep_points
from tuner.space import parse_param
from tuner.spec import Objective, StudySpec, load_spec


def test_objective_parsing():
    assert Objective.parse("val_cosine") == Objective("val_cosine", "maximize")
    assert Objective.parse("peak_memory_mb:min") == Objective("peak_memory_mb", "minimize")
    assert Objective.parse("expert_usage_local:max").metric == "expert_usage_local"
    with pytest.raises(UserError, match="did you mean val_cosine"):
        Objective.parse("val_cosin:max")
    with pytest.raises(UserError, match="direction must be max or min"):
        Objective.parse("val_cosine:up")


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("studies").glob("*.yaml")))
def test_every_shipped_study_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.study_name() == path.stem
    assert spec.spaces() and spec.parsed_objectives()
    spec.base_config()


def test_spec_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [transform.dropout]\ntrails: 5\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown study spec key 'trails'; did you mean trials"):
        load_spec(bad)
    bad.write_text("params: [transform.dropout]\nset: {lattice.sise: 4}\n")
    with pytest.raises(UserError, match="lattice.size"):
        load_spec(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_spec(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_spec_rules():
    with pytest.raises(UserError, match="both tuned"):
        StudySpec(params=["transform.dropout"], set={"transform.dropout": 0.1}).validate()
    with pytest.raises(UserError, match="single objective"):
        StudySpec(params=["train.lr"], objectives=["val_cosine", "peak_memory_mb:min"], pruner="median").validate()
    with pytest.raises(UserError, match="more than once"):
        StudySpec(params=["train.lr", "train.lr=1e-3:1e-2"]).validate()
    assert StudySpec(params=["train.lr"]).study_name() == "test-train.lr"


def test_sweep_points_spread_values_and_repeat_seeds():
    space = parse_param("transform.dropout=0.0:0.4")
    plan = sweep_points(space, trials=15, seeds=3)
    assert len(plan) == 15
    assert sorted({v for v, _ in plan}) == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert {r for _, r in plan} == {0, 1, 2}
    assert [r for _, r in plan[:5]] == [0] * 5  # round-major: a partial run still covers the range
    assert len({v for v, _ in sweep_points(space, trials=4, seeds=0)}) == 4
