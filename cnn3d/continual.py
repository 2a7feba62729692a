"""Continual learning: train on ``data.domains`` one stage after another, and measure forgetting.

``cnn3d.train.train`` hands a config whose ``data.domains`` holds two or more corpus
specs to ``train_continual``. Each stage runs the usual epoch plan (warm-up only
before the first stage) with the trainer's own ``_train_epoch`` on one domain, with a
fresh optimiser and learning-rate schedule. Remedies (``continual.*``, combinable):

* **EWC** (``ewc_lambda`` > 0): after every stage but the last, a diagonal Fisher
  ``F`` is estimated from squared mini-batch gradients of the training loss on that
  stage's data (``ewc_samples`` sentences), normalised to mean 1 over all parameters
  so that ``ewc_lambda`` does not depend on the loss scale, and summed over stages
  (online EWC). Later batches add ``ewc_lambda / 2 * sum(F * (theta - theta_prev)**2)``
  where ``theta_prev`` are the weights at the end of the previous stage.
* **Replay** (``replay_size`` > 0): after every stage a random subset of its teacher
  embeddings joins a buffer capped at ``replay_size`` rows, shared equally between
  the stages seen so far. In later stages ``round(replay_fraction * batch)`` rows of
  every batch are drawn from the buffer in place of the same number of new rows.
* **Freezing** (``freeze``): the named parameter groups (``transform``, ``gating``,
  ``local``, ``functional``, ``distant``) stop training after the first stage.
* **Joint** (``joint``): one stage on all domains at once, the upper bound.

After every stage each domain's validation split is scored: the matrix
``cl_matrix/<stage>/<domain>`` of mean cosine to the teacher (the ``val_cosine`` of
``cnn3d.train``), beside each domain's PCA ceiling ``cl_pca/<domain>`` and mean-vector
null ``cl_mean/<domain>`` fitted on that domain's training split. Derived, with ``A[s][d]``
the matrix (stages and domains 1-based, ``S`` stages, domain ``d`` learned in stage ``d``):

* ``avg_final_cosine = mean_d A[S][d]``;
* ``forgetting = mean over d < S of (max_{d <= s < S} A[s][d] - A[S][d])`` (0 for joint);
* ``new_domain_cosine = mean_d A[d][d]`` (plasticity; compare with single-domain runs);
* ``last_domain_cosine = A[S][S]``.

The usual metrics (``val_cosine``, decoding, emergence, baselines) of the final epoch
are measured on the union of all domains' validation splits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import metrics as M
from .checkpoint import save_checkpoint
from .config import Config, with_overrides
from .data import load_corpus
from .decode import PhraseBank
from .device import autocast, autocast_dtype, resolve_device
from .domains import domain_label
from .errors import UserError
from .losses import total_loss
from .model import LatticeStudent, build_model
from .train import (
    EpochReport,
    TrainingData,
    TrainResult,
    _log_epoch,
    _Loop,
    _memory_metric,
    _train_epoch,
    baselines,
    build_optimizer,
    epoch_plan,
    epoch_texts,
    evaluate,
    prepare_data,
)

__all__ = ["EWC", "Domain", "ReplayBatches", "ReplayBuffer", "continual_summary", "freeze_groups", "prepare_domains",
           "run_continual", "train_continual"]

logger = logging.getLogger(__name__)


@dataclass
class Domain:
    """One domain of the sequence: its label (a matrix column) and prepared embeddings."""

    label: str
    spec: str
    data: TrainingData


# --------------------------------------------------------------------------- data


def prepare_domains(config: Config, device: torch.device, progress: bool = False) -> list[Domain]:
    """Embed every domain of ``config.data.domains`` (through the cache); labels must be distinct."""
    specs = [s.strip() for s in config.data.domains]
    labels = [domain_label(s) for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"data.domains names domain {repeated[0]!r} twice; give each domain once "
                        "(files need distinct names)")
    for spec in specs:  # read every corpus first: a bad one fails before any teacher pass
        load_corpus(with_overrides(config, {"data.corpus": spec, "data.domains": ()}).data,
                    min_sentences=config.train.batch_size, seed=config.train.seed)
    domains = []
    for i, (spec, label) in enumerate(zip(specs, labels)):
        overrides = {"data.corpus": spec, "data.domains": ()}
        if i:  # only the first stage warms up on synthetic text
            overrides["train.warmup_synthetic"] = False
        data = prepare_data(with_overrides(config, overrides), device, progress=progress)
        domains.append(Domain(label, spec, data))
    return domains


def merge_data(parts: Sequence[TrainingData]) -> TrainingData:
    """All domains as one ``TrainingData`` (for joint training and the final union evaluation)."""
    bank_rows: dict[str, torch.Tensor] = {}
    for part in parts:
        for text, vector in zip(part.bank.texts, part.bank.vectors):
            bank_rows.setdefault(text, vector)
    return TrainingData(
        train_texts=[t for p in parts for t in p.train_texts],
        train=torch.cat([p.train for p in parts]),
        val_texts=[t for p in parts for t in p.val_texts],
        val=torch.cat([p.val for p in parts]),
        difficulty=torch.cat([p.difficulty for p in parts]),
        warmup_texts=parts[0].warmup_texts,
        warmup=parts[0].warmup,
        bank=PhraseBank(list(bank_rows), torch.stack(list(bank_rows.values()))),
        cache_metrics=parts[0].cache_metrics,
    )


# --------------------------------------------------------------------------- remedies


class EWC:
    """Online elastic weight consolidation with a diagonal, mean-normalised Fisher."""

    def __init__(self, lam: float):
        self.lam = lam
        self.fisher: list[torch.Tensor] | None = None  # one per model parameter, same shapes
        self.anchor: list[torch.Tensor] | None = None
        self.seconds = 0.0

    def consolidate(self, model: LatticeStudent, train: torch.Tensor, config: Config, device: torch.device,
                    dtype, samples: int, generator: torch.Generator) -> None:
        """Estimate the Fisher on up to ``samples`` rows of ``train`` [N, T], add it, and anchor the weights."""
        start = time.perf_counter()
        params = list(model.parameters())
        fisher = [torch.zeros_like(p) for p in params]
        rows = torch.randperm(len(train), generator=generator)[: samples or len(train)]
        model.eval()  # no dropout noise in the estimate
        for begin in range(0, len(rows), config.train.batch_size):
            target = train[rows[begin : begin + config.train.batch_size]].to(device)
            model.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                out = model(target)
            loss, _ = total_loss(config.loss, out.embedding.float(), target, out.activity.float(), out.gates.float())
            loss.backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f += p.grad.detach().float() ** 2 * len(target)
        model.zero_grad(set_to_none=True)
        total = sum(f.sum() for f in fisher)
        count = sum(f.numel() for f in fisher)
        scale = count / total.clamp_min(1e-30)  # mean 1 over every parameter
        fisher = [f * scale for f in fisher]
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p in params]
        self.seconds += time.perf_counter() - start

    def penalty(self, model: LatticeStudent) -> torch.Tensor:
        """``lam / 2 * sum(F * (theta - anchor)**2)``, a scalar with gradients."""
        assert self.fisher is not None and self.anchor is not None
        terms = [(f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, model.parameters(), self.anchor)]
        return 0.5 * self.lam * torch.stack(terms).sum()


class ReplayBuffer:
    """Earlier stages' teacher embeddings, at most ``capacity`` rows shared equally between stages."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.parts: list[torch.Tensor] = []

    def add(self, train: torch.Tensor, generator: torch.Generator) -> None:
        """Keep a random subset of ``train`` [N, T] and shrink earlier stages to an equal share."""
        self.parts.append(train[torch.randperm(len(train), generator=generator)])
        quota = self.capacity // len(self.parts)
        self.parts = [p[:quota].clone() for p in self.parts]

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)


