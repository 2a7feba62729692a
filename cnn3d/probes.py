"""Linear probes in torch (no scikit-learn): logistic regression for labels, ridge for the teacher embedding.

Probes are fitted on a train split and scored on a held-out split. Features are standardised
with the train split's mean and std, then reduced to at most ``MAX_PROBE_FEATURES`` principal
components of the train split (a 1,024-wide layer with a few hundred sentences would otherwise
be fitted perfectly by any probe); the same map is applied to the held-out split.

A labelled probing set is either built in (the synthetic generator's exact labels: tense,
plural subject, human subject, number of clauses) or a user file with ``text`` and ``label``
columns (.csv, .tsv or .jsonl).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .analysis import single_thread
from .errors import UserError
from .synthetic import PROBE_LABELS, generate_examples, probe_labels

MAX_PROBE_FEATURES = 64
NEWTON_STEPS = 30
LOGISTIC_WEIGHT_DECAY = 1e-3
RIDGE_ALPHA = 1.0  # ridge penalty relative to the mean eigenvalue of the train Gram matrix


@dataclass
class ProbingSet:
    """Sentences with one or more label columns; ``train``/``test`` are row indices of a fixed split."""

    texts: list[str]
    labels: dict[str, list[str]]  # task -> label per sentence
    train: torch.Tensor
    test: torch.Tensor
    source: str

    def classes(self, task: str) -> list[str]:
        return sorted(set(self.labels[task]))


def _split(n: int, seed: int, test_fraction: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(n * (1 - test_fraction))))
    return order[:cut].sort().values, order[cut:].sort().values


def builtin_probing_set(n: int = 600, seed: int = 7) -> ProbingSet:
    """``n`` synthetic sentences with the generator's exact labels (``cnn3d.synthetic.PROBE_LABELS``)."""
    examples = generate_examples(n, seed)
    labels = {task: [probe_labels(e)[task] for e in examples] for task in PROBE_LABELS}
    train, test = _split(n, seed)
    return ProbingSet([e.text for e in examples], labels, train, test, f"synthetic generator ({n} sentences)")


def read_probing_file(path: str | Path, seed: int = 7) -> ProbingSet:
    """A user probing file: .csv/.tsv with a header, or .jsonl; columns ``text`` and ``label``.

    Errors (one line, ``UserError``): missing file, no ``text``/``label`` column, fewer than two
    classes, or too few rows to hold out a test split.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"probing file {path} does not exist; give a .csv/.tsv/.jsonl with text and label columns")
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"probing file {path} holds no rows; it needs text and label columns")
    for column in ("text", "label"):
        if column not in rows[0]:
            raise UserError(f"probing file {path} has no '{column}' column (columns: {', '.join(rows[0])}); "
                            "it needs text and label columns")
    rows = [r for r in rows if str(r.get("text") or "").strip() and str(r.get("label") or "").strip()]
    labels = [str(r["label"]).strip() for r in rows]
    if len(set(labels)) < 2:
        raise UserError(f"probing file {path}: labels have {len(set(labels))} class; a probe needs at least two")
    if len(rows) < 10:
        raise UserError(f"probing file {path} has {len(rows)} labelled rows; a probe needs at least 10")
    train, test = _split(len(rows), seed)
    return ProbingSet([str(r["text"]).strip() for r in rows], {"label": labels}, train, test, str(path))


def _read_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"probing file {path} line {i} is not JSON") from None
            if not isinstance(row, dict):
                raise UserError(f"probing file {path} line {i} is not a JSON object with text and label")
            rows.append(row)
        return rows
    if path.suffix not in (".csv", ".tsv"):
        raise UserError(f"probing file {path} must be .csv, .tsv or .jsonl")
    return list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))


# --------------------------------------------------------------------------- feature maps


def fit_features(train: torch.Tensor, test: torch.Tensor, k: int = MAX_PROBE_FEATURES) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise by the train split, then project both splits on the train split's top-``k`` components."""
    train, test = train.double().flatten(1), test.double().flatten(1)
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-8)
    train, test = (train - mean) / std, (test - mean) / std
    if train.shape[1] > k:
        _, _, v = torch.linalg.svd(train, full_matrices=False)
        basis = v[: min(k, v.shape[0])].T  # [features, k]
        train, test = train @ basis, test @ basis
        scale = train.std(0, keepdim=True).clamp_min(1e-8)
        train, test = train / scale, test / scale
    return train, test


