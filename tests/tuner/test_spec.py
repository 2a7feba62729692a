import pytest
import torch

from cnn3d.config import preset, with_overrides
from cnn3d.errors import UserError
from tuner.run import auto_workers, sweep_points, worker_memory_bytes
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


def test_workers_is_a_whole_number_or_auto(tmp_path):
    assert StudySpec(params=["train.lr"], workers="auto").validate().workers == "auto"
    for bad in (0, "two", 1.5, True):
        with pytest.raises(UserError, match="whole number of at least 1, or auto"):
            StudySpec(params=["train.lr"], workers=bad).validate()
    spec = tmp_path / "s.yaml"
    spec.write_text("params: [transform.dropout]\nworkers: auto\n")
    assert load_spec(spec).workers == "auto"
    spec.write_text("params: [transform.dropout]\n")  # a spec that leaves workers out takes the caller's default
    assert load_spec(spec).workers == 1 and load_spec(spec, StudySpec(workers="auto")).workers == "auto"
    spec.write_text("params: [transform.dropout]\nworkers: many\n")
    with pytest.raises(UserError, match="workers must be an integer"):
        load_spec(spec)


GIB = 2**30


def test_auto_workers_one_per_core_within_trials_and_memory():
    config, cpu = preset("test"), torch.device("cpu")
    assert auto_workers(config, [], trials=50, device=cpu, cores=2, free_bytes=20 * GIB)[0] == 2
    assert auto_workers(config, [], trials=50, device=cpu, cores=16, free_bytes=64 * GIB)[0] == 16
    assert auto_workers(config, [], trials=3, device=cpu, cores=16, free_bytes=64 * GIB)[0] == 3  # no idle workers
    per_worker = worker_memory_bytes(config)
    assert auto_workers(config, [], trials=50, device=cpu, cores=16, free_bytes=3.5 * per_worker)[0] == 3
    assert auto_workers(config, [], trials=50, device=cpu, cores=16, free_bytes=0.5 * per_worker)[0] == 1
    assert auto_workers(config, [], trials=50, device=cpu, cores=1, free_bytes=20 * GIB)[0] == 1
    # train.num_threads asks for that many threads per worker: the cores are shared out in those units
    threaded = with_overrides(config, {"train.num_threads": 2})
    workers, why = auto_workers(threaded, [], trials=50, device=cpu, cores=8, free_bytes=64 * GIB)
    assert workers == 4 and "2 torch threads each" in why
    # one accelerator is shared by every worker: one worker
    assert auto_workers(config, [], trials=50, device=torch.device("cuda"), cores=16, free_bytes=64 * GIB)[0] == 1


def test_worker_memory_counts_the_largest_cube_a_study_can_sample():
    config = preset("test")
    small = worker_memory_bytes(config)
    full = worker_memory_bytes(preset("full"))
    assert 1.5 * GIB < small < 2 * GIB and full > 10 * GIB  # the full cube's activations dominate its worker
    assert worker_memory_bytes(config, [parse_param("lattice.size=6:24:int")]) > worker_memory_bytes(
        with_overrides(config, {"lattice.size": 23}))
    assert worker_memory_bytes(config, [parse_param("train.batch_size=16,64")]) == worker_memory_bytes(
        with_overrides(config, {"train.batch_size": 64}))
    assert worker_memory_bytes(config, [parse_param("transform.dropout")]) == small
