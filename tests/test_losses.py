import pytest
import torch

from cnn3d.config import Config, LossConfig, with_overrides
from cnn3d.losses import (
    cosine_loss,
    diversity_loss,
    load_balance_loss,
    reconstruction_loss,
    sparsity_loss,
    total_loss,
    triplet_loss,
)


def test_reconstruction_is_mse():
    pred, target = torch.zeros(2, 3), torch.ones(2, 3)
    assert reconstruction_loss(pred, target).item() == pytest.approx(1.0)
    assert reconstruction_loss(target, target).item() == 0.0


def test_cosine_loss_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert cosine_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(a, -a).item() == pytest.approx(2.0)
    assert cosine_loss(a, a.flip(1)).item() == pytest.approx(1.0)


def test_diversity_penalises_collapse_and_is_zero_at_perfect_reconstruction():
    target = torch.eye(4)
    assert diversity_loss(target, target).item() == 0.0
    collapsed = torch.ones(4, 4)  # every output the same vector: pairwise cosine 1 vs 0 for targets
    assert diversity_loss(collapsed, target).item() == pytest.approx(1.0)
    spread = torch.eye(4) * 3  # as spread as the targets
    assert diversity_loss(spread, target).item() == 0.0


def test_load_balance_and_sparsity_terms():
    uniform = torch.full((2, 3, 2, 2, 2), 1 / 3)
    assert load_balance_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)
    one_expert = torch.zeros(2, 3, 2, 2, 2)
    one_expert[:, 0] = 1.0
    assert load_balance_loss(one_expert).item() == pytest.approx(2.0)  # 3 * 1 - 1
    assert sparsity_loss(torch.tensor(0.5)).item() == pytest.approx(0.5)


def test_load_balance_switches_off_alone():
    """With load_balance=0 a one-expert gate costs nothing while sparsity still counts."""
    one_expert = torch.zeros(2, 3, 2, 2, 2)
    one_expert[:, 0] = 1.0
    weights = LossConfig(reconstruction=0.0, cosine=0.0, diversity=0.0, sparsity=1.0, load_balance=0.0)
    total, parts = total_loss(weights, torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor(0.25), one_expert)
    assert set(parts) == {"loss_sparsity"}
    assert total.item() == pytest.approx(0.25)


def test_deprecated_emergence_key_sets_both_new_weights():
    config = with_overrides(Config(), {"loss.emergence": 0.05})
    assert (config.loss.sparsity, config.loss.load_balance) == (0.05, 0.05)
    explicit = with_overrides(Config(), {"loss.emergence": 0.05, "loss.load_balance": 0.0})
    assert (explicit.loss.sparsity, explicit.loss.load_balance) == (0.05, 0.0)


def test_triplet_zero_when_student_matches_well_separated_teacher_and_positive_when_inverted():
    target = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9]])
    assert triplet_loss(target, target, margin=0.1).item() == 0.0
    # a student that puts each sentence next to its teacher-space opposite is penalised
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    inverted = torch.stack([a, b, a, b])  # anchor 0 now equals 2 (its teacher negative), not 1
    assert triplet_loss(inverted, target, margin=0.1).item() > 0.5


def test_total_loss_weights_and_skips_zero_terms():
    weights = LossConfig(reconstruction=2.0, cosine=0.0, diversity=0.0, sparsity=0.0, load_balance=0.0, triplet=0.0)
    pred, target = torch.zeros(3, 4), torch.ones(3, 4)
    gates = torch.full((3, 2, 1, 1, 1), 0.5)
    total, parts = total_loss(weights, pred, target, torch.tensor(0.0), gates)
    assert set(parts) == {"loss_reconstruction"}
    assert total.item() == pytest.approx(2.0)


def test_no_term_rewards_worse_reconstruction():
    """At the same activity and gates, moving pred away from target never lowers the total."""
    torch.manual_seed(0)
    target = torch.randn(8, 16)
    gates = torch.full((8, 3, 2, 2, 2), 1 / 3)
    weights = LossConfig(triplet=1.0)
    best, _ = total_loss(weights, target.clone(), target, torch.tensor(0.1), gates)
    for scale in (0.1, 0.5, 1.0):
        worse, _ = total_loss(weights, target + scale * torch.randn(8, 16), target, torch.tensor(0.1), gates)
        assert worse.item() > best.item()
