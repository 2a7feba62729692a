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

import math
import time
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
BOOTSTRAP_SAMPLES = 50  # resamples for each excess's std: ~10 % relative error on the std, half the cost of 100
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
    """Run ``model`` (in eval mode) over ``inputs [n, T]`` and keep what the emergence metrics read.

    Batches of twice ``batch_size`` (the training batch): a forward pass without gradients holds far less than a
    training step, and larger batches amortise the step's per-call overhead (~15 % faster at 128 than at 32, 8^3).
    """
    was_training = model.training
    model.eval()
    parts = []
    batch_size *= 2
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


def verdict(name: str, metrics: dict[str, float]) -> str:
    """A plain reading of ``metrics[name]`` against its nulls: beyond both, short of one, or indistinguishable.

    Either reading needs the excess over the larger null (in the metric's emergent direction) to be more than two
    bootstrap standard deviations from zero; "less structure than" names that null (the other may still be beaten).
    """
    ex, sd = metrics.get(f"{name}_excess", float("nan")), metrics.get(f"{name}_excess_std", 0.0)
    if ex > 2 * sd and ex > 0:
        return "beyond both nulls"
    if ex < -2 * sd and ex < 0:
        sign = DIRECTION[name]
        untrained, shuffled = metrics.get(f"{name}_null_untrained"), metrics.get(f"{name}_null_shuffled")
        if untrained is None or shuffled is None:
            return "less structure than a null"
        return "less structure than the untrained cube" if sign * untrained >= sign * shuffled \
            else "less structure than the shuffled control"
    return "indistinguishable from its nulls"


# --------------------------------------------------------------------------- the bootstrap, vectorised

BOOT_CHUNK = 10  # resamples per batched step: bounds the [chunk, n, n] intermediates (~20 MB at n = 512)


