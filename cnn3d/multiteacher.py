"""One lattice, several teachers: a teacher->face and face->teacher map per teacher, a shared cube.

``MultiTeacherStudent`` keeps one ``LatticeStudent`` (``core``: the lattice, face I/O and the
first teacher's maps) plus an ``EmbeddingTransformer`` per further teacher (``heads``); every
teacher's embedding goes through the same cube. ``train_multi`` trains it on one corpus embedded
by every teacher and reports, per teacher, ``val_cosine/<teacher>`` beside that teacher's own
PCA ceiling and mean floor (``baseline_pca_cosine/<teacher>``, ``baseline_mean_cosine/<teacher>``)
and decoding accuracy against the corpus embedded by that teacher, plus ``val_cosine_fraction``: the
mean over teachers of val_cosine / PCA ceiling, a combined objective on one scale for teachers
whose ceilings differ.

Adding a teacher to a trained student: ``student.add_teacher(name, dim)``, then
``train_multi(..., student=student, train_only=(name,))`` trains only the new maps with the cube
and the other maps frozen; a second call without ``train_only`` fine-tunes everything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import metrics as M
from .cache import EmbeddingCache, embed_with_cache
from .checkpoint import load_optimizer, load_weights, read_checkpoint_meta, save_checkpoint
from .config import PRIMARY_TEACHER, Config, TeacherConfig, from_dict, parse_extra_teachers, to_dict
from .data import load_corpus
from .decode import PhraseBank, build_bank
from .device import autocast_dtype
from .errors import UserError
from .model import LatticeStudent, StudentOutput, build_model
from .teacher import load_teacher
from .train import _Loop, _train_epoch, baselines, build_optimizer, student_loss, warmup_steps
from .transfer import (
    TransferTable,
    carry_optimizer_state,
    init_source,
    log_table,
    stage_config,
    transfer_maps,
    transfer_options,
    transfer_weights,
)
from .transform import EmbeddingTransformer

logger = logging.getLogger(__name__)


class MultiTeacherStudent(nn.Module):
    """A shared lattice with one pair of face maps per teacher; ``forward(embedding, teacher)``."""

    def __init__(self, config: Config, teacher_dims: Mapping[str, int]):
        super().__init__()
        if not teacher_dims:
            raise UserError("a multi-teacher student needs at least one teacher")
        self.config = config
        self.teacher_dims = dict(teacher_dims)
        first, *_ = self.teacher_dims
        self.first = first
        self.core = build_model(config, self.teacher_dims[first])  # lattice, face I/O, first teacher's maps
        self.heads = nn.ModuleDict()
        for name in list(self.teacher_dims)[1:]:
            self.heads[name] = self._new_head(self.teacher_dims[name])

    @property
    def teachers(self) -> list[str]:
        return list(self.teacher_dims)

    def _new_head(self, dim: int) -> EmbeddingTransformer:
        _, h, w = self.core.dims
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed + len(self.teacher_dims))
            return EmbeddingTransformer(self.config.transform, dim, (self.config.lattice.face_channels, h, w))

    def maps(self, teacher: str) -> EmbeddingTransformer:
        """The teacher's face maps; an unknown name is a ``UserError`` listing the known ones."""
        if teacher == self.first:
            return self.core.transform
        if teacher not in self.heads:
            raise UserError(f"unknown teacher {teacher!r}; this student knows {', '.join(self.teachers)}")
        return self.heads[teacher]

    def add_teacher(self, name: str, dim: int) -> None:
        """New maps for ``name`` (``dim``-D embeddings) over the same cube."""
        if name in self.teacher_dims:
            raise UserError(f"teacher {name!r} is already part of this student")
        self.teacher_dims[name] = dim
        self.heads[name] = self._new_head(dim)

    @property
    def expert_names(self) -> list[str]:
        return self.core.expert_names

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.core.dims

    def forward(self, embedding: torch.Tensor, teacher: str | None = None) -> StudentOutput:
        """The student's output for ``teacher``'s embeddings ``[B, T_teacher]`` (default: the first teacher)."""
        maps = self.maps(teacher or self.first)
        face_in = maps.to_face(embedding)  # [B, F, H, W]
        state, gates, activity = self.core.run_lattice(face_in)
        face_out = self.core.face_io.readout(state[:, :, -1])
        return StudentOutput(maps.from_face(face_out), face_in, face_out, state, gates, activity)

    @property
    def steps(self) -> int:
        return self.core.steps

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The cube's learning-rate groups (``LatticeStudent.parameter_groups``), every teacher's maps in ``transform``."""
        groups = self.core.parameter_groups()
        groups["transform"] = groups["transform"] + [p for head in self.heads.values() for p in head.parameters()]
        return groups

    def trainable(self, only: Sequence[str] = ()) -> list[nn.Parameter]:
        """All parameters, or (``only``) those of the named teachers' maps, the rest frozen."""
        params = [p for name in only for p in self.maps(name).parameters()] if only else list(self.parameters())
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return params


