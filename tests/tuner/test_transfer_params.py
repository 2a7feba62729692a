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