def resample_counts(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """``[B, n]`` double: how often each sentence appears in each resample (a resample is a multiset of rows)."""
    return torch.stack([torch.bincount(r, minlength=n) for r in rows]).double()


def _pair_index(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangle (diagonal included) pair list ``[2, P]`` and ``[n, n]`` map from (i, j) to its pair."""
    iu = torch.triu_indices(n, n, offset=0)
    index = torch.empty(n, n, dtype=torch.long)
    index[iu[0], iu[1]] = torch.arange(iu.shape[1])
    index[iu[1], iu[0]] = torch.arange(iu.shape[1])
    return iu, index


def _pair_counts(w: torch.Tensor, iu: torch.Tensor) -> torch.Tensor:
    """``[B, P]``: how many unordered position pairs of each resample fall on each sentence pair.

    Two positions holding the same sentence i make a pair (i, i): ``w_i (w_i - 1) / 2`` of them.
    """
    i, j = iu
    wi = w.index_select(1, i)  # index_select: much faster than advanced indexing along dim 1
    return torch.where(i == j, wi * (wi - 1) / 2, wi * w.index_select(1, j))


def _midranks(order: tuple[torch.Tensor, torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` ranks of each sentence pair among a resample's position pairs, given multiplicities ``m [B, P]``.

    The pairs are sorted once (``order``: the sort and its inverse); a pair's copies share the
    mean of their ranks (mid-ranks), which is what Spearman's rho uses for ties.
    """
    ms = m.index_select(1, order[0])
    mid = ms.cumsum(1) - (ms - 1) / 2
    return mid.index_select(1, order[1])


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching rows of ``a`` and ``b`` ``[B, P]``."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom))


def _gaussian_mi_batched(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """``gaussian_mi_of_components`` for a batch ``za [B, n, ka]``, ``zb [B, n, kb]`` -> ``[B]``."""
    if za.shape[2] == 0 or zb.shape[2] == 0:
        return za.new_zeros(za.shape[0])
    z = torch.cat([za, zb], dim=2)
    z = z - z.mean(1, keepdim=True)
    cov = z.transpose(1, 2) @ z / (z.shape[1] - 1)
    eye = 1e-9 * torch.eye(cov.shape[1], dtype=cov.dtype)
    ka = za.shape[2]

    def logdet(c):
        return torch.linalg.slogdet(c + eye[: c.shape[1], : c.shape[1]]).logabsdet

    return (0.5 * (logdet(cov[:, :ka, :ka]) + logdet(cov[:, ka:, ka:]) - logdet(cov))).clamp_min(0)


@dataclass
class Resampled:
    """What the bootstrap reads of one cube's responses, reduced once so every resample is a few O(n^2) ops.

    Each resample is given by its row counts ``w`` (``resample_counts``); the metrics below are
    exactly those of ``emergence_values(r, teacher, rows)`` (the rows repeated as counted), except
    that RSA ranks tied copies by their mid-rank instead of by order.
    """

    gram: torch.Tensor  # [n, n] back-layer states' Gram matrix (double)
    cells: torch.Tensor  # [n, cells] |response| (double)
    usage: torch.Tensor  # [n, E]
    sparsity: torch.Tensor  # [n]
    prep: Prepared
    pairs: tuple[torch.Tensor, torch.Tensor]  # sentence pairs [2, P] (diagonal included) and the [n, n] map to them
    teacher_order: tuple[torch.Tensor, torch.Tensor]  # [P] the pairs sorted by the teacher's similarity, and its inverse
    student_order: tuple[torch.Tensor, torch.Tensor]  # [P] ... by the student's

    @classmethod
    def of(cls, r: CubeResponses, prep: Prepared) -> Resampled:
        x = r.back_states.double()
        iu, index = _pair_index(len(r))
        order = [(o, o.argsort()) for o in (s[iu[0], iu[1]].argsort() for s in (prep.teacher_sims, prep.student_sims))]
        return cls(x @ x.T, r.cell_response.double().abs(), r.usage.double(), r.sparsity.double(), prep,
                   (iu, index), *order)

    def cube_metrics(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four metrics read from the cube's own states, ``[B]`` each, for counts ``w [B, n]``."""
        n = w.shape[1]
        # participation ratio (tr C)^2 / tr C^2 of the rows weighted by w, centred at their weighted mean:
        # with K = centred Gram, tr C = sum_i w_i K_ii and tr C^2 = sum_ij w_i w_j K_ij^2 (no eigendecomposition)
        a = w @ self.gram / n  # [B, n]: x_i . mean
        b = (a * w).sum(1) / n  # [B]: mean . mean
        diag = self.gram.diagonal()
        eff = []
        for lo in range(0, w.shape[0], BOOT_CHUNK):
            wc, ac, bc = w[lo : lo + BOOT_CHUNK], a[lo : lo + BOOT_CHUNK], b[lo : lo + BOOT_CHUNK]
            k = self.gram - ac[:, :, None] - ac[:, None, :] + bc[:, None, None]  # [chunk, n, n]
            tr = (wc * (diag - 2 * ac + bc[:, None])).sum(1)
            tr2 = torch.einsum("bi,bij,bj->b", wc, k.pow(2), wc)
            eff.append(torch.where(tr2 > 0, tr.pow(2) / tr2.clamp_min(1e-300), torch.zeros_like(tr)))
        mean, mean_sq = w @ self.cells / n, w @ self.cells.pow(2) / n  # [B, cells]
        active = mean_sq > 0
        s = (1 - mean.pow(2) / mean_sq.clamp_min(1e-300)) / (1 - 1 / n)
        spec = torch.where(active, s, torch.zeros_like(s)).sum(1) / active.sum(1).clamp_min(1)
        p = w @ self.usage  # [B, E]
        p = p / p.sum(1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(p.shape[1]) if p.shape[1] > 1 else p[:, 0] * 0
        return {"effective_dim": torch.cat(eff), "cell_specialization": spec, "expert_usage_entropy": entropy,
                "activation_sparsity": w @ self.sparsity / n}


def bootstrap_values(cube: Resampled, rows: list[torch.Tensor], control: Resampled | None = None,
                     perms: list[torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every metric of ``cube`` on every resample (``[B]`` tensors), and, given ``control`` and ``perms``,
    every shuffled-control value on the same resamples (else an empty dict).

    ``rows[b]`` are resample b's rows; ``perms[b]`` the permutation of its positions that the
    permutation nulls use (the back face, the student, paired with permuted positions).
    """
    n = cube.gram.shape[0]
    w = resample_counts(rows, n)
    idx = torch.stack(rows)  # [B, n]
    raw = cube.cube_metrics(w)
    za, zb = cube.prep.za, cube.prep.zb
    raw["mutual_info_front_back"] = _gaussian_mi_batched(za[idx], zb[idx])
    shuffled: dict[str, torch.Tensor] = {}
    pidx = None
    if control is not None and perms is not None:
        shuffled = control.cube_metrics(w)
        pidx = torch.gather(idx, 1, torch.stack(perms))  # [B, n]: the rows at the permuted positions
        shuffled["mutual_info_front_back"] = _gaussian_mi_batched(za[idx], zb[pidx])
    iu, pair_index = cube.pairs
    m = _pair_counts(w, iu)  # [B, P]
    ia, ib = torch.triu_indices(n, n, offset=1)  # position pairs a < b
    rsa_raw, rsa_shuffled = [], []
    for lo in range(0, len(rows), BOOT_CHUNK):
        mc = m[lo : lo + BOOT_CHUNK]
        rank_t, rank_s = _midranks(cube.teacher_order, mc), _midranks(cube.student_order, mc)
        # Spearman over a resample's position pairs = the pair-count-weighted Pearson of the mid-ranks
        weights = mc / mc.sum(1, keepdim=True)
        dt = rank_t - (weights * rank_t).sum(1, keepdim=True)
        ds = rank_s - (weights * rank_s).sum(1, keepdim=True)
        cov = (weights * dt * ds).sum(1)
        var = (weights * dt.pow(2)).sum(1) * (weights * ds.pow(2)).sum(1)
        rsa_raw.append(torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), torch.zeros_like(cov)))
        if pidx is not None:  # the teacher's pair at positions (a, b) against the student's at the permuted ones
            ic, pc = idx[lo : lo + BOOT_CHUNK], pidx[lo : lo + BOOT_CHUNK]
            t_pairs = pair_index.take(ic.index_select(1, ia) * n + ic.index_select(1, ib))
            s_pairs = pair_index.take(pc.index_select(1, ia) * n + pc.index_select(1, ib))
            rsa_shuffled.append(_pearson_rows(torch.gather(rank_t, 1, t_pairs), torch.gather(rank_s, 1, s_pairs)))
    raw["rsa_teacher"] = torch.cat(rsa_raw)
    if rsa_shuffled:
        shuffled["rsa_teacher"] = torch.cat(rsa_shuffled)
    return raw, shuffled


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
    """What one training run compares its trained cube with; built from the untrained cube's responses.

    ``untrained`` is the untrained cube's responses on the validation sentences, ``control_inputs``
    the structureless inputs the trained cube is run on, ``boot_rows`` the bootstrap resamples and
    ``untrained_boot`` the untrained metrics on each (``[B]`` per metric, computed once).
    """

    teacher: torch.Tensor  # [n, T]
    untrained: CubeResponses
    untrained_values: dict[str, float]
    control_inputs: torch.Tensor  # [n, T]
    boot_rows: list[torch.Tensor]
    untrained_boot: dict[str, torch.Tensor]
    seed: int
    seconds: float = 0.0  # wall time spent building and comparing these nulls (the cost benchmark reads it)

    @classmethod
    def build(cls, untrained_model, teacher: torch.Tensor, batch_size: int, device: torch.device, dtype=None,
              seed: int = 0, bootstrap: int = BOOTSTRAP_SAMPLES) -> EmergenceNulls:
        """Run the untrained cube once over ``teacher [n, T]`` and fix the bootstrap resamples."""
        start = time.perf_counter()
        untrained = collect_responses(untrained_model, teacher, batch_size, device, dtype)
        nulls = cls.from_responses(untrained, teacher, seed, bootstrap)
        nulls.seconds = time.perf_counter() - start
        return nulls

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
            boot, _ = bootstrap_values(Resampled.of(untrained, prep), rows)
            return cls(
                teacher=teacher, untrained=untrained, untrained_values=emergence_values(untrained, teacher),
                control_inputs=structureless_inputs(teacher, seed), boot_rows=rows, untrained_boot=boot, seed=seed,
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
        perms = [torch.randperm(len(trained), generator=gen) for _ in self.boot_rows]
        cube = Resampled.of(trained, prep)
        boot_raw, boot_shuffled = bootstrap_values(cube, self.boot_rows, Resampled.of(control, prep), perms)
        out: dict[str, float] = {}
        for name in EMERGENCE_NAMES:
            out[f"{name}_null_untrained"] = self.untrained_values[name]
            out[f"{name}_null_shuffled"] = shuffled[name]
            out[f"{name}_excess"] = excess(name, raw[name], self.untrained_values[name], shuffled[name])
            sign = DIRECTION[name]
            samples = sign * boot_raw[name] - torch.maximum(sign * self.untrained_boot[name], sign * boot_shuffled[name])
            out[f"{name}_excess_std"] = samples.std().item() if samples.numel() > 1 else 0.0
        return out


def emergence_with_nulls(model, trained: CubeResponses, nulls: EmergenceNulls, batch_size: int,
                         device: torch.device, dtype=None) -> dict[str, float]:
    """Nulls, excess and uncertainty for a trained ``model`` whose validation responses are ``trained``."""
    start = time.perf_counter()
    control = collect_responses(model, nulls.control_inputs[: len(trained)], batch_size, device, dtype)
    out = nulls.compare(trained, control)
    nulls.seconds += time.perf_counter() - start
    return out
