"""Quality, baseline and emergence metrics; pure functions on tensors, checked on data with known answers.

Shapes: ``[N, F]`` means N inputs (validation sentences) by F features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mean_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    return F.cosine_similarity(pred, target, dim=-1).mean().item()


def baseline_mean_cosine(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cosine of predicting the train-split mean embedding for every validation sentence."""
    return mean_cosine(train.mean(0, keepdim=True).expand_as(val), val)


def baseline_pca_cosine(train: torch.Tensor, val: torch.Tensor, k: int) -> float:
    """Best linear reconstruction through ``k`` numbers: PCA fitted on train, cosine on val.

    This is the ceiling for any student whose only path is a k-number face and
    linear maps in and out; a student above it has learned something non-linear.
    """
    mean = train.mean(0, keepdim=True)
    k = min(k, train.shape[1], train.shape[0])
    _, _, v = torch.linalg.svd((train - mean).double(), full_matrices=False)
    basis = v[:k].to(train.dtype)  # [k, T]
    recon = (val - mean) @ basis.T @ basis + mean
    return mean_cosine(recon, val)


def effective_dim(x: torch.Tensor) -> float:
    """Participation ratio of the covariance spectrum, ``(sum l)^2 / sum l^2``; rank-k isotropic data gives ~k."""
    x = x.double() - x.double().mean(0, keepdim=True)
    eig = torch.linalg.svdvals(x).pow(2)
    total = eig.sum()
    return 0.0 if total <= 0 else (total.pow(2) / eig.pow(2).sum()).item()


def _top_components(x: torch.Tensor, k: int) -> torch.Tensor:
    x = x.double() - x.double().mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-6 if s.numel() else s.bool()
    k = min(k, int(keep.sum()))
    return u[:, :k] * s[:k]


def mutual_info_gaussian(a: torch.Tensor, b: torch.Tensor, k: int = 8) -> float:
    """Mutual information (nats) between two representations, Gaussian estimator.

    Each side is reduced to its top-``k`` principal components, then
    ``I = 0.5 * (logdet S_a + logdet S_b - logdet S_ab)`` with the sample
    covariances. Exact for jointly Gaussian data; a lower bound on dependence
    for others (it sees linear relations only). Independent inputs give ~0
    (a small positive bias of about k^2 / (2N)).
    """
    return gaussian_mi_of_components(_top_components(a, k), _top_components(b, k))


def gaussian_mi_of_components(za: torch.Tensor, zb: torch.Tensor) -> float:
    """Gaussian MI (nats) between already-reduced ``za [N, ka]`` and ``zb [N, kb]`` (re-centred here)."""
    if za.shape[1] == 0 or zb.shape[1] == 0:
        return 0.0
    za, zb = za - za.mean(0, keepdim=True), zb - zb.mean(0, keepdim=True)
    joint = torch.cat([za, zb], dim=1)
    n = joint.shape[0]

    def logdet(z):
        cov = z.T @ z / (n - 1)
        return torch.linalg.slogdet(cov + 1e-9 * torch.eye(cov.shape[0], dtype=cov.dtype)).logabsdet

    return max(0.0, 0.5 * (logdet(za) + logdet(zb) - logdet(joint)).item())


def cell_specialization(responses: torch.Tensor) -> float:
    """How selectively cells respond across inputs: mean lifetime sparseness (Treves-Rolls).

    ``responses`` ``[N inputs, M cells]`` of non-negative response strengths. Per cell
    ``S = (1 - mean(r)^2 / mean(r^2)) / (1 - 1/N)``: 0 for a cell that responds
    equally to every input, 1 for one that responds to a single input.
    """
    r = responses.double().abs()
    n = r.shape[0]
    mean_sq = r.pow(2).mean(0)
    active = mean_sq > 0
    if n < 2 or not active.any():
        return 0.0
    s = (1 - r.mean(0)[active].pow(2) / mean_sq[active]) / (1 - 1 / n)
    return s.mean().item()


def usage_entropy(usage: torch.Tensor) -> float:
    """Entropy of expert usage shares, normalised to [0, 1] (1 = all experts used equally)."""
    p = usage.double() / usage.sum()
    if p.numel() < 2:
        return 0.0
    h = -(p * p.clamp_min(1e-12).log()).sum()
    return (h / math.log(p.numel())).item()


def activation_sparsity(states: torch.Tensor, threshold: float = 0.01) -> float:
    """Share of state entries with ``|s| < threshold``."""
    return (states.abs() < threshold).double().mean().item()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(order, dtype=torch.double)
    ranks[order] = torch.arange(x.numel(), dtype=torch.double)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by order)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return 0.0 if denom == 0 else (ra @ rb / denom).item()


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` pairwise cosine similarities of the rows of ``x`` (double)."""
    x = F.normalize(x.double(), dim=-1)
    return x @ x.T


def rsa(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Representational similarity: Spearman correlation of the pairwise cosine matrices (upper triangles)."""
    return rsa_of_matrices(similarity_matrix(student), similarity_matrix(teacher))


def rsa_of_matrices(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of the upper triangles of two ``[N, N]`` similarity matrices."""
    n = a.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return spearman(a[iu[0], iu[1]], b[iu[0], iu[1]])
