"""One configuration for the whole project, as nested dataclasses.

Every field carries a default, a one-line doc and, where it makes sense, a
valid range or a set of choices (``field.metadata``). The tuner derives its
search spaces from that metadata, the CLIs derive ``--set`` help from it, and
``flatten``/``with_overrides`` speak one dotted vocabulary
(``transform.dropout``, ``lattice.size``) used everywhere: CLI overrides,
Optuna parameter names, MLflow params and saved config JSON.

No singleton: build a ``Config`` (or take a ``preset``) and pass it down.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

__all__ = [
    "Config",
    "ConfigError",
    "ContinualConfig",
    "DataConfig",
    "FieldSpec",
    "LatticeConfig",
    "LossConfig",
    "MoEConfig",
    "PRESETS",
    "TeacherConfig",
    "TrainConfig",
    "TransformConfig",
    "field_spec",
    "field_specs",
    "flatten",
    "from_dict",
    "load_config",
    "preset",
    "save_config",
    "to_dict",
    "unflatten",
    "with_overrides",
]

EXPERT_NAMES = ("local", "functional", "distant")


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message says what would be right."""


def param(default: Any, doc: str, *, low=None, high=None, choices=None, log=False, tune=True):
    """A dataclass field with a doc line and an optional range or choices.

    ``low``/``high`` are inclusive bounds; ``log`` marks fields searched on a log
    scale (learning rates); ``tune=False`` keeps a field out of default search spaces.
    """
    meta = {"doc": doc, "low": low, "high": high, "choices": choices, "log": log, "tune": tune}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen Hugging Face encoder that provides target embeddings."""

    model: str = param(
        "all-MiniLM-L6-v2",
        "Hub name or local folder of the teacher; 'all-MiniLM-L6-v2' loads the bundled offline copy.",
        tune=False,
    )
    pooling: Literal["mean", "cls"] = param("mean", "How token states become one sentence vector.", choices=("mean", "cls"))
    normalize: bool = param(False, "L2-normalise teacher embeddings.")
    max_length: int = param(64, "Tokens per sentence before truncation.", low=8, high=512, tune=False)
    batch_size: int = param(128, "Sentences per teacher forward pass.", low=1, high=4096, tune=False)
    embedding_dim: int = param(
        0, "Expected teacher dimension; 0 takes it from the model (a mismatch is an error).", low=0, high=16384, tune=False
    )
    extra: tuple[str, ...] = param(
        (), "Further teachers on the same cube, NAME:POOLING[:MODEL] (model defaults to teacher.model), e.g. cls:cls; "
        "the teacher.model one is called main (docs/transfer.md).", tune=False,
    )


@dataclass(frozen=True)
class TransformConfig:
    """The embedding transformer between the teacher space and the lattice faces."""

    kind: Literal["linear", "hierarchical", "attention", "autoencoder"] = param(
        "linear", "Architecture of teacher->face and face->teacher maps.",
        choices=("linear", "hierarchical", "attention", "autoencoder"),
    )
    hidden_sizes: tuple[int, ...] = param(
        (512, 1024), "Hidden widths of the hierarchical/autoencoder stacks (e.g. 768->512->1024->face).", tune=False
    )
    dropout: float = param(0.0, "Dropout inside the transformer.", low=0.0, high=0.5)
    layer_norm: bool = param(True, "LayerNorm on the face and on the output.")
    positional_encoding: bool = param(True, "Learned positional encoding added over the input face.")
    attention_tokens: int = param(16, "Tokens the teacher vector is split into for kind=attention.", low=1, high=256)
    attention_heads: int = param(4, "Heads for kind=attention.", low=1, high=16)


@dataclass(frozen=True)
class LatticeConfig:
    """Geometry and dynamics of the 3D lattice. Tensors are [B, C, D, H, W]; front face z=0."""

    size: int = param(8, "Cube side; depth/height/width default to it.", low=2, high=128)
    depth: int = param(0, "Cells along z (front z=0 to back z=depth-1); 0 uses size.", low=0, high=256, tune=False)
    height: int = param(0, "Face height; 0 uses size.", low=0, high=256, tune=False)
    width: int = param(0, "Face width; 0 uses size.", low=0, high=256, tune=False)
    steps: int = param(8, "Message-passing steps; 0 means the lattice never sees the input.", low=0, high=512)
    state_size: int = param(16, "Channels of state per cell.", low=1, high=512)
    face_channels: int = param(1, "Numbers per face cell carried in and out (1 = one number per cell).", low=1, high=64)
    boundary: Literal["zero", "periodic"] = param("zero", "Beyond the lattice edge: zeros or wrap-around.", choices=("zero", "periodic"))
    update_rate: float = param(0.8, "Damping: s <- (1-r)*s + r*tanh(message).", low=0.05, high=1.0)
    inject: Literal["every_step", "once"] = param(
        "every_step", "Drive the front face with the input at every step or only the first.", choices=("every_step", "once")
    )

    @property
    def dims(self) -> tuple[int, int, int]:
        """(depth, height, width) after applying ``size`` defaults."""
        return (self.depth or self.size, self.height or self.size, self.width or self.size)

    @property
    def face_numbers(self) -> int:
        """Numbers carried by one face: height * width * face_channels (the seed plan's cube_embedding_dim)."""
        _, h, w = self.dims
        return h * w * self.face_channels

    @property
    def num_cells(self) -> int:
        d, h, w = self.dims
        return d * h * w


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts connection processor shared by all cells."""

    experts: tuple[str, ...] = param(EXPERT_NAMES, "Experts in use, any of local, functional, distant.", tune=False)
    local_hidden: int = param(0, "Hidden width of an extra per-cell MLP in the local expert (0 = stencil only).", low=0, high=1024)
    functional_radius: int = param(2, "Reach of the functional expert along each axis (6*radius neighbours).", low=1, high=8)
    distant_links: int = param(4, "Fixed long-range links per cell for the distant expert.", low=1, high=64)
    distant_min_distance: int = param(2, "Chebyshev distance a distant link must at least span.", low=2, high=64)
    gating: Literal["softmax", "topk"] = param("softmax", "Gate weighting over experts.", choices=("softmax", "topk"))
    top_k: int = param(2, "Experts kept per cell when gating=topk.", low=1, high=3)
    gate_temperature: float = param(1.0, "Softmax temperature of the gate.", low=0.05, high=10.0, log=True)
    seed: int = param(0, "Seed of the fixed distant-link pattern.", low=0, high=2**31 - 1, tune=False)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training losses (0 switches a term off)."""

    reconstruction: float = param(1.0, "MSE to the teacher embedding.", low=0.0, high=10.0)
    cosine: float = param(1.0, "1 - cosine similarity to the teacher embedding.", low=0.0, high=10.0)
    diversity: float = param(0.1, "Penalty on a batch of outputs collapsing onto one vector.", low=0.0, high=5.0)
    sparsity: float = param(0.01, "L1 on cell activity (mean |state|): pushes towards sparse activations.", low=0.0, high=1.0)
    load_balance: float = param(0.01, "Expert load balance (E * sum usage^2 - 1); 0 lets the gate favour experts freely.", low=0.0, high=1.0)
    triplet: float = param(0.0, "Triplet loss over teacher-space neighbours.", low=0.0, high=5.0)
    triplet_margin: float = param(0.1, "Cosine margin of the triplet loss.", low=0.0, high=1.0)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, phases, precision and the device."""

    warmup_epochs: int = param(0, "Warm-up epochs (synthetic sentences when train.warmup_synthetic).", low=0, high=1000, tune=False)
    main_epochs: int = param(3, "Main epochs on the corpus (15 reach 0.98 of the PCA baseline on the test preset; tuner trials use fewer).", low=0, high=10000, tune=False)
    fine_tune_epochs: int = param(0, "Fine-tune epochs at a tenth of the learning rate.", low=0, high=1000, tune=False)
    warmup_synthetic: bool = param(True, "Warm up on generated sentences instead of the corpus.", tune=False)
    batch_size: int = param(32, "Sentences per optimiser micro-batch.", low=1, high=4096)
    grad_accum_steps: int = param(1, "Micro-batches accumulated per optimiser step.", low=1, high=256)
    lr: float = param(3e-3, "Base AdamW learning rate.", low=1e-5, high=1e-1, log=True)
    lr_mult_local: float = param(1.0, "Learning-rate multiplier of the local expert.", low=0.1, high=10.0, log=True)
    lr_mult_functional: float = param(1.0, "Learning-rate multiplier of the functional expert.", low=0.1, high=10.0, log=True)
    lr_mult_distant: float = param(1.0, "Learning-rate multiplier of the distant expert.", low=0.1, high=10.0, log=True)
    lr_mult_gating: float = param(1.0, "Learning-rate multiplier of the gate.", low=0.1, high=10.0, log=True)
    lr_mult_transform: float = param(1.0, "Learning-rate multiplier of the embedding transformers.", low=0.1, high=10.0, log=True)
    weight_decay: float = param(0.01, "AdamW weight decay.", low=0.0, high=0.5)
    grad_clip: float = param(1.0, "Max gradient norm (0 = no clipping).", low=0.0, high=100.0)
    scheduler: Literal["cosine", "constant", "linear"] = param(
        "cosine", "Learning-rate schedule after a short linear warm-up.", choices=("cosine", "constant", "linear")
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = param(
        "fp32", "Autocast precision; auto = bf16 on CUDA when supported, else fp32.", choices=("auto", "fp32", "bf16", "fp16")
    )
    gradient_checkpointing: bool = param(False, "Recompute lattice steps in backward to bound memory.", tune=False)
    freeze_transforms: bool = param(False, "Train only the MoE experts and gate; freeze the embedding transformers.")
    curriculum: bool = param(False, "Start on the easiest sentences and widen to harder ones.")
    curriculum_start_difficulty: float = param(0.3, "Easiest fraction of the corpus used at the first epoch.", low=0.01, high=1.0)
    curriculum_end_difficulty: float = param(1.0, "Fraction used by the last main epoch.", low=0.01, high=1.0)
    seed: int = param(0, "Seed of weights, data order and dropout.", low=0, high=2**31 - 1, tune=False)
    device: Literal["auto", "cpu", "cuda", "mps"] = param("auto", "Where to train; auto picks cuda, then mps, then cpu.", choices=("auto", "cpu", "cuda", "mps"), tune=False)
    num_threads: int = param(0, "Torch CPU threads (0 = leave torch's default).", low=0, high=1024, tune=False)
    eval_every: int = param(1, "Validate every N epochs (the last epoch is always validated).", low=1, high=1000, tune=False)
    emergence_nulls: bool = param(True, "At the last epoch, measure every emergence metric beside its untrained-cube and shuffled nulls.", tune=False)
    init_from: str = param(
        "", "Checkpoint folder whose weights start this run, transferred to this lattice's size (see docs/transfer.md); "
        "'' or none = from scratch.", tune=False
    )
    grow_schedule: str = param(
        "none", "Grow the cube while training: SIZExEPOCHS stages joined by '+' (8x2+12x2), then lattice.size; 'none' = fixed size.", tune=False
    )
    init_fresh_directions: bool = param(
        False, "With train.transfer_face=stretch, to a larger face: keep fresh initial weights in the face maps along "
        "the face directions interpolation cannot reach, instead of zeros (docs/transfer.md).", tune=False,
    )
    transfer_face: Literal["stretch", "embed"] = param(
        "embed", "Transfer to another face size (train.init_from, growing): 'embed' places the source face (and, when as "
        "deep or deeper, its distant links) unscaled in the centre, new cells fresh; 'stretch' interpolates it over the "
        "new face (docs/transfer.md).",
        choices=("stretch", "embed"), tune=False,
    )
    transfer_lr_mult: float = param(
        0.3, "With train.init_from: learning-rate multiplier of the cube (gate and experts), which starts trained; the "
        "face maps, partly new, keep their own lr (docs/transfer.md).", low=0.01, high=1.0, log=True, tune=False,
    )
    readout_refit: Literal["transfer", "always", "never"] = param(
        "transfer", "Fit the face->teacher map's linear part to the training set by ridge regression over the back "
        "face (one forward pass) before training: 'transfer' after train.init_from and each growth step (the new face "
        "cells are read from the first step; the face maps then train at the cube's lr), 'always' also from scratch, "
        "'never' (docs/transfer.md; single-teacher, single-corpus runs).", choices=("transfer", "always", "never"), tune=False,
    )
    grow_lr_mult: float = param(
        1.0, "With train.grow_schedule: learning-rate multiplier of the cube (gate and experts) after each growth step, "
        "as train.transfer_lr_mult is for train.init_from; the face maps keep their own lr (docs/transfer.md).",
        low=0.01, high=1.0, log=True, tune=False,
    )
    new_teacher_epochs: int = param(
        1, "With train.init_from and teacher.extra naming teachers the checkpoint lacks: the first N main epochs train "
        "only their new maps (cube and other maps frozen), the rest train everything.", low=0, high=1000, tune=False,
    )


@dataclass(frozen=True)
class DataConfig:
    """Corpus, split and the embedding cache."""

    corpus: str = param("builtin", "'builtin', 'synthetic', a .txt/.jsonl/.csv file or folder, or hf:DATASET[:SPLIT].", tune=False)
    text_column: str = param("text", "Column holding the text in .jsonl/.csv corpora.", tune=False)
    validation_fraction: float = param(0.2, "Share of sentences in the validation split (by hash, stable).", low=0.01, high=0.9, tune=False)
    max_sentences: int = param(0, "Use at most this many sentences (0 = all).", low=0, high=10_000_000, tune=False)
    min_words: int = param(3, "Drop sentences shorter than this.", low=1, high=1000, tune=False)
    max_words: int = param(64, "Drop sentences longer than this.", low=1, high=10000, tune=False)
    synthetic_sentences: int = param(2000, "Generated sentences for warm-up (or corpus=synthetic).", low=1, high=10_000_000, tune=False)
    cache: bool = param(True, "Keep teacher embeddings in the on-disk cache.", tune=False)
    cache_dir: str = param("~/.cache/cnn3d/embeddings", "Folder of the shared embedding cache.", tune=False)
    max_cache_size_gb: float = param(10.0, "Cap of the cache; least-recently-used shards are evicted beyond it.", low=0.0, high=10_000.0, tune=False)
    cache_dtype: Literal["float16", "float32"] = param("float32", "Storage precision of cached vectors.", choices=("float16", "float32"), tune=False)
    decode_bank: str = param("", "Extra text file whose lines join the decoder's phrase bank (validation split, plus the built-in corpus when corpus=builtin).", tune=False)
    domains: tuple[str, ...] = param(
        (), "Corpora trained one after another (continual learning), e.g. builtin:news,builtin:dialogue; "
        "empty = train on data.corpus alone.", tune=False,
    )


CONTINUAL_FREEZABLE = ("transform", "gating", "local", "functional", "distant")


@dataclass(frozen=True)
class ContinualConfig:
    """Remedies against forgetting when data.domains holds a sequence (see docs/continual.md)."""

    ewc_lambda: float = param(0.0, "EWC: weight of the penalty on drifting from earlier stages (0 = off).", low=0.0, high=1e4)
    ewc_samples: int = param(256, "EWC: training sentences used to estimate the diagonal Fisher after a stage (0 = all).", low=0, high=10_000_000, tune=False)
    replay_size: int = param(0, "Replay: earlier stages' teacher embeddings kept in the buffer (0 = no replay).", low=0, high=10_000_000, tune=False)
    replay_fraction: float = param(0.25, "Replay: share of each batch drawn from the buffer.", low=0.0, high=1.0)
    freeze: tuple[str, ...] = param(
        (), "Parameter groups frozen after the first stage: any of transform, gating, local, functional, distant.", tune=False
    )
    joint: bool = param(False, "Train on all data.domains at once (the upper bound) instead of in sequence.", tune=False)
    baselines: bool = param(
        False, "Also train naive sequential, joint and single-domain students on the same domains in this run and "
        "report them beside it (cl_naive/*, cl_joint/*, cl_single/*, cl_plasticity; several times the training time).",
        tune=False,
    )
    new_expert: bool = param(
        False, "Progressive experts: at every later stage add a copy of the local expert (named local2, local3, ...) "
        "that splits the local expert's gate share, so the cube's output is unchanged when it joins.",
    )


SECTIONS = {
    "teacher": TeacherConfig,
    "transform": TransformConfig,
    "lattice": LatticeConfig,
    "moe": MoEConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "continual": ContinualConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole project's configuration; see each section for its fields."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    lattice: LatticeConfig = field(default_factory=LatticeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def total_epochs(self) -> int:
        t = self.train
        return t.warmup_epochs + t.main_epochs + t.fine_tune_epochs


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class FieldSpec:
    """What the config knows about one dotted key: type, default, doc, range or choices."""

    key: str
    type: Any
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    log: bool = False
    tune: bool = True

    @property
    def kind(self) -> str:
        """'bool', 'int', 'float', 'str', 'tuple' or 'choice'."""
        if self.choices:
            return "choice"
        return {bool: "bool", int: "int", float: "float", str: "str"}.get(self.type, "tuple")


def _field_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return str
    if origin in (tuple,):
        return tuple
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def field_specs() -> dict[str, FieldSpec]:
    """Every dotted key of ``Config`` with its metadata, in declaration order."""
    return dict(_field_specs())  # a copy: callers may add to it


@functools.cache  # the classes do not change; resolving their type hints took ~80 ms a call, per Config built
def _field_specs() -> dict[str, FieldSpec]:
    specs = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{section}.{f.name}"
            specs[key] = FieldSpec(
                key=key, type=_field_type(hints[f.name]), default=default, doc=m.get("doc", ""),
                low=m.get("low"), high=m.get("high"),
                choices=tuple(m["choices"]) if m.get("choices") else None,
                log=m.get("log", False), tune=m.get("tune", True),
            )
    return specs


def field_spec(key: str) -> FieldSpec:
    """Metadata of one dotted key; unknown keys raise ``ConfigError`` with suggestions."""
    specs = field_specs()
    if key not in specs:
        raise ConfigError(unknown_key_message(key, specs))
    return specs[key]


def unknown_key_message(key: str, specs: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(specs), n=3, cutoff=0.5)
    if not close:  # match on the last part alone, e.g. "dropout" -> transform.dropout
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in specs if k.rsplit(".", 1)[-1] == tail][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --list-keys to see them all"
    return f"unknown config key '{key}'{hint}"


# --------------------------------------------------------------------------- coercion & validation


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def coerce(spec: FieldSpec, value: Any) -> Any:
    """Turn ``value`` (possibly a CLI string or a JSON list) into the field's type."""
    try:
        if spec.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in _TRUE | _FALSE:
                return s in _TRUE
            raise ValueError
        if spec.type is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if spec.type is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if spec.type is tuple:
            if isinstance(value, str):
                parts = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
            else:
                parts = list(value)
            elem = int if isinstance(spec.default, tuple) and spec.default and isinstance(spec.default[0], int) else str
            return tuple(elem(p) for p in parts)
        return str(value)
    except (TypeError, ValueError):
        want = {bool: "true or false", int: "an integer", float: "a number", tuple: "a comma-separated list"}.get(spec.type, "a string")
        raise ConfigError(f"{spec.key}={value!r} is not {want}") from None


def check_value(spec: FieldSpec, value: Any) -> None:
    """Raise ``ConfigError`` naming the field, the value and what is allowed."""
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{spec.key}={value!r} is not one of {', '.join(map(str, spec.choices))}")
    numeric = spec.type in (int, float) and not isinstance(value, bool)
    if numeric and isinstance(value, float) and not math.isfinite(value):  # NaN passes every < and > test
        allowed = f" in [{spec.low}, {spec.high}]" if spec.low is not None or spec.high is not None else ""
        raise ConfigError(f"{spec.key}={value!r} is not a finite number; give a number{allowed}")
    if numeric and (spec.low is not None and value < spec.low or spec.high is not None and value > spec.high):
        raise ConfigError(f"{spec.key}={value!r} is out of range [{spec.low}, {spec.high}]")
    if spec.key in VALUE_CHECKS:  # string keys with a grammar: malformed values fail here, at parse time
        VALUE_CHECKS[spec.key](value)


def validate(config: Config) -> None:
    """Check every field against its metadata, then the cross-field rules."""
    flat = flatten(config)
    for key, spec in field_specs().items():
        check_value(spec, flat[key])
    unknown = [e for e in config.moe.experts if e not in EXPERT_NAMES and not _is_added_expert(e)]
    if unknown or not config.moe.experts or len(set(config.moe.experts)) != len(config.moe.experts):
        raise ConfigError(
            f"moe.experts={','.join(config.moe.experts)!s} must be distinct names from {', '.join(EXPERT_NAMES)} "
            "(or local2, local3, ... as added by continual.new_expert)"
        )
    if config.moe.gating == "topk" and config.moe.top_k > len(config.moe.experts):
        raise ConfigError(f"moe.top_k={config.moe.top_k} exceeds the {len(config.moe.experts)} experts in moe.experts")
    if any(h < 1 for h in config.transform.hidden_sizes) or not config.transform.hidden_sizes:
        raise ConfigError(f"transform.hidden_sizes={config.transform.hidden_sizes} must be one or more positive widths")
    if config.train.curriculum_end_difficulty < config.train.curriculum_start_difficulty:
        raise ConfigError(
            "train.curriculum_end_difficulty must be >= train.curriculum_start_difficulty "
            f"(got {config.train.curriculum_end_difficulty} < {config.train.curriculum_start_difficulty})"
        )
    if (config.lattice.boundary == "periodic" and "functional" in config.moe.experts
            and config.moe.functional_radius > min(config.lattice.dims)):
        raise ConfigError(
            f"moe.functional_radius={config.moe.functional_radius} exceeds the smallest lattice side "
            f"{min(config.lattice.dims)} with lattice.boundary=periodic (it would wrap more than once); "
            f"use a radius <= {min(config.lattice.dims)} or lattice.boundary=zero"
        )
    if config.data.max_words < config.data.min_words:
        raise ConfigError(f"data.max_words={config.data.max_words} must be >= data.min_words={config.data.min_words}")
    if config.total_epochs < 1:
        raise ConfigError("train.warmup_epochs + train.main_epochs + train.fine_tune_epochs must be at least 1")
    stages = grow_stages(config.train.grow_schedule)
    if stages and sum(epochs for _, epochs in stages) >= config.total_epochs:
        raise ConfigError(
            f"train.grow_schedule={config.train.grow_schedule} uses {sum(e for _, e in stages)} of the "
            f"{config.total_epochs} epochs; leave at least one for lattice.size={config.lattice.size}"
        )
    if config.teacher.extra and (config.train.warmup_epochs or config.train.fine_tune_epochs or config.data.domains):
        raise ConfigError("teacher.extra (several teachers) trains train.main_epochs only: set train.warmup_epochs, "
                          "train.fine_tune_epochs to 0 and leave data.domains empty")
    validate_continual(config)


def grow_stages(schedule: str) -> list[tuple[int, int]]:
    """``'8x2+12x2'`` -> ``[(8, 2), (12, 2)]`` (cube side, epochs); ``'none'`` or ``''`` -> ``[]``."""
    text = schedule.strip().lower()
    if text in ("", "none"):
        return []
    stages = []
    for part in text.split("+"):
        size, sep, epochs = part.strip().partition("x")
        if not (sep and size.strip().isdigit() and epochs.strip().isdigit()):
            raise ConfigError(f"train.grow_schedule={schedule!r} is malformed; write SIZExEPOCHS stages joined by '+', e.g. 8x2+12x2, or none")
        stage = (int(size), int(epochs))
        if not (2 <= stage[0] <= 128 and stage[1] >= 1):
            raise ConfigError(f"train.grow_schedule={schedule!r}: sizes must lie in [2, 128] and epochs be >= 1")
        stages.append(stage)
    return stages


def parse_extra_teachers(entries: typing.Iterable[str]) -> dict[str, tuple[str, str]]:
    """``teacher.extra`` entries ``NAME:POOLING[:MODEL]`` -> ``{name: (pooling, model or '')}`` ('' = teacher.model)."""
    out: dict[str, tuple[str, str]] = {}
    for entry in entries:
        name, _, rest = entry.strip().partition(":")
        pooling, _, model = rest.partition(":")
        name, pooling, model = name.strip(), pooling.strip(), model.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum() or pooling not in ("mean", "cls"):
            raise ConfigError(f"teacher.extra entry {entry!r} is malformed; write NAME:POOLING[:MODEL] with POOLING "
                              "mean or cls, e.g. teacher.extra=cls:cls or distil:mean:/models/distilbert")
        if name == PRIMARY_TEACHER or name in out:
            raise ConfigError(f"teacher.extra: the name {name!r} is taken (twice in the list, or {PRIMARY_TEACHER!r}: "
                              "teacher.model's own teacher); give every extra teacher its own name")
        out[name] = (pooling, model)
    return out


PRIMARY_TEACHER = "main"  # the name of teacher.model's teacher in a multi-teacher run (val_cosine/main)
VALUE_CHECKS = {"train.grow_schedule": grow_stages, "teacher.extra": parse_extra_teachers}


def validate_continual(config: Config) -> None:
    """Cross-field rules of data.domains and the continual section."""
    domains = config.data.domains
    if len(domains) == 1:
        raise ConfigError(f"data.domains={domains[0]} holds one domain but a sequence needs at least two "
                          "(e.g. data.domains=builtin:news,builtin:dialogue); leave it empty to train on data.corpus")
    if any(not d.strip() for d in domains):
        raise ConfigError(f"data.domains={','.join(domains)} has an empty entry; every domain needs a corpus spec")
    bad = [f for f in config.continual.freeze if f not in CONTINUAL_FREEZABLE]
    if bad or len(set(config.continual.freeze)) != len(config.continual.freeze):
        raise ConfigError(f"continual.freeze={','.join(config.continual.freeze)} must be distinct names from "
                          f"{', '.join(CONTINUAL_FREEZABLE)}")
    if len(domains) >= 2 and grow_stages(config.train.grow_schedule):
        raise ConfigError(f"train.grow_schedule={config.train.grow_schedule} is not supported over data.domains; "
                          "set train.grow_schedule=none (or grow in a single-corpus run and pass it as train.init_from)")
    groups = {"transform", "gating", *config.moe.experts}
    if not config.continual.new_expert and groups <= set(config.continual.freeze):
        raise ConfigError(f"continual.freeze={','.join(config.continual.freeze)} freezes every parameter group after "
                          "the first stage; leave one trainable (or add continual.new_expert=true)")
    if config.continual.new_expert:
        if config.continual.joint:
            raise ConfigError("continual.new_expert=true adds an expert per later stage, but continual.joint=true "
                              "trains one stage; drop one of the two")
        if "local" not in config.moe.experts:
            raise ConfigError(f"continual.new_expert=true copies the local expert, but moe.experts="
                              f"{','.join(config.moe.experts)} has none; add local to moe.experts")
        if config.moe.gating == "topk":
            raise ConfigError("continual.new_expert=true needs moe.gating=softmax (splitting a gate share is exact "
                              "only under softmax; top-k would change which experts are picked)")


def _is_added_expert(name: str) -> bool:
    """``local2``, ``local3``, ...: a copy of the local expert added for a later stage (``continual.new_expert``)."""
    return name.startswith("local") and name[5:].isdigit() and int(name[5:]) >= 2 and not name[5:].startswith("0")


# --------------------------------------------------------------------------- dotted vocabulary


def flatten(config: Config) -> dict[str, Any]:
    """``{dotted_key: value}`` for every field; ``unflatten`` inverts it exactly."""
    return {
        f"{section}.{f.name}": getattr(getattr(config, section), f.name)
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
    }


def unflatten(flat: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a validated ``Config`` from dotted keys (missing keys keep ``base``'s values)."""
    return with_overrides(base or Config(), flat)


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """A new validated config with ``overrides`` (dotted keys; strings are coerced by field type).

    Unknown keys raise ``ConfigError`` listing the closest valid keys; out-of-range
    values raise naming the field, the value and the allowed range.
    """
    specs = field_specs()
    per_section: dict[str, dict[str, Any]] = {}
    for key, value in _expand_deprecated(overrides).items():
        if key not in specs:
            raise ConfigError(unknown_key_message(key, specs))
        spec = specs[key]
        value = coerce(spec, value)
        check_value(spec, value)
        section, name = key.split(".", 1)
        per_section.setdefault(section, {})[name] = value
    replaced = {
        section: dataclasses.replace(getattr(config, section), **changes) for section, changes in per_section.items()
    }
    return dataclasses.replace(config, **replaced)


# old key -> the keys it now sets to the same value (the old term was exactly their sum)
DEPRECATED_KEYS = {"loss.emergence": ("loss.sparsity", "loss.load_balance")}


def _expand_deprecated(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Replace deprecated keys by their successors (explicit successor values win), warning once per key."""
    out = {k: v for k, v in overrides.items() if k not in DEPRECATED_KEYS}
    for old, new_keys in DEPRECATED_KEYS.items():
        if old in overrides:
            logging.getLogger(__name__).warning("%s is deprecated; it sets %s", old, " and ".join(new_keys))
            for key in new_keys:
                out.setdefault(key, overrides[old])
    return out


def parse_assignments(items: typing.Iterable[str]) -> dict[str, str]:
    """``["a.b=1", "c.d=x"]`` -> ``{"a.b": "1", "c.d": "x"}``; a malformed item raises ``ConfigError``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. transform.dropout=0.1), got {item!r}")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------- files


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dict (tuples become lists) for JSON/YAML."""
    return {
        section: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(config, section)).items()}
        for section in SECTIONS
    }


def from_dict(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """Inverse of ``to_dict``; accepts nested sections or flat dotted keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return with_overrides(base or Config(), flat)


def save_config(config: Config, path: str | Path) -> Path:
    """Write JSON (or YAML for .yaml/.yml) that ``load_config`` reads back exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(config)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"  # strict JSON: validation rejects NaN/inf
    path.write_text(text)
    return path


def load_config(path: str | Path, base: Config | None = None) -> Config:
    """Read a JSON/YAML config file; errors name the file and the problem in one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parser error becomes one line
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}".splitlines()[0]) from None
    try:
        return from_dict(data or {}, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- presets


PRESETS: dict[str, dict[str, Any]] = {
    # 8x8x8, one number per face cell: seconds per epoch on a laptop CPU.
    "test": {},
    # the 8x8 face is a tight bottleneck (see BENCHMARKS.md); a 16x16 face at depth 8.
    "wide": {"lattice.size": 16, "lattice.depth": 8, "lattice.steps": 8, "train.lr": 6e-3},
    # The plan's full size: 37x37x37, face 37x37 = 1369 numbers.
    "full": {
        "lattice.size": 37,
        "lattice.steps": 40,
        "transform.kind": "hierarchical",
        "train.batch_size": 8,
        "train.gradient_checkpointing": True,
        "train.precision": "auto",
    },
}


def preset(name: str) -> Config:
    """A named starting configuration: 'test' (8^3), 'wide' (16x16x8) or 'full' (37^3)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return with_overrides(Config(), PRESETS[name])