# --------------------------------------------------------------------------- data


@dataclass
class TeacherData:
    """One teacher's embeddings of the shared corpus, and its phrase bank."""

    train: torch.Tensor  # [N, T_teacher]
    val: torch.Tensor  # [M, T_teacher]
    bank: PhraseBank
    baselines: dict[str, float] = field(default_factory=dict)


@dataclass
class MultiData:
    train_texts: list[str]
    val_texts: list[str]
    teachers: dict[str, TeacherData]


def prepare_multi(config: Config, teachers: Mapping[str, TeacherConfig], device: torch.device) -> MultiData:
    """The corpus of ``config.data`` embedded by every teacher (through the shared cache)."""
    corpus = load_corpus(config.data, min_sentences=config.train.batch_size, seed=config.train.seed)
    # the bank is the corpus itself: every teacher embeds nothing beyond it
    bank_texts = texts = list(dict.fromkeys(corpus.train + corpus.validation))
    row = {t: i for i, t in enumerate(texts)}
    cache = EmbeddingCache.from_config(config.data)
    out = {}
    for name, tcfg in teachers.items():
        vectors = embed_with_cache(load_teacher(tcfg, device), texts, cache)
        train, val, bank = (vectors[[row[t] for t in ts]] for ts in (corpus.train, corpus.validation, bank_texts))
        k = config.lattice.face_numbers
        out[name] = TeacherData(train, val, build_bank(bank_texts, bank), {
            "baseline_pca_cosine": M.baseline_pca_cosine(train, val, k),
            "baseline_mean_cosine": M.baseline_mean_cosine(train, val),
        })
    return MultiData(corpus.train, corpus.validation, out)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate_multi(student: MultiTeacherStudent, data: MultiData, batch: int = 256) -> dict[str, float]:
    """Per teacher: val_cosine, its baselines, fraction of its ceiling, decode top-1; plus the combined mean."""
    student.eval()
    metrics: dict[str, float] = {}
    fractions = []
    for name, td in data.teachers.items():
        pred = torch.cat([student(td.val[i : i + batch], name).embedding.float().cpu()
                          for i in range(0, len(td.val), batch)])
        cosine = M.mean_cosine(pred, td.val.cpu())
        ceiling = td.baselines["baseline_pca_cosine"]
        metrics[f"val_cosine/{name}"] = cosine
        metrics[f"baseline_pca_cosine/{name}"] = ceiling
        metrics[f"baseline_mean_cosine/{name}"] = td.baselines["baseline_mean_cosine"]
        metrics[f"val_cosine_fraction/{name}"] = cosine / ceiling
        metrics[f"decode_top1/{name}"] = td.bank.accuracy(pred, data.val_texts, k=1)[0]
        fractions.append(cosine / ceiling)
    metrics["val_cosine_fraction"] = sum(fractions) / len(fractions)
    return metrics


@dataclass
class MultiResult:
    metrics: dict[str, float]
    history: list[dict[str, float]]
    student: MultiTeacherStudent
    seconds: float


