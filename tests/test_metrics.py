import math

import pytest
import torch

from cnn3d import metrics as M


def test_effective_dim_of_rank_k_data_is_k():
    torch.manual_seed(0)
    for k in (1, 4, 10):
        x = torch.randn(2000, k) @ torch.linalg.qr(torch.randn(32, 32))[0][:k]
        assert M.effective_dim(x) == pytest.approx(k, rel=0.15)


def test_mutual_information_independent_is_near_zero_and_dependent_is_large():
    torch.manual_seed(0)
    a, b = torch.randn(2000, 16), torch.randn(2000, 16)
    assert M.mutual_info_gaussian(a, b, k=4) < 0.05
    noisy_copy = a + 0.1 * torch.randn_like(a)
    assert M.mutual_info_gaussian(a, noisy_copy, k=4) > 5.0


def test_mutual_information_matches_gaussian_closed_form():
    torch.manual_seed(0)
    rho = 0.8
    x = torch.randn(20000, 1)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(20000, 1)
    assert M.mutual_info_gaussian(x, y, k=1) == pytest.approx(-0.5 * math.log(1 - rho**2), rel=0.05)


def test_rsa_identical_is_one_and_reversed_is_negative():
    torch.manual_seed(0)
    x = torch.randn(30, 8)
    assert M.rsa(x, x) == pytest.approx(1.0)
    assert M.spearman(torch.arange(10.0), -torch.arange(10.0)) == pytest.approx(-1.0)


def test_cell_specialization_extremes():
    uniform = torch.ones(10, 5)
    assert M.cell_specialization(uniform) == pytest.approx(0.0)
    one_hot = torch.eye(10)  # each cell responds to a single input
    assert M.cell_specialization(one_hot) == pytest.approx(1.0)


def test_usage_entropy():
    assert M.usage_entropy(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert M.usage_entropy(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-6)


def test_baselines():
    torch.manual_seed(0)
    basis = torch.randn(3, 20)
    train, val = torch.randn(500, 3) @ basis + 5, torch.randn(100, 3) @ basis + 5
    assert M.baseline_pca_cosine(train, val, k=3) == pytest.approx(1.0, abs=1e-5)
    assert M.baseline_pca_cosine(train, val, k=1) < 0.999
    assert M.baseline_mean_cosine(train, val) < M.baseline_pca_cosine(train, val, k=1)


def test_activation_sparsity():
    assert M.activation_sparsity(torch.tensor([0.0, 0.001, 0.5, 1.0])) == pytest.approx(0.5)