class ReplayBatches:
    """Stands in for the training tensor in ``_train_epoch``: ``self[idx]`` mixes buffer rows into the batch.

    A batch of ``n`` indices yields ``n - k`` new rows ``current[idx[:n-k]]`` followed by
    ``k = round(fraction * n)`` rows drawn uniformly (with replacement) from ``buffer``.
    """

    def __init__(self, current: torch.Tensor, buffer: torch.Tensor, fraction: float, generator: torch.Generator):
        self.current, self.buffer, self.fraction, self.generator = current, buffer, fraction, generator

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        k = min(n, round(self.fraction * n))
        old = self.buffer[torch.randint(len(self.buffer), (k,), generator=self.generator)].to(self.current.device)
        return torch.cat([self.current[idx[: n - k]], old])

    def __len__(self) -> int:
        return len(self.current)

    @property
    def shape(self) -> torch.Size:
        return self.current.shape

    def to(self, *args, **kwargs) -> ReplayBatches:
        """Move both tensors (the generator stays on the CPU, so indices are drawn there)."""
        return ReplayBatches(self.current.to(*args, **kwargs), self.buffer.to(*args, **kwargs), self.fraction,
                             self.generator)


def freeze_groups(model: LatticeStudent, names: Sequence[str]) -> None:
    """Stop training the named parameter groups (missing experts are ignored); all frozen is an error."""
    groups = model.parameter_groups()
    if names and all(name in names for name in groups):
        raise UserError(f"continual.freeze={','.join(names)} freezes every parameter group; leave one trainable")
    for name in names:
        for p in groups.get(name, []):
            p.requires_grad_(False)


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def domain_cosine(model: LatticeStudent, val: torch.Tensor, batch: int, device: torch.device, dtype) -> float:
    """Mean cosine of the student's output to the teacher over ``val`` [M, T] (``val_cosine``)."""
    model.eval()
    outs = []
    for start in range(0, len(val), batch):
        with autocast(device, dtype):
            outs.append(model(val[start : start + batch].to(device)).embedding.float().cpu())
    return M.mean_cosine(torch.cat(outs), val)


