import optuna.distributions as D
import pytest

from cnn3d.config import ConfigError
from tuner.space import parse_param


def test_bare_key_takes_the_field_range_and_scale():
    dropout = parse_param("transform.dropout").distribution
    assert isinstance(dropout, D.FloatDistribution) and (dropout.low, dropout.high, dropout.log) == (0.0, 0.5, False)
    lr = parse_param("train.lr").distribution
    assert lr.log is True
    kind = parse_param("transform.kind").distribution
    assert kind.choices == ("linear", "hierarchical", "attention", "autoencoder")
    assert parse_param("transform.layer_norm").distribution.choices == (False, True)


def test_explicit_ranges_and_choices():
    assert parse_param("transform.dropout=0.0:0.3").distribution == D.FloatDistribution(0.0, 0.3)
    assert parse_param("train.lr=1e-4:1e-2:log").distribution == D.FloatDistribution(1e-4, 1e-2, log=True)
    assert parse_param("lattice.size=6:16:int").distribution == D.IntDistribution(6, 16)
    assert parse_param("lattice.size=6:16").distribution == D.IntDistribution(6, 16)
    assert parse_param("transform.kind=linear,attention").distribution.choices == ("linear", "attention")
    experts = parse_param("moe.experts=local,distant|local").distribution
    assert experts.choices == ("local,distant", "local")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("transform.dropuot", "did you mean transform.dropout"),
        ("transform.dropout=0.5:0.1", "low 0.5 is above high 0.1"),
        ("transform.dropout=a:b", "must be numbers"),
        ("transform.dropout=0.0:0.4:cubic", "malformed"),
        ("transform.dropout=0.0:0.9", "out of range"),
        ("transform.dropout=0:0.4:log", "log scale needs low > 0"),
        ("transform.kind=linear,conv", "not one of"),
        ("transform.kind=0:1", "not numeric"),
        ("data.corpus", "no range to search"),
    ],
)
def test_bad_params_fail_with_one_clear_line(text, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_param(text)
    assert "\n" not in str(err.value)


def test_grid_spreads_values_evenly():
    assert parse_param("transform.dropout=0.0:0.4").grid(5) == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert parse_param("train.lr=1e-4:1e-2:log").grid(3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert parse_param("lattice.size=6:8:int").grid(5) == [6, 7, 8]
    assert parse_param("transform.kind=linear,attention").grid(7) == ["linear", "attention"]
