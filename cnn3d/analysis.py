"""Emergence figures beside their nulls: the untrained cube and a shuffled control, measured in the same run.

Every emergence metric of ``cnn3d.metrics`` is reported four ways (``<name>`` is the metric)::

    <name>                    the trained cube on the validation sentences
    <name>_null_untrained     the same metric on the untrained cube (same seed, initial weights)
    <name>_null_shuffled      the same metric on a control that destroys what the metric claims to find
    <name>_excess             sign * (raw - the null closest to the emergent direction)
    <name>_excess_std         bootstrap standard deviation of the excess over validation sentences

``sign`` is +1 where a larger value means more structure and -1 where a smaller one does
(``expert_usage_entropy``: a gate that picks experts per cell has lower usage entropy than
a uniform one), so a positive excess always means "beyond both nulls".

The shuffled controls, one per metric (``SHUFFLES``):

- ``mutual_info_front_back``: the back face permuted against the front face (sentence
  pairing destroyed). This also removes the Gaussian estimator's small-sample bias
  (about k^2/2N nats), which both sides share.
- ``rsa_teacher``: the student's sentences permuted against the teacher's.
- ``effective_dim``, ``cell_specialization``, ``activation_sparsity``, ``expert_usage_entropy``:
  the trained cube run on *structureless inputs*: the validation teacher vectors with every
  coordinate permuted independently across sentences (each coordinate keeps its values, the
  sentences lose their meaning and their correlations). What the cube shows on those is
  organisation it produces for any input of the same per-coordinate statistics, not for meaning.

The bootstrap resamples validation sentences with replacement (the same rows for the trained
cube, the untrained cube and the control; the permutation nulls redraw their permutation for
every resample), so ``_excess_std`` includes the null's own noise.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import metrics as M
from .device import autocast

EMERGENCE_NAMES = (
    "effective_dim", "mutual_info_front_back", "cell_specialization", "expert_usage_entropy",
    "activation_sparsity", "rsa_teacher",
)
DIRECTION = {name: 1.0 for name in EMERGENCE_NAMES} | {"expert_usage_entropy": -1.0}
SHUFFLES = {
    "effective_dim": "structureless inputs (each teacher coordinate permuted across sentences)",
    "mutual_info_front_back": "back face permuted against front face",
    "cell_specialization": "structureless inputs (each teacher coordinate permuted across sentences)",
    "expert_usage_entropy": "structureless inputs (each teacher coordinate permuted across sentences)",
    "activation_sparsity": "structureless inputs (each teacher coordinate permuted across sentences)",
    "rsa_teacher": "student sentences permuted against teacher sentences",
}
NULL_SUFFIXES = ("_null_untrained", "_null_shuffled", "_excess", "_excess_std")
BOOTSTRAP_SAMPLES = 100
MI_COMPONENTS = 8  # as in metrics.mutual_info_gaussian's default
POINT_PERMUTATIONS = 5  # permutations averaged for the reported permutation nulls
SPARSE_THRESHOLD = 0.01  # |s| below this counts as inactive (as in metrics.activation_sparsity)


def null_metric_names() -> tuple[str, ...]:
    """Every ``<metric><suffix>`` key this module adds to an epoch's metrics."""
    return tuple(f"{name}{suffix}" for name in EMERGENCE_NAMES for suffix in NULL_SUFFIXES)


# --------------------------------------------------------------------------- what the metrics read


@dataclass
class CubeResponses:
    """Per-sentence readings of one forward pass, all ``[n, ...]`` over the same n sentences.

    Kept per sentence (not pooled) so a bootstrap can resample rows.
    """

    front: torch.Tensor  # [n, F*H*W] numbers injected at the front face
    back_face: torch.Tensor  # [n, F*H*W] numbers read from the back face
    back_states: torch.Tensor  # [n, C*H*W] state of the back layer z = D-1
    cell_response: torch.Tensor  # [n, cells] mean |state| over channels
    usage: torch.Tensor  # [n, E] gate weight per expert, averaged over cells
    sparsity: torch.Tensor  # [n] share of state entries with |s| < SPARSE_THRESHOLD
    pred: torch.Tensor  # [n, T] student output

    @classmethod
    def from_output(cls, out) -> CubeResponses:
        """Readings of one batch of ``StudentOutput`` (moved to CPU float)."""
        state = out.state.float()
        return cls(
            front=out.face_in.float().flatten(1).cpu(),
            back_face=out.face_out.float().flatten(1).cpu(),
            back_states=state[:, :, -1].flatten(1).cpu(),
            cell_response=state.abs().mean(1).flatten(1).cpu(),
            usage=out.gates.float().mean(dim=(2, 3, 4)).cpu(),
            sparsity=(state.abs() < SPARSE_THRESHOLD).float().flatten(1).mean(1).cpu(),
            pred=out.embedding.float().cpu(),
        )

    @classmethod
    def cat(cls, parts: list[CubeResponses], limit: int | None = None) -> CubeResponses:
        """Concatenate batches, keeping the first ``limit`` rows."""
        fields = cls.__dataclass_fields__
        return cls(**{f: torch.cat([getattr(p, f) for p in parts])[:limit] for f in fields})

    def __len__(self) -> int:
        return self.pred.shape[0]


