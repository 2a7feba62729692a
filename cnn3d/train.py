"""The trainer: ``train(config, device=...) -> TrainResult``.

Safe to call many times in one process (each call builds its own model, optimiser,
data and RNG; the global torch RNG is forked, not consumed). After every epoch each
callback receives an ``EpochReport`` with the metrics of ``cnn3d.metrics``; a
callback may raise to stop the run (the tuner raises ``optuna.TrialPruned``).

Phases, in order: warm-up (synthetic sentences when ``train.warmup_synthetic``), main
(with the curriculum when ``train.curriculum``), fine-tune (a tenth of the learning
rate). The teacher is frozen and only used to fill the embedding cache up front.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import metrics as M
from . import native
from .analysis import CubeResponses, EmergenceNulls, emergence_values, emergence_with_nulls, null_metric_names
from .cache import EmbeddingCache, embed_with_cache
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    check_output_folder,
    load_optimizer,
    load_weights,
    open_checkpoint,
    save_checkpoint,
)
from .config import Config, flatten
from .data import curriculum_fraction, curriculum_indices, load_corpus
from .decode import PhraseBank, bank_texts, build_bank
from .device import autocast, autocast_dtype, resolve_device
from .errors import UserError
from .experts import expert_kind
from .losses import total_loss
from .memory import SavedActivations, run_peak_mb, state_bytes
from .model import LatticeStudent, build_model
from .synthetic import generate_sentences
from .teacher import load_teacher
from .transfer import (
    carry_optimizer_state,
    grow,
    init_source,
    initial_student,
    log_table,
    precheck,
    refit_readout,
    stage_config,
)

logger = logging.getLogger(__name__)

FINE_TUNE_LR_FACTOR = 0.1
EMERGENCE_SAMPLES = 512  # validation samples used for the O(N^2)/SVD emergence metrics


# Every metric an epoch reports (validation ones on validated epochs); expert_usage_<name> joins per expert.
REPORTED_METRICS = (
    "train_loss", "lr", "train_sentences", "throughput_samples_per_s", "cell_steps_per_s", "epoch_seconds",
    "peak_memory_mb", "cache_hit_rate", "val_loss", "val_mse", "val_cosine", "val_loss_reconstruction",
    "val_loss_cosine", "val_loss_diversity", "val_loss_sparsity", "val_loss_load_balance", "val_loss_triplet", "decode_top1", "decode_top5",
    "baseline_pca_cosine", "baseline_mean_cosine", "face_numbers", "effective_dim", "mutual_info_front_back",
    "cell_specialization", "expert_usage_entropy", "embedding_norm_mean", "embedding_norm_std",
    "activation_sparsity", "rsa_teacher", *null_metric_names(),
)


# Reported by runs over a sequence of data.domains (cnn3d.continual); cl_matrix/<stage>/<domain> and others join.
CONTINUAL_METRICS = ("avg_final_cosine", "forgetting", "new_domain_cosine", "last_domain_cosine")


def is_reported_metric(name: str) -> bool:
    """Whether ``name`` is a metric ``train`` reports (usable as a tuner objective)."""
    return (name in REPORTED_METRICS or name.startswith("expert_usage_") or name in CONTINUAL_METRICS
            or name.startswith("cl_") or name == "val_cosine_fraction" or name.startswith(MULTI_TEACHER_PREFIXES))


# Reported by runs with teacher.extra (cnn3d.multiteacher), per teacher name, plus val_cosine_fraction.
MULTI_TEACHER_PREFIXES = ("val_cosine/", "val_cosine_fraction/", "baseline_pca_cosine/", "baseline_mean_cosine/",
                          "decode_top1/")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped instead of continuing on garbage."""