def train_multi(config: Config, data: MultiData, *, student: MultiTeacherStudent | None = None,
                train_only: Sequence[str] = (), epochs: int | None = None) -> MultiResult:
    """Train on every teacher of ``data`` (each batch: the mean of the teachers' losses).

    ``train_only`` names teachers whose maps alone are trained (the cube and the other maps stay
    frozen): the first stage of adding a teacher. ``epochs`` defaults to ``train.main_epochs``.
    The student trains where ``data`` lives, as ``cnn3d-train`` trains it (``multi_loop``).
    """
    started = time.perf_counter()
    device = next(iter(data.teachers.values())).train.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        if student is None:
            student = MultiTeacherStudent(config, {n: td.train.shape[1] for n, td in data.teachers.items()})
        missing = [n for n in data.teachers if n not in student.teacher_dims]
        if missing:
            raise UserError(f"the student has no maps for teacher(s) {', '.join(missing)}; add_teacher first")
        student.to(device)
        epochs = epochs if epochs is not None else config.train.main_epochs
        optimizer = build_optimizer(student, config, student.trainable(train_only))
        loop = multi_loop(config, student, optimizer, data, device, epochs)
        generator = torch.Generator().manual_seed(config.train.seed)
        history = []
        for epoch in range(epochs):
            order = torch.randperm(len(data.train_texts), generator=generator)
            stats = _train_epoch(loop, None, order, "main", f"epoch {epoch + 1}/{epochs}", False)
            history.append({"epoch": epoch + 1, "train_loss": stats["train_loss"], **evaluate_multi(student, data)})
            logger.info("epoch %d: val_cosine_fraction %.4f", epoch + 1, history[-1]["val_cosine_fraction"])
        student.trainable(())  # leave every parameter trainable again
    return MultiResult(history[-1] if history else evaluate_multi(student, data), history, student,
                       time.perf_counter() - started)