@torch.no_grad()
def collect_responses(model, inputs: torch.Tensor, batch_size: int, device: torch.device, dtype=None) -> CubeResponses:
    """Run ``model`` (in eval mode) over ``inputs [n, T]`` and keep what the emergence metrics read."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, inputs.shape[0], batch_size):
        with autocast(device, dtype):
            out = model(inputs[start : start + batch_size].to(device))
        parts.append(CubeResponses.from_output(out))
    model.train(was_training)
    return CubeResponses.cat(parts)


def structureless_inputs(vectors: torch.Tensor, seed: int) -> torch.Tensor:
    """``[n, T]`` with every column permuted independently across rows (each coordinate keeps its values)."""
    gen = torch.Generator().manual_seed(seed)
    n, t = vectors.shape
    order = torch.argsort(torch.rand(n, t, generator=gen), dim=0)  # an independent permutation per column
    return torch.gather(vectors, 0, order)


# --------------------------------------------------------------------------- the metrics on a row subset


def _effective_dim(x: torch.Tensor) -> float:
    """Participation ratio through the n x n Gram matrix (same spectrum, cheaper when n < features)."""
    if x.shape[0] >= x.shape[1]:
        return M.effective_dim(x)
    x = x.double() - x.double().mean(0, keepdim=True)
    eig = torch.linalg.eigvalsh(x @ x.T).clamp_min(0)
    total = eig.sum()
    return 0.0 if total <= 0 else (total.pow(2) / eig.pow(2).sum()).item()


CUBE_METRICS: dict[str, Callable[[CubeResponses, torch.Tensor], float]] = {
    "effective_dim": lambda r, rows: _effective_dim(r.back_states[rows]),
    "cell_specialization": lambda r, rows: M.cell_specialization(r.cell_response[rows]),
    "expert_usage_entropy": lambda r, rows: M.usage_entropy(r.usage[rows].mean(0)),
    "activation_sparsity": lambda r, rows: r.sparsity[rows].double().mean().item(),
}


@dataclass
class Prepared:
    """Full-sample reductions a bootstrap reuses: the MI estimator's principal components and the similarity matrices.

    Resampling rows of fixed components (rather than refitting PCA per resample) keeps 100
    resamples cheap; the components are those of the full validation sample.
    """

    za: torch.Tensor  # [n, k] front-face components
    zb: torch.Tensor  # [n, k] back-face components
    student_sims: torch.Tensor  # [n, n]
    teacher_sims: torch.Tensor  # [n, n]

    @classmethod
    def of(cls, r: CubeResponses, teacher: torch.Tensor, k: int = MI_COMPONENTS) -> Prepared:
        return cls(M._top_components(r.front, k), M._top_components(r.back_face, k),
                   M.similarity_matrix(r.pred), M.similarity_matrix(teacher))


def emergence_values(r: CubeResponses, teacher: torch.Tensor, rows: torch.Tensor | None = None,
                     prep: Prepared | None = None) -> dict[str, float]:
    """The six emergence metrics of ``r`` (``teacher [n, T]``): exact on all rows, or on resampled ``rows``."""
    if rows is None:
        out = {name: fn(r, torch.arange(len(r))) for name, fn in CUBE_METRICS.items()}
        out["mutual_info_front_back"] = M.mutual_info_gaussian(r.front, r.back_face, MI_COMPONENTS)
        out["rsa_teacher"] = M.rsa(r.pred, teacher)
        return out
    prep = prep or Prepared.of(r, teacher)
    out = {name: fn(r, rows) for name, fn in CUBE_METRICS.items()}
    out["mutual_info_front_back"] = M.gaussian_mi_of_components(prep.za[rows], prep.zb[rows])
    out["rsa_teacher"] = M.rsa_of_matrices(prep.student_sims[rows][:, rows], prep.teacher_sims[rows][:, rows])
    return out


def shuffled_values(r: CubeResponses, control: CubeResponses, teacher: torch.Tensor, rows: torch.Tensor,
                    gen: torch.Generator, repeats: int = 1, prep: Prepared | None = None) -> dict[str, float]:
    """The shuffled-control value of every metric on ``rows`` (see the module docstring).

    The permutation nulls are averaged over ``repeats`` permutations.
    """
    prep = prep or Prepared.of(r, teacher)
    out = {name: fn(control, rows) for name, fn in CUBE_METRICS.items()}
    mi, rs = [], []
    for _ in range(repeats):
        perm = rows[torch.randperm(len(rows), generator=gen)]
        mi.append(M.gaussian_mi_of_components(prep.za[rows], prep.zb[perm]))
        rs.append(M.rsa_of_matrices(prep.student_sims[perm][:, perm], prep.teacher_sims[rows][:, rows]))
    out["mutual_info_front_back"] = sum(mi) / repeats
    out["rsa_teacher"] = sum(rs) / repeats
    return out


def excess(name: str, raw: float, untrained: float, shuffled: float) -> float:
    """How far ``raw`` lies beyond both nulls in the metric's emergent direction (<= 0: not beyond)."""
    sign = DIRECTION[name]
    return sign * raw - max(sign * untrained, sign * shuffled)