@dataclass
class EpochReport:
    """What callbacks receive after every epoch."""

    epoch: int  # 1-based, across all phases
    total_epochs: int
    phase: str  # warmup | main | fine_tune
    metrics: dict[str, float]
    examples: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    metrics: dict[str, float]  # the last epoch's
    history: list[dict[str, float]]
    examples: list[dict]
    config: Config
    model: LatticeStudent
    seconds: float
    checkpoint: Path | None = None
    transfer: dict[str, Any] | None = None  # the train.init_from table (cnn3d.transfer), when the run had one


@dataclass
class TrainingData:
    """Teacher embeddings for every split, plus what validation needs."""

    train_texts: list[str]
    train: torch.Tensor  # [N, T]
    val_texts: list[str]
    val: torch.Tensor  # [M, T]
    difficulty: torch.Tensor  # [N] in [0, 1]
    warmup_texts: list[str]
    warmup: torch.Tensor  # [W, T]
    bank: PhraseBank
    cache_metrics: dict[str, float]
    baselines: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)  # by face size
    # the untrained cube's nulls by what determines them (``emergence_nulls``): runs on the same data that
    # differ only in training settings (a dropout sweep) share one untrained cube
    nulls: dict[tuple, EmergenceNulls] = field(default_factory=dict, repr=False)

    @property
    def teacher_dim(self) -> int:
        return self.train.shape[1]


# --------------------------------------------------------------------------- data


def prepare_data(config: Config, device: torch.device, progress: bool = False) -> TrainingData:
    """Load the corpus, embed every sentence once (through the cache) and build the phrase bank."""
    corpus = load_corpus(config.data, min_sentences=config.train.batch_size, seed=config.train.seed)
    warmup_texts: list[str] = []
    if config.train.warmup_epochs and config.train.warmup_synthetic:
        warmup_texts = [text for text, _ in generate_sentences(config.data.synthetic_sentences, config.train.seed)]
    bank = bank_texts(corpus, config.data)
    everything = list(dict.fromkeys(corpus.train + corpus.validation + warmup_texts + bank))
    teacher = load_teacher(config.teacher, device)
    cache = EmbeddingCache.from_config(config.data)
    vectors = embed_with_cache(teacher, everything, cache, progress=progress)
    row = {text: i for i, text in enumerate(everything)}

    def take(texts: list[str]) -> torch.Tensor:
        return vectors[[row[t] for t in texts]] if texts else vectors.new_zeros(0, vectors.shape[1])

    cache_metrics = cache.stats.as_metrics() if cache is not None else {"cache_hit_rate": 0.0}
    return TrainingData(
        train_texts=corpus.train,
        train=take(corpus.train),
        val_texts=corpus.validation,
        val=take(corpus.validation),
        difficulty=torch.tensor(corpus.difficulty(corpus.train), dtype=torch.float32),
        warmup_texts=warmup_texts,
        warmup=take(warmup_texts),
        bank=build_bank(bank, take(bank)),
        cache_metrics=cache_metrics,
    )


# --------------------------------------------------------------------------- optimisation