def multi_loop(config: Config, student: MultiTeacherStudent, optimizer: torch.optim.Optimizer, data: MultiData,
               device: torch.device, epochs: int) -> _Loop:
    """The single-teacher trainer's loop (``cnn3d.train._train_epoch``: autocast under ``train.precision``,
    ``train.grad_accum_steps``, ``train.scheduler`` over the whole run, gradient clipping, host syncs only every
    few batches, the run's own memory peak) with each batch's loss the mean of the teachers' losses."""
    per_step = config.train.batch_size * config.train.grad_accum_steps
    total = epochs * math.ceil(len(data.train_texts) / per_step)
    dtype = autocast_dtype(config.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    teachers = list(data.teachers.items())

    loop = _Loop(config, student, optimizer, device, dtype, scaler, total, warmup_steps(total))

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:  # loop.model: the cube grows under train.grow_schedule
        return sum(student_loss(loop.model, td.train[idx], config, name) for name, td in teachers) / len(teachers)

    loop.batch_loss = batch_loss
    return loop


# --------------------------------------------------------------------------- checkpoints


def save_multi(folder: str | Path, student: MultiTeacherStudent, teachers: Mapping[str, TeacherConfig],
               metrics: dict[str, float] | None = None, extra_meta: Mapping[str, Any] | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> Path:
    """A checkpoint folder (same files as ``cnn3d-train --out``) with every teacher in ``meta.json`` (and the
    optimiser's state, when given, for ``--resume``)."""
    meta = {
        "teacher_dim": student.teacher_dims[student.first],
        "teachers": {n: {"dim": student.teacher_dims[n], "config": to_dict(Config(teacher=teachers[n]))["teacher"]}
                     for n in student.teachers},
        "metrics": metrics or {},
        **(extra_meta or {}),
    }
    return save_checkpoint(folder, student, student.config, meta, optimizer)


def load_multi(folder: str | Path, device: torch.device | str = "cpu") -> tuple[MultiTeacherStudent, dict[str, TeacherConfig]]:
    """A multi-teacher checkpoint as (student, teacher configs by name)."""
    config, meta = read_checkpoint_meta(folder)
    if "teachers" not in meta:
        raise UserError(f"{folder} is a single-teacher checkpoint; load it with cnn3d.transfer.load_student")
    teachers = {n: from_dict({"teacher": t["config"]}).teacher for n, t in meta["teachers"].items()}
    student = MultiTeacherStudent(config, {n: int(t["dim"]) for n, t in meta["teachers"].items()})
    load_weights(folder, student, device)
    return student.to(device), teachers


@torch.no_grad()
def decode_multi(student: MultiTeacherStudent, teachers: Mapping[str, TeacherConfig], texts: list[str],
                 bank_texts: list[str], device: torch.device | str = "cpu") -> dict[str, list[tuple[str, float]]]:
    """Per teacher: each text embedded by that teacher, through the student, to its nearest bank phrase."""
    student.eval()
    bank_texts = list(dict.fromkeys(bank_texts + texts))
    out: dict[str, Any] = {}
    for name, tcfg in teachers.items():
        teacher = load_teacher(tcfg, device)
        bank = build_bank(bank_texts, teacher.embed(bank_texts))
        out[name] = bank.decode(student(teacher.embed(texts).to(device), name).embedding)
    return out


def as_single(student: MultiTeacherStudent) -> LatticeStudent:
    """The shared cube with the first teacher's maps: a plain student, e.g. for ``cnn3d.transfer``."""
    return student.core


# --------------------------------------------------------------------------- cnn3d-train with teacher.extra


def teacher_configs(config: Config) -> dict[str, TeacherConfig]:
    """Every teacher of a run by name: ``main`` (``teacher.*``) first, then ``teacher.extra`` in order.

    An extra teacher shares ``teacher.*`` except its pooling and (when given) its model.
    """
    base = dataclasses.replace(config.teacher, extra=())
    out = {PRIMARY_TEACHER: base}
    for name, (pooling, model) in parse_extra_teachers(config.teacher.extra).items():
        out[name] = dataclasses.replace(base, pooling=pooling, model=model or base.model, embedding_dim=0)
    return out


def multi_data_from(data, teachers: Mapping[str, Any], config: Config) -> MultiData:
    """``MultiData`` from the main teacher's prepared ``TrainingData`` plus loaded extra ``teachers`` (name -> Teacher).

    Each teacher's bank is the corpus (train + validation) embedded by that teacher, so ``decode_top1/<t>`` has
    the same candidates for every teacher; the extra teachers embed nothing beyond the corpus (shared cache).
    """
    texts = list(dict.fromkeys(data.train_texts + data.val_texts))
    main_vectors = torch.cat([data.train, data.val])
    row = {t: i for i, t in enumerate(data.train_texts + data.val_texts)}  # first occurrence wins below
    main_bank = main_vectors[[row[t] for t in texts]]
    out = {PRIMARY_TEACHER: TeacherData(data.train, data.val, build_bank(texts, main_bank))}
    cache = EmbeddingCache.from_config(config.data)
    for name, teacher in teachers.items():
        vectors = embed_with_cache(teacher, texts, cache)
        index = {t: i for i, t in enumerate(texts)}
        train, val = (vectors[[index[t] for t in ts]] for ts in (data.train_texts, data.val_texts))
        out[name] = TeacherData(train, val, build_bank(texts, vectors))
    return stage_teacher_data(MultiData(data.train_texts, data.val_texts, out), data, config)


def load_source(folder: str | Path) -> tuple[MultiTeacherStudent, dict[str, TeacherConfig]]:
    """Any checkpoint as a multi-teacher student: a single-teacher one becomes one with its teacher as ``main``."""
    from .transfer import load_student

    _, meta = read_checkpoint_meta(folder)
    if "teachers" in meta:
        return load_multi(folder)
    single, config, _ = load_student(folder)
    student = MultiTeacherStudent(config, {PRIMARY_TEACHER: single.teacher_dim})
    student.core.load_state_dict(single.state_dict())
    return student, {PRIMARY_TEACHER: config.teacher}


def initial_multi(config: Config, teacher_dims: Mapping[str, int],
                  teachers: Mapping[str, TeacherConfig]) -> tuple[MultiTeacherStudent, dict[str, Any], list[str]]:
    """The run's student, the transfer table (meta ``transfer``) and the teachers new to it.

    With ``train.init_from`` the cube comes from that checkpoint by ``cnn3d.transfer`` (any lattice size); every
    teacher the checkpoint knows by name keeps its maps (resampled when the face changed); the others are new.
    """
    student = MultiTeacherStudent(stage_config(config, 0), teacher_dims)
    if not init_source(config):
        return student, {}, []
    source, source_teachers = load_source(config.train.init_from)
    table = fill_from(source, student, str(config.train.init_from))
    for name, tcfg in teachers.items():
        old = source_teachers.get(name)
        if old is not None and (old.model, old.pooling, old.normalize) != (tcfg.model, tcfg.pooling, tcfg.normalize):
            logger.warning("teacher %r of train.init_from was %s/%s; its maps start from another space", name,
                           old.model, old.pooling)
    log_table(table)
    return student, {"transfer": table.as_dict()}, [n for n in student.teachers if n not in source.teacher_dims]


def fill_from(source: MultiTeacherStudent, target: MultiTeacherStudent, source_name: str) -> TransferTable:
    """Fill ``target`` from ``source`` by ``cnn3d.transfer``: the cube (``core``, any lattice size) and the maps of
    every teacher both know by name (resampled when the face changed); returns the ``TransferTable`` (entries
    ``core.*`` and ``heads.<t>.*``). The target's other teachers keep their fresh maps."""
    options = transfer_options(target.config)
    table = transfer_weights(source.core, target.core, **options)  # names what cannot
    table.source = source_name
    table.copied = [f"core.{e}" for e in table.copied]
    table.resampled = [f"core.{e}" for e in table.resampled]
    table.fresh = [f"core.{e}" for e in table.fresh]
    for name in target.heads:
        if name in source.teacher_dims:
            transfer_maps(source.maps(name), target.heads[name], f"heads.{name}.", table, options["face_map"])
    table.dropped += [f"maps of teacher {n}" for n in source.teachers if n not in target.teacher_dims]
    return table


def grow_multi(student: MultiTeacherStudent, stage: Config,
               device: torch.device) -> tuple[MultiTeacherStudent, TransferTable]:
    """``cnn3d.transfer.grow`` for several teachers: a student for ``stage`` (seeded by ``train.seed``), every
    teacher kept, filled from ``student``; returns it and the ``TransferTable``."""
    target = MultiTeacherStudent(stage, student.teacher_dims)
    table = fill_from(student, target, "x".join(map(str, student.dims)))
    return target.to(device), table


def stage_teacher_data(multi: MultiData, data, stage: Config) -> MultiData:
    """``multi`` with every teacher's baselines for ``stage``'s face: the PCA ceiling keeps as many components as
    the face has numbers, so it changes when the cube grows (the main teacher's come from ``baselines``, memoised)."""
    k = stage.lattice.face_numbers
    out = {}
    for name, td in multi.teachers.items():
        if name == PRIMARY_TEACHER:
            base = baselines(data, stage)
        else:
            base = {"baseline_pca_cosine": M.baseline_pca_cosine(td.train, td.val, k),
                    "baseline_mean_cosine": M.baseline_mean_cosine(td.train, td.val)}
        out[name] = TeacherData(td.train, td.val, td.bank, {key: base[key] for key in (
            "baseline_pca_cosine", "baseline_mean_cosine")})
    return MultiData(multi.train_texts, multi.val_texts, out)


def _resumed(ckpt, config: Config, teacher_dims: Mapping[str, int]) -> tuple[MultiTeacherStudent, dict, list[str]]:
    """The student of a several-teacher checkpoint being resumed, its transfer meta and its new teachers."""
    saved = ckpt.meta.get("teachers")
    if saved is None:
        raise UserError(f"cannot resume from {ckpt.folder}: it has one teacher and this run has several "
                        "(teacher.extra); resume without teacher.extra, or train into a new --out with --init-from")
    dims = {n: int(t["dim"]) for n, t in saved.items()}
    if dims != dict(teacher_dims):
        raise UserError(f"cannot resume from {ckpt.folder}: its teachers are {_dims_text(dims)}, this run's "
                        f"{_dims_text(teacher_dims)}; pass the same teacher.extra or train into a new --out")
    student = MultiTeacherStudent(stage_config(config, max(ckpt.epochs_done - 1, 0)), dims)  # the saved stage's cube
    load_weights(ckpt, student, "cpu")
    meta = {k: ckpt.meta[k] for k in ("transfer", "grow") if k in ckpt.meta}
    return student, meta, list(ckpt.meta.get("new_teachers", []))


def _dims_text(dims: Mapping[str, int]) -> str:
    return ", ".join(f"{n} ({d}-D)" for n, d in dims.items())


def train_multiteacher(config: Config, device: torch.device, callbacks, out_dir, resume_from, show: bool, data=None):
    """``cnn3d.train.train`` for ``teacher.extra``: one cube, every teacher, metrics per teacher, a checkpoint a
    epoch that ``cnn3d-decode`` decodes with each teacher. Returns a ``TrainResult`` (``model``: the
    ``MultiTeacherStudent``).

    Each batch runs the cube once per teacher and averages the losses (AdamW at ``train.lr`` under
    ``train.scheduler`` across all epochs, gradient clipping). With ``train.init_from``, teachers the checkpoint
    lacks first train alone for ``train.new_teacher_epochs`` of the ``train.main_epochs`` (the frozen-cube stage).
    ``resume_from`` continues a run from its checkpoint (weights, optimiser, schedule step, data order).
    """
    from .train import EpochReport, TrainResult, _memory_metric, _open_resume, prepare_data
    from .transfer import precheck

    started = time.perf_counter()
    teachers = teacher_configs(config)
    # a bad checkpoint to resume, an unloadable teacher or a bad train.init_from fails here: before any
    # embedding, epoch or write
    resume = _open_resume(resume_from, config) if resume_from is not None else None
    if resume is None:  # a resume ignores train.init_from, as a single-teacher resume does
        precheck(config)
    extra = {n: _load_extra(n, t, device) for n, t in teachers.items() if n != PRIMARY_TEACHER}
    data = data or prepare_data(config, device, progress=show)
    first_epoch = resume.epochs_done if resume else 0
    face_numbers = stage_config(config, first_epoch).lattice.face_numbers
    multi = multi_data_from(data, extra, stage_config(config, first_epoch))  # ceilings for the first epoch's face
    dims = {n: td.train.shape[1] for n, td in multi.teachers.items()}
    student, meta, new = initial_multi(config, dims, teachers) if resume is None else _resumed(resume, config, dims)
    student.to(device)
    frozen_epochs = min(config.train.new_teacher_epochs, config.train.main_epochs) if new else 0
    multi = MultiData(multi.train_texts, multi.val_texts,
                      {n: TeacherData(td.train.to(device), td.val.to(device), td.bank, td.baselines)
                       for n, td in multi.teachers.items()})
    generator = torch.Generator().manual_seed(config.train.seed)
    history, examples, loop = [], [], None
    total = config.train.main_epochs
    first_dims = stage_config(config, 0).lattice.dims
    for epoch in range(total):
        order = torch.randperm(len(multi.train_texts), generator=generator)  # replayed for skipped epochs on resume
        if epoch < first_epoch:
            continue
        frozen = epoch < frozen_epochs
        if loop is None:  # the student's optimiser as built, or as the checkpoint saved it (its last epoch's stage)
            was_frozen = (epoch - (1 if resume else 0)) < frozen_epochs
            optimizer = build_optimizer(student, config, student.trainable(new if was_frozen else ()),
                                        grown=student.dims != first_dims)
            if resume is not None:
                load_optimizer(resume, optimizer, device)
            loop = multi_loop(config, student, optimizer, multi, device, total)
            loop.step = resume.step if resume else 0
        stage = stage_config(config, epoch)
        if stage.lattice.dims != student.dims:  # train.grow_schedule: every teacher moves to the next stage's cube
            student, table = grow_multi(loop.model, stage, device)
            optimizer = build_optimizer(student, config, student.trainable(new if frozen else ()), grown=True)
            carried = carry_optimizer_state(loop.optimizer, loop.model, optimizer, student)
            log_table(table)
            logger.info("grew the cube at epoch %d; optimiser moments carried for %d tensors", epoch + 1, carried)
            meta.setdefault("grow", []).append({"epoch": epoch + 1, **table.as_dict()})
            loop.model, loop.optimizer = student, optimizer
        elif frozen_epochs and epoch == frozen_epochs:  # the frozen-cube stage is over: everything trains
            optimizer = build_optimizer(student, config, student.trainable(()), grown=student.dims != first_dims)
            loop.optimizer = optimizer
        if stage.lattice.face_numbers != face_numbers:  # each teacher's ceiling for this epoch's face
            multi, face_numbers = stage_teacher_data(multi, data, stage), stage.lattice.face_numbers
        epoch_start = time.perf_counter()
        phase = "new_teacher" if frozen else "main"
        metrics = {"epoch": epoch + 1, **_train_epoch(loop, None, order, phase, f"epoch {epoch + 1}/{total}", show),
                   **data.cache_metrics, **_main_metrics(student, data, stage, device),
                   **evaluate_multi(student, multi)}
        examples = metrics.pop("_examples")
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        metrics["peak_memory_mb"] = _memory_metric(device, loop.cpu_peak)
        history.append(metrics)
        logger.info("epoch %d/%d%s: val_cosine_fraction %.4f (%s)", epoch + 1, total, " (new maps only)" if frozen
                    else "", metrics["val_cosine_fraction"],
                    ", ".join(f"{n} {metrics[f'val_cosine/{n}']:.4f} of pca {metrics[f'baseline_pca_cosine/{n}']:.4f}"
                              for n in multi.teachers))
        if out_dir is not None:
            save_multi(out_dir, student, teachers, metrics,
                       {"epochs_done": epoch + 1, "step": loop.step, "new_teachers": new, **meta}, optimizer)
        report = EpochReport(epoch + 1, total, phase, metrics, examples)
        for callback in callbacks:
            callback(report)
    student.trainable(())
    return TrainResult(history[-1], history, examples, config, student, time.perf_counter() - started,
                       Path(out_dir) if out_dir else None, meta.get("transfer"))


def _load_extra(name: str, tcfg: TeacherConfig, device):
    try:
        return load_teacher(tcfg, device)
    except UserError as exc:
        raise UserError(f"teacher.extra {name}: {exc}") from None


@torch.no_grad()
def _main_metrics(student: MultiTeacherStudent, data, config: Config, device) -> dict[str, Any]:
    """The single-teacher names for the main teacher (val_cosine, baselines, decode on the usual bank), so
    reports, the CLI line and the tuner read a multi-teacher run like any other."""
    from .train import baselines

    student.eval()
    b = config.train.batch_size
    pred = torch.cat([student(data.val[i : i + b].to(device)).embedding.float().cpu()
                      for i in range(0, len(data.val), b)])
    top1, top5 = data.bank.accuracy(pred, data.val_texts, k=5)
    return {"val_cosine": M.mean_cosine(pred, data.val), "val_mse": nn.functional.mse_loss(pred, data.val).item(),
            "decode_top1": top1, "decode_top5": top5, **baselines(data, config),
            "_examples": [e.as_dict() for e in data.bank.examples(pred, data.val_texts, n=8)]}


def decode_checkpoint(checkpoint: str | Path, texts: list[str], bank_file: str | None = None, top: int = 3,
                      only: str | None = None) -> dict[str, list]:
    """``cnn3d-decode`` for a multi-teacher checkpoint: per teacher (or ``only``), ``cnn3d.decode.Decoding``s of
    ``texts`` embedded by that teacher, through the cube, against the bank of ``cnn3d.decode.bank_texts``
    embedded by the same teacher."""
    import torch.nn.functional as F

    from .config import with_overrides
    from .decode import Decoding, bank_texts
    from .device import resolve_device

    config, _ = read_checkpoint_meta(checkpoint)
    if bank_file:
        config = with_overrides(config, {"data.decode_bank": bank_file})
    device = resolve_device(config.train.device)
    student, teachers = load_multi(checkpoint, device)
    if only is not None:
        student.maps(only)  # an unknown name is one line listing the known ones
        teachers = {only: teachers[only]}
    student.eval()
    phrases = bank_texts(load_corpus(config.data), config.data, texts)
    cache = EmbeddingCache.from_config(config.data)
    out = {}
    for name, tcfg in teachers.items():
        teacher = load_teacher(tcfg, device)
        bank = build_bank(phrases, embed_with_cache(teacher, phrases, cache))
        targets = embed_with_cache(teacher, texts, cache).to(device)
        with torch.no_grad():
            outputs = student(targets, name).embedding.float().cpu()
        scores, idx = bank.search(outputs, k=top)
        fidelity = F.cosine_similarity(outputs, targets.cpu(), dim=-1)
        out[name] = [Decoding(t, [(bank.texts[i], sc) for i, sc in zip(r_idx.tolist(), r_sc.tolist())], f.item())
                     for t, r_idx, r_sc, f in zip(texts, idx, scores, fidelity)]
    return out