# --------------------------------------------------------------------------- nulls for one run


@contextmanager
def single_thread():
    """Small SVDs and sorts run fastest on one thread; several threads on a busy machine slow them many-fold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class EmergenceNulls:
    """What one training run compares every validated epoch with; built once, before training.

    ``untrained`` is the untrained cube's responses on the validation sentences, ``control_inputs``
    the structureless inputs the trained cube is run on, ``boot_rows`` the bootstrap resamples and
    ``untrained_boot`` the untrained metrics on each (computed once, reused every epoch).
    """

    teacher: torch.Tensor  # [n, T]
    untrained: CubeResponses
    untrained_values: dict[str, float]
    control_inputs: torch.Tensor  # [n, T]
    boot_rows: list[torch.Tensor]
    untrained_boot: list[dict[str, float]]
    seed: int

    @classmethod
    def build(cls, untrained_model, teacher: torch.Tensor, batch_size: int, device: torch.device, dtype=None,
              seed: int = 0, bootstrap: int = BOOTSTRAP_SAMPLES) -> EmergenceNulls:
        """Run the untrained cube once over ``teacher [n, T]`` and fix the bootstrap resamples."""
        untrained = collect_responses(untrained_model, teacher, batch_size, device, dtype)
        return cls.from_responses(untrained, teacher, seed, bootstrap)

    @classmethod
    def from_responses(cls, untrained: CubeResponses, teacher: torch.Tensor, seed: int = 0,
                       bootstrap: int = BOOTSTRAP_SAMPLES) -> EmergenceNulls:
        """Nulls from already collected untrained responses (``teacher [n, T]`` on the same rows)."""
        gen = torch.Generator().manual_seed(seed)
        n = teacher.shape[0]
        rows = [torch.randint(n, (n,), generator=gen) for _ in range(bootstrap)]
        teacher = teacher.float().cpu()
        with single_thread():
            prep = Prepared.of(untrained, teacher)
            return cls(
                teacher=teacher, untrained=untrained, untrained_values=emergence_values(untrained, teacher),
                control_inputs=structureless_inputs(teacher, seed),
                boot_rows=rows, untrained_boot=[emergence_values(untrained, teacher, r, prep) for r in rows], seed=seed,
            )

    def compare(self, trained: CubeResponses, control: CubeResponses) -> dict[str, float]:
        """Both nulls, the excess and its bootstrap std per metric (the raw values are ``emergence_values``)."""
        with single_thread():
            return self._compare(trained, control)

    def _compare(self, trained: CubeResponses, control: CubeResponses) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        everything = torch.arange(len(trained))
        raw = emergence_values(trained, self.teacher)
        prep = Prepared.of(trained, self.teacher)
        shuffled = shuffled_values(trained, control, self.teacher, everything, gen, POINT_PERMUTATIONS, prep)
        boot: dict[str, list[float]] = {name: [] for name in EMERGENCE_NAMES}
        for rows, untrained in zip(self.boot_rows, self.untrained_boot):
            r = emergence_values(trained, self.teacher, rows, prep)
            s = shuffled_values(trained, control, self.teacher, rows, gen, 1, prep)
            for name in EMERGENCE_NAMES:
                boot[name].append(excess(name, r[name], untrained[name], s[name]))
        out: dict[str, float] = {}
        for name in EMERGENCE_NAMES:
            out[f"{name}_null_untrained"] = self.untrained_values[name]
            out[f"{name}_null_shuffled"] = shuffled[name]
            out[f"{name}_excess"] = excess(name, raw[name], self.untrained_values[name], shuffled[name])
            samples = torch.tensor(boot[name], dtype=torch.double)
            out[f"{name}_excess_std"] = samples.std().item() if samples.numel() > 1 else 0.0
        return out


def emergence_with_nulls(model, trained: CubeResponses, nulls: EmergenceNulls, batch_size: int,
                         device: torch.device, dtype=None) -> dict[str, float]:
    """Nulls, excess and uncertainty for a trained ``model`` whose validation responses are ``trained``."""
    control = collect_responses(model, nulls.control_inputs[: len(trained)], batch_size, device, dtype)
    return nulls.compare(trained, control)
