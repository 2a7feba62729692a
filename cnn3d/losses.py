"""Training losses, each a pure function of tensors, and their weighted sum.

Shapes: ``pred`` and ``target`` are ``[B, T]`` (student output, teacher embedding).
No term rewards a worse reconstruction: every term is >= 0 and the reconstruction
terms are zero exactly when ``pred == target``; diversity and triplet are zero
then too; sparsity and load balance do not look at the reconstruction at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the teacher embedding."""
    return F.mse_loss(pred, target)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(pred, target)``, averaged over the batch (0 when directions match)."""
    return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()


def _pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=-1)
    return x @ x.T


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return matrix[~torch.eye(n, dtype=torch.bool, device=matrix.device)]


def diversity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Penalise outputs that are more alike than their targets (a batch collapsing onto one vector).

    ``mean(relu(cos(pred_i, pred_j) - cos(target_i, target_j))^2)`` over pairs i != j:
    zero when the outputs are at least as spread as the teacher's, and exactly zero
    at perfect reconstruction, so it never fights the reconstruction terms.
    """
    if pred.shape[0] < 2:
        return pred.new_zeros(())
    excess = _off_diagonal(_pairwise_cosine(pred)) - _off_diagonal(_pairwise_cosine(target)).detach()
    return F.relu(excess).pow(2).mean()


def sparsity_loss(activity: torch.Tensor) -> torch.Tensor:
    """L1 on cell activity: ``activity`` is the mean |state| over steps (a scalar); pushes towards sparse states."""
    return activity


def load_balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Expert load balance from ``gates`` ``[B, E, D, H, W]`` (per-cell expert weights).

    ``E * sum_e usage_e^2 - 1`` is 0 when experts are used equally overall and grows
    as one expert takes everything (to E - 1). Each cell stays free to specialise, but
    the overall usage is pushed to uniform; weight 0 lets the gate favour experts.
    """
    usage = gates.mean(dim=(0, 2, 3, 4))  # [E]
    return usage.numel() * usage.pow(2).sum() - 1.0


def triplet_loss(pred: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Semantic alignment from teacher-space neighbours.

    For each anchor i: the positive is its nearest neighbour in the batch by
    teacher cosine, the negative its least similar. Loss
    ``relu(margin + cos(pred_i, pred_neg) - cos(pred_i, pred_pos))``.
    """
    n = pred.shape[0]
    if n < 3:
        return pred.new_zeros(())
    teacher_sim = _pairwise_cosine(target).detach()
    eye = torch.eye(n, dtype=torch.bool, device=pred.device)
    positive = teacher_sim.masked_fill(eye, float("-inf")).argmax(dim=1)
    negative = teacher_sim.masked_fill(eye, float("inf")).argmin(dim=1)
    student_sim = _pairwise_cosine(pred)
    rows = torch.arange(n, device=pred.device)
    return F.relu(margin + student_sim[rows, negative] - student_sim[rows, positive]).mean()


def total_loss(
    weights: LossConfig,
    pred: torch.Tensor,
    target: torch.Tensor,
    activity: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum and the unweighted components (``loss_<name>``); zero-weight terms are skipped."""
    terms = {
        "reconstruction": lambda: reconstruction_loss(pred, target),
        "cosine": lambda: cosine_loss(pred, target),
        "diversity": lambda: diversity_loss(pred, target),
        "sparsity": lambda: sparsity_loss(activity),
        "load_balance": lambda: load_balance_loss(gates),
        "triplet": lambda: triplet_loss(pred, target, weights.triplet_margin),
    }
    parts = {name: fn() for name, fn in terms.items() if getattr(weights, name) > 0}
    total = sum((getattr(weights, name) * value for name, value in parts.items()), pred.new_zeros(()))
    return total, {f"loss_{name}": value.detach() for name, value in parts.items()}