def build_optimizer(model: torch.nn.Module, config: Config,
                    trainable: Sequence[torch.nn.Parameter] | None = None, grown: bool = False,
                    refitted: bool = False) -> torch.optim.AdamW:
    """AdamW with one parameter group per expert group, each at ``train.lr * lr_mult_<group>``
    (times ``train.transfer_lr_mult`` for the gate and experts of a run with ``train.init_from``, and
    times ``train.grow_lr_mult`` for them once the cube has ``grown``; for the face maps too when the
    readout was just ``refitted``).

    ``model`` has ``parameter_groups()`` (a ``LatticeStudent`` or a ``MultiTeacherStudent``);
    ``trainable``, when given, keeps only those parameters (a frozen-cube stage).
    """
    t = config.train
    mult = {
        "transform": t.lr_mult_transform,
        "gating": t.lr_mult_gating,
        "local": t.lr_mult_local,
        "functional": t.lr_mult_functional,
        "distant": t.lr_mult_distant,
    }
    # a cube that starts trained (train.init_from) moves slower than its partly new face maps
    cube = (t.transfer_lr_mult if init_source(config) else 1.0) * (t.grow_lr_mult if grown else 1.0)
    # a refitted readout is no longer partly new: the maps fine-tune with the cube (at full lr, Adam's first
    # steps rewrite the encoder rows the fit reads, and the start was lost within an epoch; BENCHMARKS.md)
    maps = cube if refitted else 1.0
    groups = []
    keep = None if trainable is None else {id(p) for p in trainable}
    for name, params in model.parameter_groups().items():
        if name == "transform" and t.freeze_transforms:
            for p in params:
                p.requires_grad_(False)
            continue
        if keep is not None:
            params = [p for p in params if id(p) in keep]
        if params:
            lr = t.lr * mult[expert_kind(name)] * (maps if name == "transform" else cube)
            groups.append({"params": params, "lr": lr, "name": name})
    if not groups:  # e.g. a stage that trains only face maps, with every map frozen
        raise UserError("nothing left to train: train.freeze_transforms=true freezes the face maps, the only "
                        "parameters this stage trains; set train.freeze_transforms=false, or (several teachers) "
                        "train.new_teacher_epochs=0")
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of every group's base lr: linear warm-up, then cosine/linear decay to 10% or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    if schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int) -> int:
    """Steps of the linear lr warm-up: the first 5 % of a run."""
    return max(1, total_steps // 20)


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its base lr (its lr when first scaled) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def epoch_plan(config: Config) -> list[str]:
    t = config.train
    return ["warmup"] * t.warmup_epochs + ["main"] * t.main_epochs + ["fine_tune"] * t.fine_tune_epochs


def epoch_texts(data: TrainingData, config: Config, phase: str, main_index: int) -> torch.Tensor:
    """Row indices into ``data.train`` (or ``data.warmup``) used in this epoch."""
    t = config.train
    if phase == "warmup" and data.warmup_texts:
        return torch.arange(len(data.warmup_texts))
    if phase == "main" and t.curriculum:
        fraction = curriculum_fraction(
            main_index, t.main_epochs, t.curriculum_start_difficulty, t.curriculum_end_difficulty
        )
        return torch.tensor(curriculum_indices(data.difficulty.tolist(), fraction, minimum=t.batch_size))
    return torch.arange(len(data.train_texts))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: LatticeStudent, data: TrainingData, config: Config, device: torch.device, dtype,
             nulls: EmergenceNulls | None = None) -> dict:
    """Validation metrics, baselines computed on the same split, and emergence metrics.

    With ``nulls`` (built by ``emergence_nulls`` for the last epoch) every emergence metric also gets
    its untrained-cube and shuffled-control nulls, excess and bootstrap std (``cnn3d.analysis``).
    """
    model.eval()
    outs, responses = [], []
    parts: dict[str, float] = {}
    total = 0.0
    batches = 0
    for start in range(0, len(data.val_texts), config.train.batch_size):
        target = data.val[start : start + config.train.batch_size].to(device)
        with autocast(device, dtype):
            out = model(target)
        pred = out.embedding.float()
        loss, comps = total_loss(config.loss, pred, target, out.activity.float(), out.gates.float())
        total += loss.item()
        batches += 1
        for k, v in comps.items():
            parts[k] = parts.get(k, 0.0) + v.item()
        outs.append(pred.cpu())
        if start < EMERGENCE_SAMPLES:
            responses.append(CubeResponses.from_output(out))
    pred = torch.cat(outs)
    result = {
        "val_loss": total / batches,
        "val_mse": torch.nn.functional.mse_loss(pred, data.val).item(),
        "val_cosine": M.mean_cosine(pred, data.val),
        **{f"val_{k}": v / batches for k, v in parts.items()},
    }
    result["decode_top1"], result["decode_top5"] = data.bank.accuracy(pred, data.val_texts, k=5)
    trained = CubeResponses.cat(responses, EMERGENCE_SAMPLES)
    result.update(emergence_metrics(model, pred, data.val, trained))
    if nulls is not None:
        result.update(emergence_with_nulls(model, trained, nulls, config.train.batch_size, device, dtype))
    examples = [e.as_dict() for e in data.bank.examples(pred, data.val_texts, n=8)]
    return {"metrics": result, "examples": examples}