def continual_summary(matrix: Sequence[Sequence[float]], labels: Sequence[str], joint: bool = False) -> dict[str, float]:
    """Derived figures of a stage x domain matrix (see the module docstring)."""
    final = matrix[-1]
    stages = len(matrix)
    out = {"avg_final_cosine": sum(final) / len(final)}
    if joint:
        out.update(forgetting=0.0, new_domain_cosine=out["avg_final_cosine"], last_domain_cosine=final[-1])
        return out
    drops = [max(matrix[s][d] for s in range(d, stages - 1)) - final[d] for d in range(stages - 1)]
    out["forgetting"] = sum(drops) / len(drops)
    out["new_domain_cosine"] = sum(matrix[d][d] for d in range(stages)) / stages
    out["last_domain_cosine"] = matrix[-1][stages - 1]
    for d, drop in enumerate(drops):
        out[f"cl_forgetting/{labels[d]}"] = drop
    return out


# --------------------------------------------------------------------------- the stage loop


def _stage_plan(config: Config, stage: int) -> list[str]:
    plan = epoch_plan(config)
    return plan if stage == 0 else [p for p in plan if p != "warmup"]


def _new_loop(config: Config, model: LatticeStudent, data: TrainingData, plan: list[str], device, dtype) -> _Loop:
    per_step = config.train.batch_size * config.train.grad_accum_steps
    main_index = [plan[:e].count("main") for e in range(len(plan))]
    total = sum(math.ceil(len(epoch_texts(data, config, p, main_index[e])) / per_step) for e, p in enumerate(plan))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return _Loop(config, model, build_optimizer(model, config), device, dtype, scaler, total, max(1, total // 20),
                 0, 0.0)


def run_continual(config: Config, *, device: torch.device | None = None, domains: list[Domain] | None = None,
                  callbacks: Sequence[Callable[[EpochReport], None]] = (), progress: bool = False) -> TrainResult:
    """``train_continual`` seeded like ``cnn3d.train.train``, reusing ``domains`` from ``prepare_domains``.

    Runs that share ``data.domains`` (a benchmark's variants, say) embed the corpora once.
    """
    device = device or resolve_device(config.train.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.train.seed)
        return train_continual(config, device, callbacks, show=progress, domains=domains)


def train_continual(config: Config, device: torch.device, callbacks: Sequence[Callable[[EpochReport], None]] = (),
                    out_dir: str | Path | None = None, resume_from: str | Path | None = None,
                    show: bool = False, domains: list[Domain] | None = None) -> TrainResult:
    """Train on ``config.data.domains`` in sequence (or jointly); see the module docstring.

    ``domains`` (from ``prepare_domains`` for the same ``data.domains``) skips embedding them again.
    """
    if resume_from is not None:
        raise UserError("resuming a run over data.domains is not supported; start it again without --resume")
    if len(config.data.domains) < 2:
        raise UserError("data.domains needs at least two corpora for a continual run")
    started = time.perf_counter()
    c = config.continual
    domains = domains or prepare_domains(config, device, progress=show)
    labels = [d.label for d in domains]
    union = merge_data([d.data for d in domains])
    stages = [union] if c.joint else [d.data for d in domains]
    model = build_model(config, union.teacher_dim).to(device)
    dtype = autocast_dtype(config.train.precision, device)
    generator = torch.Generator().manual_seed(config.train.seed)
    remedy_generator = torch.Generator().manual_seed(config.train.seed + 1)
    ewc = EWC(c.ewc_lambda) if c.ewc_lambda > 0 else None
    replay = ReplayBuffer(c.replay_size) if c.replay_size > 0 and c.replay_fraction > 0 else None
    ceilings = {}
    for d in domains:
        b = baselines(d.data, config)
        ceilings[f"cl_pca/{d.label}"] = b["baseline_pca_cosine"]
        ceilings[f"cl_mean/{d.label}"] = b["baseline_mean_cosine"]
    plans = [_stage_plan(config, s) for s in range(len(stages))]
    total_epochs = sum(len(p) for p in plans)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    matrix: list[list[float]] = []
    cl_metrics: dict[str, float] = dict(ceilings)
    history: list[dict[str, float]] = []
    examples: list[dict] = []
    epoch = 0
    for s, (data, plan) in enumerate(zip(stages, plans)):
        if s and c.freeze:
            freeze_groups(model, c.freeze)
        loop = _new_loop(config, model, data, plan, device, dtype)
        if ewc is not None and ewc.fisher is not None:
            loop.extra_loss = ewc.penalty
        main_index = [plan[:e].count("main") for e in range(len(plan))]
        for e, phase in enumerate(plan):
            rows = epoch_texts(data, config, phase, main_index[e])
            order = rows[torch.randperm(len(rows), generator=generator)]
            warm = phase == "warmup" and bool(data.warmup_texts)
            source = data.warmup if warm else data.train
            if replay is not None and replay.parts and not warm:
                source = ReplayBatches(data.train, replay.rows, c.replay_fraction, remedy_generator)
            epoch_start = time.perf_counter()
            label = f"stage {s + 1}/{len(stages)} epoch {e + 1}/{len(plan)}"
            metrics = {"epoch": epoch + 1, "stage": s + 1, **_train_epoch(loop, source, order, phase, label, show),
                       **data.cache_metrics}
            if e == len(plan) - 1:
                row = [domain_cosine(model, d.data.val, config.train.batch_size, device, dtype) for d in domains]
                matrix.append(row)
                stage_name = "joint" if c.joint else str(s + 1)
                stage_row = {f"cl_matrix/{stage_name}/{lab}": v for lab, v in zip(labels, row)}
                cl_metrics.update(stage_row)
                metrics.update(stage_row)
                logger.info("stage %d/%d (%s): %s", s + 1, len(stages), "joint" if c.joint else labels[s],
                            ", ".join(f"{lab} {v:.4f} (pca {ceilings[f'cl_pca/{lab}']:.4f})"
                                      for lab, v in zip(labels, row)))
                if s < len(stages) - 1:
                    _after_stage(model, data, config, device, dtype, ewc, replay, remedy_generator)
                else:
                    evaluation = evaluate(model, union, config, device, dtype)
                    examples = evaluation["examples"]
                    cl_metrics.update(continual_summary(matrix, labels, joint=c.joint))
                    cl_metrics["cl_fisher_seconds"] = ewc.seconds if ewc else 0.0
                    cl_metrics["cl_replay_bytes"] = float(replay.nbytes) if replay else 0.0
                    cl_metrics["cl_replay_rows"] = float(len(replay.rows)) if replay else 0.0
                    metrics.update({**evaluation["metrics"], **baselines(union, config), **cl_metrics})
            metrics["epoch_seconds"] = time.perf_counter() - epoch_start
            metrics["peak_memory_mb"] = _memory_metric(device, loop.cpu_peak)
            history.append(metrics)
            _log_epoch(metrics, phase, total_epochs)
            if out_dir is not None:
                meta = {"teacher_dim": union.teacher_dim, "epochs_done": epoch + 1, "step": loop.step,
                        "metrics": metrics}
                save_checkpoint(out_dir, model, config, meta, loop.optimizer)
            report = EpochReport(epoch + 1, total_epochs, phase, metrics, examples)
            for callback in callbacks:
                callback(report)
            epoch += 1
    seconds = time.perf_counter() - started
    return TrainResult(history[-1], history, examples, config, model, seconds, Path(out_dir) if out_dir else None)


def _after_stage(model, data: TrainingData, config: Config, device, dtype, ewc: EWC | None,
                 replay: ReplayBuffer | None, generator: torch.Generator) -> None:
    """Consolidate what the stage learned: the EWC Fisher and anchor, and the replay buffer."""
    if ewc is not None:
        ewc.consolidate(model, data.train, config, device, dtype, config.continual.ewc_samples, generator)
    if replay is not None:
        replay.add(data.train, generator)
