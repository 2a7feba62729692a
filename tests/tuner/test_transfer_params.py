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
    # a malformed value passes the space (a plain string) and is refused when a trial's config is built
    parse_param("train.grow_schedule=none,8-2")
    with pytest.raises(ConfigError, match="train.grow_schedule"):
        with_overrides(preset("wide"), {"train.grow_schedule": "8-2"})


def test_init_from_is_a_plain_setting():
    config = with_overrides(preset("wide"), {"train.init_from": "runs/small"})
    assert config.train.init_from == "runs/small"