def logistic_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   classes: int, steps: int = NEWTON_STEPS) -> float:
    """Held-out accuracy of multinomial logistic regression with an L2 penalty, fitted by damped Newton steps.

    Written out by hand (gradient and Hessian of the mean cross-entropy) rather than with
    ``torch.optim``: the features are at most ``MAX_PROBE_FEATURES`` wide, so the Hessian is small
    and a few Newton steps converge where first-order steps would need hundreds.
    """
    x = torch.cat([train_x.double(), torch.ones(train_x.shape[0], 1, dtype=torch.double)], dim=1)  # [n, d+1]
    n, d = x.shape
    onehot = F.one_hot(train_y, classes).double()  # [n, K]
    weight = torch.zeros(d, classes, dtype=torch.double)
    penalty = torch.full((d, 1), LOGISTIC_WEIGHT_DECAY, dtype=torch.double)
    penalty[-1] = 0.0  # the bias is not penalised

    def loss_of(w):
        return F.cross_entropy(x @ w, train_y).item() + (penalty * w.pow(2)).sum().item()

    loss = loss_of(weight)
    for _ in range(steps):
        p = (x @ weight).softmax(dim=1)  # [n, K]
        grad = x.T @ (p - onehot) / n + 2 * penalty * weight  # [d, K]
        # Hessian [d*K, d*K]: sum_i x_i x_i^T (kron) (diag(p_i) - p_i p_i^T) / n, plus the penalty
        hessian = logistic_hessian(x, p).reshape(d * classes, d * classes) / n
        hessian += torch.diag((2 * penalty).expand(d, classes).reshape(-1) + 1e-6)
        step = torch.linalg.solve(hessian, grad.reshape(-1)).reshape(d, classes)
        scale = 1.0
        while scale > 1e-3:  # backtrack until the loss does not rise
            candidate = weight - scale * step
            new_loss = loss_of(candidate)
            if new_loss <= loss:
                break
            scale /= 2
        else:
            break
        converged = loss - new_loss < 1e-9
        weight, loss = candidate, new_loss
        if converged:
            break
    test = torch.cat([test_x.double(), torch.ones(test_x.shape[0], 1, dtype=torch.double)], dim=1)
    return (test @ weight).argmax(1).eq(test_y).double().mean().item()


def logistic_hessian(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_n x[n, i] x[n, j] (diag(p[n]) - p[n] p[n]^T)[a, b]`` as ``[d, K, d, K]`` (``x [n, d]``, ``p [n, K]``).

    One matmul over the samples: x^T @ (x (outer) curvature). The three-operand einsum it replaces
    contracted in a slower order and took most of the report's probe time (BENCHMARKS.md).
    """
    n, d = x.shape
    k = p.shape[1]
    curvature = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [n, K, K]
    weighted = (x.unsqueeze(2) * curvature.reshape(n, 1, k * k)).reshape(n, d * k * k)  # [n, d*K*K]
    return (x.T @ weighted).view(d, d, k, k).permute(0, 2, 1, 3)  # [i, j, a, b] -> [i, a, j, b]


def chance_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy of always predicting the train split's most frequent class."""
    majority = torch.bincount(train_y).argmax()
    return test_y.eq(majority).double().mean().item()


def ridge_probe_cosine(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       alpha: float = RIDGE_ALPHA) -> float:
    """Mean cosine between ``test_y [m, T]`` and a ridge map from ``test_x`` fitted on the train split.

    Solved in the dual (``n x n``), since layers are often wider than the train split is long.
    """
    with single_thread():
        return _ridge(train_x, train_y, test_x, test_y, alpha)


def _ridge(train_x, train_y, test_x, test_y, alpha: float) -> float:
    x, xt = train_x.double().flatten(1), test_x.double().flatten(1)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-8)
    x, xt = (x - mean) / std, (xt - mean) / std
    y = train_y.double()
    y_mean = y.mean(0, keepdim=True)
    gram = x @ x.T
    penalty = alpha * gram.diagonal().mean().clamp_min(1e-12)
    coef = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), y - y_mean)
    pred = xt @ (x.T @ coef) + y_mean
    return F.cosine_similarity(pred, test_y.double(), dim=-1).mean().item()


def encode_labels(values: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Class indices ``[n]`` and the sorted class names."""
    names = sorted(set(values))
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[v] for v in values]), names


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                   shuffle_seed: int | None = None) -> float:
    """Held-out accuracy of a logistic probe on ``features [n, ...]``; ``shuffle_seed`` permutes the train labels.

    With shuffled labels a probe can only learn noise, so it should score at chance: the control.
    """
    train_y = labels[train]
    if shuffle_seed is not None:
        train_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(shuffle_seed))]
    with single_thread():
        tx, vx = fit_features(features[train], features[test])
        return logistic_probe(tx, train_y, vx, labels[test], int(labels.max()) + 1)