def emergence_metrics(model, pred: torch.Tensor, teacher: torch.Tensor, trained: CubeResponses) -> dict[str, float]:
    """The raw emergence metrics on the first ``EMERGENCE_SAMPLES`` validation sentences, plus norms and usage."""
    result = emergence_values(trained, teacher[: len(trained)])
    result["embedding_norm_mean"] = pred.norm(dim=1).mean().item()
    result["embedding_norm_std"] = pred.norm(dim=1).std().item() if pred.shape[0] > 1 else 0.0
    for name, share in zip(model.expert_names, trained.usage.mean(0).tolist()):
        result[f"expert_usage_{name}"] = share
    return result


def emergence_nulls(config: Config, data: TrainingData, device: torch.device, dtype) -> EmergenceNulls:
    """The untrained cube (same seed, initial weights) run once over the validation sentences, and the controls.

    Kept in ``data.nulls`` under everything that determines them: the untrained weights (a digest), the
    model's settings except ``transform.dropout`` (the nulls run in eval mode, where dropout does
    nothing), the seed, batch size, dtype and device. A second run on the same data with the same key
    (the next trial of a dropout sweep) reuses them instead of running the untrained cube again.
    """
    untrained = build_model(config, data.teacher_dim).to(device)
    key = _nulls_key(config, untrained, device, dtype)
    if key in data.nulls:
        return replace(data.nulls[key], seconds=0.0)  # a copy: each run adds its own comparison time
    nulls = EmergenceNulls.build(untrained, data.val[:EMERGENCE_SAMPLES], config.train.batch_size, device, dtype,
                                 seed=config.train.seed)
    data.nulls.clear()  # one entry: a sweep over model settings would otherwise keep one per trial
    data.nulls[key] = replace(nulls, seconds=0.0)
    return nulls


def _nulls_key(config: Config, untrained: torch.nn.Module, device: torch.device, dtype) -> tuple:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in untrained.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    model_settings = tuple((k, v) for k, v in sorted(flatten(config).items())
                           if k.startswith(("lattice.", "moe.", "transform.")) and k != "transform.dropout")
    return (digest.hexdigest(), model_settings, config.train.seed, config.train.batch_size, str(dtype), str(device))


# --------------------------------------------------------------------------- the loop


def _memory_metric(device: torch.device, cpu_peak: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return cpu_peak


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def train(
    config: Config,
    *,
    device: torch.device | None = None,
    callbacks: Sequence[Callable[[EpochReport], None]] = (),
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    progress: bool | None = None,
    data: TrainingData | None = None,
) -> TrainResult:
    """Train a student for ``config``; returns the final metrics, history and model.

    ``device`` defaults to ``resolve_device(config.train.device)``. ``progress``:
    None shows a bar only on a terminal. ``out_dir`` receives a checkpoint after
    every epoch; ``resume_from`` continues from one (weights, optimiser, epoch).
    ``data`` may be passed to reuse prepared embeddings across calls.
    """
    # Checked before any data is embedded or epoch run: a bad --out or --resume costs no training time.
    if out_dir is not None:
        check_output_folder(out_dir)
    continual = len(config.data.domains) >= 2  # a continual run checks its checkpoint itself (cnn3d.continual)
    resume = _open_resume(resume_from, config) if resume_from is not None and not continual else None
    device = device or resolve_device(config.train.device)
    show = _show_progress(progress)
    previous_threads = torch.get_num_threads()
    previous_flush = _flush_denormal_enabled()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats in deep recurrences slow CPU kernels many-fold
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.train.seed)
            if continual:  # a sequence of domains: the stage loop of cnn3d.continual
                from .continual import train_continual

                return train_continual(config, device, callbacks, out_dir, resume_from, show)
            if config.teacher.extra:  # several teachers on one cube (cnn3d.multiteacher)
                from .multiteacher import train_multiteacher

                return train_multiteacher(config, device, callbacks, out_dir, resume_from, show, data)
            return _train(config, device, callbacks, out_dir, resume, show, data)
    finally:
        torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(previous_flush)


