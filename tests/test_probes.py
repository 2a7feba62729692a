"""Linear probes on data with known answers, and the probing-set readers' errors."""

import pytest
import torch

from cnn3d.errors import UserError
from cnn3d.probes import (
    builtin_probing_set,
    chance_accuracy,
    logistic_hessian,
    probe_accuracy,
    read_probing_file,
    ridge_probe_cosine,
)


def _separable(n: int = 240, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=gen)
    features = torch.randn(n, 20, generator=gen)
    features[:, 0] += 3.0 * (2 * labels - 1)  # one informative direction
    order = torch.randperm(n, generator=gen)
    return features, labels, order[: n * 7 // 10], order[n * 7 // 10 :]


def test_probe_reads_an_informative_direction_and_is_at_chance_on_shuffled_labels():
    features, labels, train, test = _separable()
    assert probe_accuracy(features, labels, train, test) > 0.95
    chance = chance_accuracy(labels[train], labels[test])
    shuffled = probe_accuracy(features, labels, train, test, shuffle_seed=0)
    assert abs(shuffled - chance) < 0.15  # 72 test sentences: a few points of noise around chance


def test_ridge_probe_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 30, generator=gen)
    y = x @ torch.randn(30, 8, generator=gen)
    assert ridge_probe_cosine(x[:150], y[:150], x[150:], y[150:], alpha=1e-4) > 0.99
    assert ridge_probe_cosine(x[:150], torch.randn(150, 8, generator=gen), x[150:], y[150:]) < 0.5


def test_builtin_probing_set_has_every_label_with_two_or_more_classes():
    pset = builtin_probing_set(120)
    assert set(pset.labels) == {"tense", "plural_subject", "human_subject", "clauses"}
    for task in pset.labels:
        assert len(pset.classes(task)) >= 2
    assert len(pset.train) + len(pset.test) == 120 and not set(pset.train.tolist()) & set(pset.test.tolist())


def test_probing_file_errors_are_one_line(tmp_path):
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("text,tag\n" + "".join(f"sentence {i},a\n" for i in range(20)))
    with pytest.raises(UserError, match="no 'label' column"):
        read_probing_file(no_label)
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(f'{{"text": "sentence {i}", "label": "x"}}\n' for i in range(20)))
    with pytest.raises(UserError, match="1 class"):
        read_probing_file(one_class)
    good = tmp_path / "good.tsv"
    good.write_text("text\tlabel\n" + "".join(f"sentence {i}\t{i % 3}\n" for i in range(30)))
    assert read_probing_file(good).classes("label") == ["0", "1", "2"]


def test_logistic_hessian_is_the_per_sample_sum_it_stands_for():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=gen, dtype=torch.double)
    p = torch.randn(50, 4, generator=gen, dtype=torch.double).softmax(1)
    expected = torch.zeros(7, 4, 7, 4, dtype=torch.double)
    for xn, pn in zip(x, p):  # the definition, one sample at a time: x x^T (kron) (diag(p) - p p^T)
        curvature = torch.diag(pn) - torch.outer(pn, pn)
        expected += torch.outer(xn, xn)[:, None, :, None] * curvature[None, :, None, :]
    assert torch.allclose(logistic_hessian(x, p), expected, atol=1e-12)
