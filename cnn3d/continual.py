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
* **Progressive experts** (``new_expert``): every later stage adds a copy of the newest
  local expert (``local2``, ``local3``, ...) and splits that expert's gate logit in two,
  ``b -> b - T log 2`` for both rows (``T`` the gate temperature), so the softmax gives
  each half the old share and the cube's output is exactly what it was. ``freeze``
  names a kind (``local`` covers ``local`` and earlier copies) and never the expert
  added for the current stage, so ``freeze=gating,local,functional,distant`` trains
  only the new expert and the transforms, the progressive-networks recipe.
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
are measured on the union of all domains' validation splits. With ``continual.baselines``
the run also trains naive sequential, joint and single-domain students on the same data
and reports them (``cl_naive/*``, ``cl_joint/*``, ``cl_single/*``, ``cl_plasticity``).
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
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    load_optimizer,
    load_state,
    load_weights,
    open_checkpoint,
    save_checkpoint,
)
from .config import Config, flatten, with_overrides
from .data import load_corpus
from .decode import PhraseBank
from .device import autocast, autocast_dtype, resolve_device
from .domains import domain_label
from .errors import UserError
from .experts import expert_kind
from .losses import total_loss
from .model import LatticeStudent, build_model
from .train import (
    _FREE_KEYS,
    _MODEL_KEYS,
    _MODEL_SECTIONS,
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
    warmup_steps,
)
from .transfer import initial_student, precheck

__all__ = ["EWC", "Domain", "ReplayBatches", "ReplayBuffer", "add_expert", "continual_summary", "freeze_groups",
           "prepare_domains", "run_continual", "stage_model_config", "train_continual"]

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
    """Online elastic weight consolidation with a diagonal, mean-normalised Fisher, kept by parameter name."""

    def __init__(self, lam: float):
        self.lam = lam
        self.fisher: dict[str, torch.Tensor] | None = None  # parameter name -> tensor of its shape
        self.anchor: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0

    def consolidate(self, model: LatticeStudent, train: torch.Tensor, config: Config, device: torch.device,
                    dtype, samples: int, generator: torch.Generator) -> None:
        """Estimate the Fisher on up to ``samples`` rows of ``train`` [N, T], add it, and anchor the weights."""
        start = time.perf_counter()
        params = dict(model.named_parameters())
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        rows = torch.randperm(len(train), generator=generator)[: samples or len(train)]
        model.eval()  # no dropout noise in the estimate
        for begin in range(0, len(rows), config.train.batch_size):
            target = train[rows[begin : begin + config.train.batch_size]].to(device)
            model.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                out = model(target)
            loss, _ = total_loss(config.loss, out.embedding.float(), target, out.activity.float(), out.gates.float())
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2 * len(target)
        model.zero_grad(set_to_none=True)
        total = sum(f.sum() for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        scale = count / total.clamp_min(1e-30)  # mean 1 over every parameter
        fisher = {n: f * scale for n, f in fisher.items()}
        if self.fisher is not None:
            fisher = {n: f + self.fisher[n] if n in self.fisher else f for n, f in fisher.items()}
        self.fisher = fisher
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        self.seconds += time.perf_counter() - start

    def grow(self, model: LatticeStudent, source: int) -> None:
        """Follow ``add_expert``: the new gate row inherits row ``source``'s Fisher; anchors move to the split weights.

        The split is exact, so the grown model right after it is the consolidated function in
        the new parametrisation; the new expert's own weights carry no Fisher (free to learn).
        """
        assert self.fisher is not None
        for key in ("processor.gate.weight", "processor.gate.bias"):
            self.fisher[key] = torch.cat([self.fisher[key], self.fisher[key][source : source + 1]])
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def penalty(self, model: LatticeStudent) -> torch.Tensor:
        """``lam / 2 * sum(F * (theta - anchor)**2)``, a scalar with gradients."""
        assert self.fisher is not None and self.anchor is not None
        terms = [(self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in model.named_parameters()
                 if n in self.fisher]
        return 0.5 * self.lam * torch.stack(terms).sum()

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save for a resume."""
        if self.fisher is None or self.anchor is None:
            return {}
        return {**{f"ewc.fisher.{n}": f for n, f in self.fisher.items()},
                **{f"ewc.anchor.{n}": a for n, a in self.anchor.items()}}

    def load(self, state: dict[str, torch.Tensor], device: torch.device, seconds: float) -> None:
        """Inverse of ``state``."""
        fisher = {k.removeprefix("ewc.fisher."): v.to(device) for k, v in state.items() if k.startswith("ewc.fisher.")}
        anchor = {k.removeprefix("ewc.anchor."): v.to(device) for k, v in state.items() if k.startswith("ewc.anchor.")}
        self.fisher, self.anchor = (fisher, anchor) if fisher else (None, None)
        self.seconds = seconds


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

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save for a resume."""
        return {f"replay.{i}": p for i, p in enumerate(self.parts)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state``."""
        self.parts = [state[f"replay.{i}"] for i in range(sum(k.startswith("replay.") for k in state))]


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


def freeze_groups(model: LatticeStudent, names: Sequence[str], keep: Sequence[str] = ()) -> None:
    """Stop training the named parameter groups; all frozen is an error.

    A kind name covers its copies (``local`` also freezes ``local2``, ...); groups in ``keep``
    (the expert added for this stage) stay trainable; missing experts are ignored.
    """
    groups = model.parameter_groups()
    chosen = [g for g in groups if expert_kind(g) in names and g not in keep]
    if chosen and len(chosen) == len(groups):
        raise UserError(f"continual.freeze={','.join(names)} freezes every parameter group; leave one trainable")
    for name in chosen:
        for p in groups[name]:
            p.requires_grad_(False)


def stage_model_config(config: Config, stage: int) -> Config:
    """The config describing the model during ``stage`` (0-based): the run's, plus the experts added by then.

    Under ``continual.new_expert`` the copies ``local2``, ``local3``, ... are the run's to add, so any
    already in ``moe.experts`` (a checkpoint's ``config.json`` passed back) are dropped first.
    """
    if not config.continual.new_expert:
        return config
    base = tuple(n for n in config.moe.experts if n == "local" or expert_kind(n) != "local")
    experts = (*base, *(f"local{i}" for i in range(2, stage + 2)))
    return config if experts == config.moe.experts else with_overrides(config, {"moe.experts": experts})


def add_expert(model: LatticeStudent, config: Config, device: torch.device) -> tuple[LatticeStudent, Config, int]:
    """Progressive experts: ``model`` plus a copy of its newest local expert, with the same function.

    ``config`` describes ``model``. The copy joins ``moe.experts`` as ``local<n>``; the gate gets
    one more output row, a copy of the source expert's row, and both rows' biases drop by
    ``T log 2`` (``T`` = ``moe.gate_temperature``): ``exp((l - T log 2) / T) = exp(l / T) / 2``,
    so the softmax's denominator is unchanged, the two identical experts get half the old
    share each, and every cell's message is exactly what it was. Returns the new model (its
    weights copied in), its config and the source expert's gate row.
    """
    locals_ = [n for n in model.expert_names if expert_kind(n) == "local"]
    source_name = locals_[-1]
    name = f"local{len(locals_) + 1}"
    grown = with_overrides(config, {"moe.experts": (*config.moe.experts, name)})
    source = model.expert_names.index(source_name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = f"processor.experts.{source_name}."
    for key in [k for k in state if k.startswith(prefix)]:
        state[f"processor.experts.{name}." + key.removeprefix(prefix)] = state[key].clone()
    shift = config.moe.gate_temperature * math.log(2.0)
    weight, bias = state["processor.gate.weight"], state["processor.gate.bias"]  # [E, C, 1, 1, 1], [E]
    bias[source] -= shift
    state["processor.gate.weight"] = torch.cat([weight, weight[source : source + 1]])
    state["processor.gate.bias"] = torch.cat([bias, bias[source : source + 1]])
    new = build_model(grown, model.teacher_dim).to(device)
    new.load_state_dict(state, strict=True)
    logger.info("added expert %s (a copy of %s; gate share split in two)", name, source_name)
    return new, grown, source


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
    return _Loop(config, model, build_optimizer(model, config), device, dtype, scaler, total, warmup_steps(total),
                 0, 0.0)


def run_continual(config: Config, *, device: torch.device | None = None, domains: list[Domain] | None = None,
                  callbacks: Sequence[Callable[[EpochReport], None]] = (), progress: bool = False,
                  out_dir: str | Path | None = None, resume_from: str | Path | None = None) -> TrainResult:
    """``train_continual`` seeded like ``cnn3d.train.train``, reusing ``domains`` from ``prepare_domains``.

    Runs that share ``data.domains`` (a benchmark's variants, say) embed the corpora once.
    """
    device = device or resolve_device(config.train.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.train.seed)
        return train_continual(config, device, callbacks, out_dir, resume_from, show=progress, domains=domains)


def train_continual(config: Config, device: torch.device, callbacks: Sequence[Callable[[EpochReport], None]] = (),
                    out_dir: str | Path | None = None, resume_from: str | Path | None = None,
                    show: bool = False, domains: list[Domain] | None = None) -> TrainResult:
    """Train on ``config.data.domains`` in sequence (or jointly); see the module docstring.

    ``domains`` (from ``prepare_domains`` for the same ``data.domains``) skips embedding them again.
    ``resume_from`` continues from a checkpoint this function wrote (``out_dir``): weights with any
    added experts, the optimiser within its stage, the EWC and replay state, the matrix so far
    and the random generators, so a resumed run ends as the uninterrupted one would.
    """
    if len(config.data.domains) < 2:
        raise UserError("data.domains needs at least two corpora for a continual run")
    c = config.continual
    plans = [_stage_plan(config, s) for s in range(1 if c.joint else len(config.data.domains))]
    resume = _open_continual_resume(resume_from, config, plans) if resume_from is not None else None
    if resume is None:  # a bad train.init_from fails before any teacher pass
        precheck(stage_model_config(config, 0))
    started = time.perf_counter()
    domains = domains or prepare_domains(config, device, progress=show)
    labels = [d.label for d in domains]
    union = merge_data([d.data for d in domains])
    stages = [union] if c.joint else [d.data for d in domains]
    model_config = stage_model_config(config, 0)  # describes the model: grows with every added expert
    # train.init_from fills the first stage's student from a trained checkpoint (any cube size)
    model, transfer_meta = initial_student(model_config, union.teacher_dim, device)
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
    total_epochs = sum(len(p) for p in plans)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    matrix: list[list[float]] = []
    first_epoch = 0
    if resume is not None:
        model, model_config, matrix = _restore(resume, config, plans, union.teacher_dim, device,
                                               ewc, replay, generator, remedy_generator)
        first_epoch = resume.epochs_done
    cl_metrics: dict[str, float] = dict(ceilings)
    history: list[dict[str, float]] = []
    examples: list[dict] = []
    epoch = 0
    for s, (data, plan) in enumerate(zip(stages, plans)):
        if epoch + len(plan) <= first_epoch:  # done before the resume
            epoch += len(plan)
            continue
        inside = first_epoch > epoch  # resuming part-way through this stage: its expert is already there
        added: tuple[str, ...] = ()
        if s and c.new_expert:
            if not inside:
                model, model_config, source = add_expert(model, model_config, device)
                if ewc is not None:
                    ewc.grow(model, source)
            added = (model.expert_names[-1],)
        if s and c.freeze:
            freeze_groups(model, c.freeze, keep=added)
        loop = _new_loop(config, model, data, plan, device, dtype)
        if inside:
            assert resume is not None
            load_optimizer(resume, loop.optimizer, device)
            loop.step = resume.step
        if ewc is not None and ewc.fisher is not None:
            loop.extra_loss = ewc.penalty
        main_index = [plan[:e].count("main") for e in range(len(plan))]
        for e, phase in enumerate(plan):
            if epoch < first_epoch:  # the generators' states came with the checkpoint: nothing to replay
                epoch += 1
                continue
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
                metrics.update(stage_row)
                logger.info("stage %d/%d (%s): %s", s + 1, len(stages), "joint" if c.joint else labels[s],
                            ", ".join(f"{lab} {v:.4f} (pca {ceilings[f'cl_pca/{lab}']:.4f})"
                                      for lab, v in zip(labels, row)))
                if s < len(stages) - 1:
                    _after_stage(model, data, config, device, dtype, ewc, replay, remedy_generator)
                else:
                    evaluation = evaluate(model, union, config, device, dtype)
                    examples = evaluation["examples"]
                    for i, done in enumerate(matrix):  # every row, also those done before a resume
                        name = "joint" if c.joint else str(i + 1)
                        cl_metrics.update({f"cl_matrix/{name}/{lab}": v for lab, v in zip(labels, done)})
                    cl_metrics.update(continual_summary(matrix, labels, joint=c.joint))
                    cl_metrics["cl_fisher_seconds"] = ewc.seconds if ewc else 0.0
                    cl_metrics["cl_replay_bytes"] = float(replay.nbytes) if replay else 0.0
                    cl_metrics["cl_replay_rows"] = float(len(replay.rows)) if replay else 0.0
                    if c.baselines:
                        cl_metrics.update(_baselines_in_run(config, device, domains, matrix, cl_metrics))
                    metrics.update({**evaluation["metrics"], **baselines(union, config), **cl_metrics})
            metrics["epoch_seconds"] = time.perf_counter() - epoch_start
            metrics["peak_memory_mb"] = _memory_metric(device, loop.cpu_peak)
            history.append(metrics)
            _log_epoch(metrics, phase, total_epochs)
            if out_dir is not None:
                meta = {"teacher_dim": union.teacher_dim, "epochs_done": epoch + 1, "step": loop.step,
                        "metrics": metrics, **transfer_meta, "continual": {"matrix": matrix, "fisher_seconds": ewc.seconds if ewc else 0.0}}
                state = {**(ewc.state() if ewc else {}), **(replay.state() if replay else {}),
                         "rng.order": generator.get_state(), "rng.remedy": remedy_generator.get_state(),
                         "rng.torch": torch.get_rng_state()}
                save_checkpoint(out_dir, model, model_config, meta, loop.optimizer, state)
            report = EpochReport(epoch + 1, total_epochs, phase, metrics, examples)
            for callback in callbacks:
                callback(report)
            epoch += 1
    seconds = time.perf_counter() - started
    return TrainResult(history[-1], history, examples, config, model, seconds, Path(out_dir) if out_dir else None)


_NO_REMEDY = {"continual.ewc_lambda": 0.0, "continual.replay_size": 0, "continual.freeze": (),
              "continual.new_expert": False, "continual.joint": False, "continual.baselines": False}


def _baselines_in_run(config: Config, device: torch.device, domains: list[Domain], matrix: list[list[float]],
                      this: dict[str, float]) -> dict[str, float]:
    """``continual.baselines``: naive sequential, joint and single-domain students on the same data and seed.

    ``cl_plasticity`` = mean over later domains of ``A[d][d]`` / a single-domain run on ``d``;
    ``cl_forgetting_cut`` = ``1 - forgetting / naive forgetting`` (NaN when naive forgets nothing).
    A run that is itself naive (or joint) is its own baseline and is not trained twice.
    """
    from .train import train

    c = config.continual
    labels = [d.label for d in domains]
    out: dict[str, float] = {}
    plain = with_overrides(config, _NO_REMEDY)
    remedied = (c.ewc_lambda > 0 or (c.replay_size > 0 and c.replay_fraction > 0) or bool(c.freeze)
                or c.new_expert)
    for name, variant in (("naive", plain), ("joint", with_overrides(plain, {"continual.joint": True}))):
        is_this = (name == "joint") == c.joint and not remedied
        m = this if is_this else run_continual(variant, device=device, domains=domains).metrics
        for key in ("avg_final_cosine", "forgetting", "last_domain_cosine"):
            out[f"cl_{name}/{key}"] = m[key]
        if name == "joint":  # the upper bound per domain
            out.update({f"cl_joint/{lab}": m[f"cl_matrix/joint/{lab}"] for lab in labels})
    ratios = []
    for d, domain in enumerate(domains[1:], start=1):
        single = train(with_overrides(plain, {"data.domains": ()}), device=device, progress=False, data=domain.data)
        out[f"cl_single/{domain.label}"] = single.metrics["val_cosine"]
        if not c.joint:
            ratios.append(matrix[d][d] / single.metrics["val_cosine"])
    out["cl_plasticity"] = sum(ratios) / len(ratios) if ratios else float("nan")
    naive = out["cl_naive/forgetting"]
    out["cl_forgetting_cut"] = 1 - this["forgetting"] / naive if naive > 0 else float("nan")
    logger.info("baselines in this run: naive forgetting %.4f (this run %.4f), joint avg_final %.4f (this run %.4f), "
                "plasticity %.3f (%s)", naive, this["forgetting"], out["cl_joint/avg_final_cosine"],
                this["avg_final_cosine"], out["cl_plasticity"],
                ", ".join(f"single {lab} {out[f'cl_single/{lab}']:.4f}" for lab in labels[1:]))
    return out


def _stage_of(plans: list[list[str]], epochs_done: int) -> int:
    """The 0-based stage of the last epoch done (``epochs_done >= 1``)."""
    ends = [sum(len(p) for p in plans[: s + 1]) for s in range(len(plans))]
    return next(s for s, end in enumerate(ends) if epochs_done <= end)


def _open_continual_resume(folder, config: Config, plans: list[list[str]]) -> Checkpoint:
    """Verify a checkpoint of a continual run against ``config``; a mismatch is one line naming the keys."""
    ckpt = open_checkpoint(folder)
    if not isinstance(ckpt.meta.get("continual"), dict):
        raise CheckpointError(f"cannot resume from {ckpt.folder}: it was not written by a run over data.domains; "
                              "resume it without data.domains (or --then-corpus), or train into a new --out")
    total = sum(len(p) for p in plans)
    if ckpt.epochs_done >= total:
        raise CheckpointError(f"checkpoint {ckpt.folder} has already done {ckpt.epochs_done} of the {total} epochs "
                              "of this domain sequence; nothing is left to resume, train into a new --out")
    if ckpt.epochs_done < 1:
        raise CheckpointError(f"checkpoint {ckpt.folder} has no epoch done; start the run again without --resume")
    saved, now = flatten(ckpt.config), flatten(stage_model_config(config, _stage_of(plans, ckpt.epochs_done)))
    differing = sorted(k for k, v in now.items() if saved[k] != v)
    fixed = [k for k in differing if k not in _FREE_KEYS and (
        k.split(".", 1)[0] in _MODEL_SECTIONS or k in _MODEL_KEYS
        or k in ("data.domains", "continual.joint", "continual.new_expert"))]
    if fixed:
        shown = ", ".join(f"{k} ({saved[k]!r} in the checkpoint, {now[k]!r} now)" for k in fixed[:3])
        more = f" and {len(fixed) - 3} more" if len(fixed) > 3 else ""
        raise CheckpointError(f"cannot resume from {ckpt.folder}: the run differs in {shown}{more}; "
                              f"pass the same settings (e.g. --config {ckpt.folder / 'config.json'}) or train into a new --out")
    if differing:
        logger.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(differing))
    return ckpt


def _restore(ckpt: Checkpoint, config: Config, plans, teacher_dim: int, device, ewc: EWC | None,
             replay: ReplayBuffer | None, generator: torch.Generator, remedy_generator: torch.Generator):
    """Model (with its added experts), remedies, generators and the matrix so far from a checkpoint."""
    if ckpt.teacher_dim != teacher_dim:
        raise CheckpointError(f"cannot resume from {ckpt.folder}: it was trained on {ckpt.teacher_dim}-D teacher "
                              f"embeddings, this teacher gives {teacher_dim}-D")
    model_config = stage_model_config(config, _stage_of(plans, ckpt.epochs_done))
    model = build_model(model_config, teacher_dim).to(device)
    load_weights(ckpt, model, device)
    state = load_state(ckpt)
    missing = [k for k in ("rng.order", "rng.remedy", "rng.torch") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.folder} lacks the continual state ({missing[0]}); "
                              "it cannot be resumed, train into a new --out")
    info = ckpt.meta["continual"]
    if ewc is not None:
        ewc.load(state, device, float(info.get("fisher_seconds", 0.0)))
    if replay is not None:
        replay.load(state)
    generator.set_state(state["rng.order"])
    remedy_generator.set_state(state["rng.remedy"])
    torch.set_rng_state(state["rng.torch"])
    return model, model_config, [[float(v) for v in row] for row in info.get("matrix", [])]


def _after_stage(model, data: TrainingData, config: Config, device, dtype, ewc: EWC | None,
                 replay: ReplayBuffer | None, generator: torch.Generator) -> None:
    """Consolidate what the stage learned: the EWC Fisher and anchor, and the replay buffer."""
    if ewc is not None:
        ewc.consolidate(model, data.train, config, device, dtype, config.continual.ewc_samples, generator)
    if replay is not None:
        replay.add(data.train, generator)