def _flush_denormal_enabled() -> bool:
    """Whether denormal floats are flushed to zero now (torch has a setter but no getter)."""
    return (torch.tensor([2.0**-130]) * 1.5).item() == 0.0  # 2^-130 is a float32 denormal


@dataclass
class _Loop:
    """Mutable state of one training run, shared by its epochs."""

    config: Config
    model: LatticeStudent
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    total_steps: int
    warmup_steps: int
    step: int = 0
    cpu_peak: float = 0.0
    extra_loss: Callable[[LatticeStudent], torch.Tensor] | None = None  # added to every batch's loss (continual EWC)
    # the loss of one micro-batch from its row indices, replacing the student on ``source[idx]`` (several teachers)
    batch_loss: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.device.type == "cpu":  # once per loop (a run, or a continual stage), after its inputs were checked
            logger.info("lattice step: %s", native.describe())


def _train(config, device, callbacks, out_dir, resume: Checkpoint | None, show, data) -> TrainResult:
    started = time.perf_counter()
    if resume is None:  # a bad train.init_from fails before the teacher runs (a resume ignores it)
        precheck(config)
    data = data or prepare_data(config, device, progress=show)
    # init_from / grow stage; on resume the stage of the last epoch done, whose weights load next
    model, transfer_meta = initial_student(config, data.teacher_dim, device, resume.folder if resume else None)
    fit = None
    if resume is None and readout_refit_at_start(config):
        fit = refit_for_training(model, config, data, device)
        if fit is not None:  # kept in the checkpoints' meta: with the transfer's table, or on its own from scratch
            (transfer_meta["transfer"] if init_source(config) else transfer_meta)["readout_refit"] = fit
    optimizer = build_optimizer(model, config, refitted=fit is not None)  # on resume, the saved groups' lrs load
    plan = epoch_plan(config)
    first_epoch, step = _resume(resume, model, optimizer, device, data.teacher_dim) if resume else (0, 0)
    dtype = autocast_dtype(config.train.precision, device)
    per_step = config.train.batch_size * config.train.grad_accum_steps
    main_index = [plan[:e].count("main") for e in range(len(plan))]
    total = sum(math.ceil(len(epoch_texts(data, config, p, main_index[e])) / per_step) for e, p in enumerate(plan))
    loop = _Loop(config, model, optimizer, device, dtype,
                 torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
                 total, warmup_steps(total), step)
    generator = torch.Generator().manual_seed(config.train.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history: list[dict[str, float]] = []
    examples: list[dict] = []
    for epoch, phase in enumerate(plan):
        rows = epoch_texts(data, config, phase, main_index[epoch])
        order = rows[torch.randperm(len(rows), generator=generator)]  # replayed for skipped epochs on resume
        if epoch < first_epoch:
            continue
        source = data.warmup if phase == "warmup" and data.warmup_texts else data.train
        epoch_start = time.perf_counter()
        stage = _grow_if_due(loop, config, epoch, transfer_meta, data)
        model, optimizer = loop.model, loop.optimizer
        metrics = {"epoch": epoch + 1, **_train_epoch(loop, source, order, phase, f"epoch {epoch + 1}/{len(plan)}", show),
                   **data.cache_metrics}
        if epoch == len(plan) - 1 or (epoch + 1) % config.train.eval_every == 0:
            # the nulls (an untrained cube, controls, bootstrap) cost a few seconds: measured at the last epoch only
            last = epoch == len(plan) - 1
            nulls = emergence_nulls(config, data, device, dtype) if last and config.train.emergence_nulls else None
            evaluation = evaluate(model, data, config, device, dtype, nulls)
            if nulls is not None:
                logger.info("emergence nulls took %.1f s (untrained cube, shuffled control, bootstrap)", nulls.seconds)
            metrics.update(evaluation["metrics"])
            metrics.update(baselines(data, stage))
            examples = evaluation["examples"]
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        metrics["peak_memory_mb"] = _memory_metric(device, loop.cpu_peak)
        history.append(metrics)
        _log_epoch(metrics, phase, len(plan))
        if out_dir is not None:
            meta = {"teacher_dim": data.teacher_dim, "epochs_done": epoch + 1, "step": loop.step, "metrics": metrics,
                    **transfer_meta}
            save_checkpoint(out_dir, model, stage, meta, optimizer)
        report = EpochReport(epoch + 1, len(plan), phase, metrics, examples)
        for callback in callbacks:
            callback(report)
    final = history[-1] if history else {}
    seconds = time.perf_counter() - started
    return TrainResult(final, history, examples, config, model, seconds, Path(out_dir) if out_dir else None,
                       transfer_meta.get("transfer"))


def _grow_if_due(loop: _Loop, config: Config, epoch: int, meta: dict, data: TrainingData) -> Config:
    """Under ``train.grow_schedule``, swap in a larger student (and its optimiser) when ``epoch`` starts a stage.

    Returns the config of this epoch's cube (what its baselines and checkpoint describe).
    """
    stage = stage_config(config, epoch)
    if stage.lattice.dims == loop.model.dims:
        return stage
    model, table = grow(loop.model, stage, loop.device)
    step = table.as_dict()
    fit = refit_for_training(model, stage, data, loop.device)
    if fit is not None:
        step["readout_refit"] = fit
    optimizer = build_optimizer(model, stage, grown=True, refitted=fit is not None)
    carried = carry_optimizer_state(loop.optimizer, loop.model, optimizer, model)
    log_table(table)
    logger.info("grew the cube at epoch %d; optimiser moments carried for %d tensors", epoch + 1, carried)
    meta.setdefault("grow", []).append({"epoch": epoch + 1, **step})
    loop.model, loop.optimizer = model, optimizer
    return stage


REFIT_BATCHES = 2  # the refit's forward pass runs in batches of this many training batches


def readout_refit_at_start(config: Config) -> bool:
    """Whether a fresh run of ``config`` refits its readout before the first step (``train.readout_refit``:
    ``always``, or ``transfer`` with ``train.init_from``); growth steps refit unless ``never``."""
    mode = config.train.readout_refit
    return mode == "always" or (mode == "transfer" and bool(init_source(config)))


def refit_for_training(model: LatticeStudent, config: Config, data: TrainingData,
                       device: torch.device) -> dict[str, float] | None:
    """``train.readout_refit`` (unless ``never``): the readout fitted over the training set's back faces
    (``refit_readout``), logged; what it did, for the checkpoint's meta, or None."""
    if config.train.readout_refit == "never":
        return None
    # batches of twice the training batch: at 8x the wide cube's states left the cache and the pass took twice as long
    fit = refit_readout(model, data.train, REFIT_BATCHES * config.train.batch_size, device)
    if fit is None:
        logger.info("train.readout_refit: transform.kind=%s has no linear readout to refit; left as it was",
                    config.transform.kind)
        return None
    logger.info("readout refitted over %d training sentences: train cosine %.4f -> %.4f (%.1f s)", fit["rows"],
                fit["cosine_before"], fit["cosine_after"], fit["seconds"])
    return fit


SYNC_EVERY = 16  # micro-batches between host syncs (loss check, progress bar): each sync stalls a GPU queue


def _train_epoch(loop: _Loop, source: torch.Tensor, order: torch.Tensor, phase: str, label: str,
                 show: bool) -> dict[str, float]:
    """One pass over ``source[order]``; returns train loss, lr and steady-state throughput.

    The hot loop never waits for the device: the loss sum and the first non-finite loss
    stay on the device and are read every ``SYNC_EVERY`` micro-batches and at the end of
    the epoch. A non-finite loss still stops the run with ``NonFiniteLoss`` (at most
    ``SYNC_EVERY`` batches later, before any checkpoint or callback sees the epoch).
    """
    config, model = loop.config, loop.model
    batch, accum = config.train.batch_size, config.train.grad_accum_steps
    lr_scale = FINE_TUNE_LR_FACTOR if phase == "fine_tune" else 1.0
    model.train()
    micro = [order[i : i + batch] for i in range(0, len(order), batch)]
    seen, warm_seen, warm_start, shown = 0, 0, time.perf_counter(), 0
    loss_sum = torch.zeros((), device=loop.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=loop.device)  # index of the first non-finite batch
    bad_loss = torch.zeros((), device=loop.device)
    activations = SavedActivations(state_bytes(model, loop.optimizer)) if loop.device.type == "cpu" else None
    bar = tqdm(total=len(order), desc=f"{label} {phase}", disable=not show, leave=False)
    for i, idx in enumerate(micro):
        with autocast(loop.device, loop.dtype), (activations.watch() if i == 0 and activations else nullcontext()):
            if loop.batch_loss is not None:
                loss = loop.batch_loss(idx)
            else:
                loss = student_loss(model, source[idx].to(loop.device, non_blocking=True), config)
        if loop.extra_loss is not None:  # e.g. the continual EWC penalty
            loss = loss + loop.extra_loss(model)
        detached = loss.detach()
        newly_bad = (first_bad < 0) & ~torch.isfinite(detached)
        first_bad = torch.where(newly_bad, i, first_bad)
        bad_loss = torch.where(newly_bad, detached, bad_loss)
        (loop.scaler.scale(loss / accum) if loop.scaler else loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == len(micro):
            factor = lr_factor(loop.step, loop.total_steps, config.train.scheduler, loop.warmup_steps)
            _optimizer_step(optimizer=loop.optimizer, scaler=loop.scaler, config=config, factor=lr_scale * factor)
            loop.step += 1
        loss_sum += detached * len(idx)
        seen += len(idx)
        if i == 0:  # time steady-state batches: the first pays for allocator and kernel warm-up
            warm_start, warm_seen = time.perf_counter(), seen
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == len(micro):
            _check_finite(first_bad, bad_loss, label, config)
            bar.update(seen - shown)
            shown = seen
            bar.set_postfix(loss=f"{detached.item():.4f}")
    bar.close()
    elapsed = time.perf_counter() - warm_start
    rate = (seen - warm_seen) / elapsed if seen > warm_seen else seen / max(elapsed, 1e-9)
    cells = model.dims[0] * model.dims[1] * model.dims[2] * model.steps
    if activations is not None:
        loop.cpu_peak = max(loop.cpu_peak, run_peak_mb(model, loop.optimizer, activations))
    return {
        "train_loss": loss_sum.item() / max(seen, 1),
        "lr": loop.optimizer.param_groups[0]["lr"],
        "train_sentences": float(seen),
        "throughput_samples_per_s": rate,
        "cell_steps_per_s": rate * cells,
    }


def student_loss(model: torch.nn.Module, target: torch.Tensor, config: Config, teacher: str | None = None) -> torch.Tensor:
    """The training loss of ``model`` on one batch of teacher embeddings ``target [B, T]`` (on its device)."""
    out = model(target) if teacher is None else model(target, teacher)
    return total_loss(config.loss, out.embedding.float(), target, out.activity.float(), out.gates.float())[0]


def _check_finite(first_bad: torch.Tensor, bad_loss: torch.Tensor, label: str, config: Config) -> None:
    """Raise ``NonFiniteLoss`` if a batch since the epoch began had a NaN/inf loss (one host sync)."""
    index = int(first_bad)
    if index >= 0:
        raise NonFiniteLoss(
            f"loss became {bad_loss.item()} at {label} batch {index + 1} "
            f"(train.lr={config.train.lr}); lower the learning rate or enable train.grad_clip"
        )


def _optimizer_step(optimizer, scaler, config: Config, factor: float) -> None:
    scale_lr(optimizer, factor)
    if scaler:
        scaler.unscale_(optimizer)
    if config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.train.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)



def baselines(data: TrainingData, config: Config) -> dict[str, float]:
    """In-run baselines on the same split: PCA through the face's numbers, and the mean vector (memoised per data)."""
    k = config.lattice.face_numbers
    if k not in data.baselines:
        data.baselines[k] = {
            "baseline_pca_cosine": M.baseline_pca_cosine(data.train, data.val, k),
            "baseline_mean_cosine": M.baseline_mean_cosine(data.train, data.val),
            "face_numbers": float(k),
        }
    return dict(data.baselines[k])


# Sections and keys that fix the model's shapes and parameter groups: resuming needs them unchanged.
_MODEL_SECTIONS = ("teacher", "transform", "lattice", "moe")
_MODEL_KEYS = ("train.freeze_transforms",)
_FREE_KEYS = ("teacher.batch_size",)  # how the teacher is batched changes nothing saved


def _open_resume(folder, config: Config) -> Checkpoint:
    """Verify a checkpoint to resume from against ``config``; a mismatch is one line naming the keys."""
    ckpt = open_checkpoint(folder)
    # under train.grow_schedule the checkpoint holds the cube of its last epoch's stage
    saved, now = flatten(ckpt.config), flatten(stage_config(config, max(ckpt.epochs_done - 1, 0)))
    differing = sorted(k for k, v in now.items() if saved[k] != v)
    fixed = [k for k in differing if (k.split(".", 1)[0] in _MODEL_SECTIONS or k in _MODEL_KEYS) and k not in _FREE_KEYS]
    if fixed:
        shown = ", ".join(f"{k} ({saved[k]!r} in the checkpoint, {now[k]!r} now)" for k in fixed[:4])
        more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
        raise CheckpointError(
            f"cannot resume from {ckpt.folder}: the model config differs in {shown}{more}; "
            f"pass the same settings (e.g. --config {ckpt.folder / 'config.json'}) or train into a new --out"
        )
    if ckpt.epochs_done >= config.total_epochs:
        raise CheckpointError(
            f"checkpoint {ckpt.folder} has already done {ckpt.epochs_done} of {config.total_epochs} epochs; "
            "raise train.main_epochs (or fine_tune_epochs) to continue training"
        )
    if differing:
        logger.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(differing))
    return ckpt


def _resume(ckpt: Checkpoint, model, optimizer, device, teacher_dim: int) -> tuple[int, int]:
    if ckpt.teacher_dim != teacher_dim:
        raise CheckpointError(
            f"cannot resume from {ckpt.folder}: it was trained on {ckpt.teacher_dim}-D teacher embeddings, "
            f"this teacher gives {teacher_dim}-D"
        )
    load_weights(ckpt, model, device)
    load_optimizer(ckpt, optimizer, device)
    return ckpt.epochs_done, ckpt.step


def _log_epoch(metrics: dict[str, Any], phase: str, total: int) -> None:
    if "val_cosine" in metrics:
        logger.info(
            "epoch %d/%d %s: train_loss=%.4f val_cosine=%.4f (pca %.4f, mean %.4f) decode_top1=%.3f %.0f samples/s",
            metrics["epoch"], total, phase, metrics["train_loss"], metrics["val_cosine"],
            metrics["baseline_pca_cosine"], metrics["baseline_mean_cosine"], metrics["decode_top1"],
            metrics["throughput_samples_per_s"],
        )
    else:
        logger.info("epoch %d/%d %s: train_loss=%.4f", metrics["epoch"], total, phase, metrics["train_loss"])
