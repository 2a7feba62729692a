"""Carry a trained student's weights into a student of another lattice size, depth or face.

Every cell runs the same experts and gate, so their weights copy exactly whatever the
lattice's size. What depends on the face grid -- the teacher->face and face->teacher maps,
the face LayerNorms and the positional encoding, all indexed by face position
``f * H * W + y * W + x`` -- is resampled over the grid: values that live *on* the face
(encoder outputs, norms, positions) are interpolated bilinearly, ``A = A_h (x) A_w``, and the
decoder's weights, which *read* the face, are multiplied by the pseudo-inverse of that
interpolation, so that ``decode' . A = decode`` whenever ``A`` only adds cells (growing): a
face that the lattice merely carries decodes to the same vector as before. Why this and not a
size-free parametrisation is argued in docs/transfer.md.

Size-dependent fixed patterns (the distant links, the functional expert's inside mask) are
buffers built at construction: the target keeps its own, drawn by the same rule at its size --
except that ``embed`` (to a face as large or larger and a depth as deep or deeper) carries the source's
distant links into the embedded block, since a trained cell can depend on which partners its links
reach (``embed_links``).
``transfer_weights`` returns a ``TransferTable`` naming what was copied, resampled, freshly
initialised, redrawn or dropped; the trainer logs it and keeps it in the checkpoint's meta.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import load_weights, read_checkpoint_meta
from .config import Config, flatten, grow_stages, with_overrides
from .errors import UserError
from .model import LatticeStudent, build_model
from .transform import Residual

logger = logging.getLogger(__name__)

FACE_PREFIX = "transform."  # parameters indexed by face position
READ_SIDE = "transform.decode."  # maps that read the face (face on their input axis)
LINKS = ".links"  # the distant expert's fixed partner indices [N, L] (a buffer)
# parameter-name fragments of the cell that only fit when these config keys agree
CELL_KEYS = {
    "experts.local.mlp": "moe.local_hidden",
    "experts.functional.offset_bias": "moe.functional_radius",
    "experts.distant.link_weight": "moe.distant_links",
}


class TransferError(UserError):
    """The source student cannot seed the target (different cell, expert set or teacher dimension)."""


@dataclass
class TransferTable:
    """What happened to every tensor of the target: one list of ``"name [shape]"`` strings per action."""

    source: str
    source_dims: list[int]
    target_dims: list[int]
    copied: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)  # face-dependent, interpolated over the face grid
    fresh: list[str] = field(default_factory=list)  # no counterpart in the source: kept at initialisation
    redrawn: list[str] = field(default_factory=list)  # size-dependent fixed patterns rebuilt at the target's size
    dropped: list[str] = field(default_factory=list)  # in the source only

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (kept in a checkpoint's ``meta.json`` under ``transfer``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: sizes and the count per action."""
        counts = ", ".join(f"{len(getattr(self, k))} {k}" for k in ("copied", "resampled", "fresh", "redrawn", "dropped"))
        dims = lambda d: "x".join(map(str, d))  # noqa: E731
        return f"transfer from {self.source} ({dims(self.source_dims)} -> {dims(self.target_dims)}): {counts}"

    def lines(self) -> list[str]:
        """The table, one tensor a line: ``action  name [shape]``."""
        return [f"{k:9} {entry}" for k in ("copied", "resampled", "fresh", "redrawn", "dropped") for entry in getattr(self, k)]


# --------------------------------------------------------------------------- sources


def load_student(folder: str | Path, device: torch.device | str = "cpu") -> tuple[LatticeStudent, Config, dict]:
    """A checkpoint folder as (model, config, meta); a folder that is not a readable checkpoint is a ``UserError``."""
    config, meta = read_checkpoint_meta(folder)
    if "teachers" in meta:  # a multi-teacher checkpoint: its cube with the first teacher's maps
        from .multiteacher import load_multi

        return load_multi(folder, device)[0].core, config, meta
    if "teacher_dim" not in meta:
        raise UserError(f"{folder}/meta.json has no teacher_dim; pass a folder written by cnn3d-train --out")
    model = build_model(config, int(meta["teacher_dim"]))
    try:
        load_weights(folder, model, device)
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"{folder}: weights do not match its config.json ({str(exc).splitlines()[0][:160]})") from None
    return model.to(device), config, meta


# --------------------------------------------------------------------------- the face grid


FACE_MAPS = ("stretch", "embed")


def _interp_matrix(n_from: int, n_to: int, face_map: str = "stretch") -> torch.Tensor:
    """``[n_to, n_from]``: how a 1-D face axis of ``n_from`` cells becomes one of ``n_to``.

    ``stretch``: linear interpolation (cell centres, edges clamped): the old face spread over the new one.
    ``embed``: the old cells unscaled in the middle of the new axis (a 0/1 selection; shrinking keeps the
    middle cells), so every cell keeps its neighbours at the same distance -- the scale the cell was trained at.
    """
    if n_from == n_to:
        return torch.eye(n_to)
    if face_map == "embed":
        out = torch.zeros(n_to, n_from)
        offset = (n_to - n_from) // 2  # negative when shrinking: the middle n_to source cells
        for i in range(max(0, -offset), min(n_from, n_to - offset)):
            out[i + offset, i] = 1.0
        return out
    basis = torch.eye(n_from, dtype=torch.float64).unsqueeze(1)  # [n_from, 1, n_from]
    return F.interpolate(basis, size=n_to, mode="linear", align_corners=False)[:, 0].T.float()


def _face_maps(src: tuple[int, int, int], dst: tuple[int, int, int], face_map: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_h [H', H], A_w [W', W])``: the face map ``A = A_h (x) A_w`` from face ``src`` to ``dst``."""
    return _interp_matrix(src[1], dst[1], face_map), _interp_matrix(src[2], dst[2], face_map)


def _face_view(t: torch.Tensor, axis: int, face: tuple[int, int, int]) -> torch.Tensor:
    """Split ``axis`` (F*H*W numbers) into (F, H, W), moved last: ``[..., F, H, W]``."""
    return t.movedim(axis, -1).reshape(*t.movedim(axis, -1).shape[:-1], *face)


def resample_face(t: torch.Tensor, axis: int, src: tuple[int, int, int], dst: tuple[int, int, int],
                  read_side: bool, face_map: str = "stretch") -> torch.Tensor:
    """Resample ``t``'s face axis from face ``src`` (F, H, W) to ``dst`` (same F).

    ``read_side=False``: values on the face, ``A_h v A_w^T``. ``read_side=True``: weights that
    read the face, ``w pinv(A_h) ... pinv(A_w)^T``, so ``resampled(w) . A = w`` when growing.
    ``face_map`` chooses ``A`` (``_interp_matrix``): interpolation or embedding.
    """
    a_h, a_w = _face_maps(src, dst, face_map)  # [H', H], [W', W]
    if read_side:
        a_h, a_w = torch.linalg.pinv(a_h).T, torch.linalg.pinv(a_w).T  # [H', H] again: pinv is [H, H']
    v = _face_view(t.float(), axis, src)  # [..., F, H, W]
    out = torch.einsum("ia,...fab,jb->...fij", a_h, v, a_w)  # [..., F, H', W']
    out = out.reshape(*out.shape[:-3], dst[0] * dst[1] * dst[2])
    return out.movedim(-1, axis).to(t.dtype)


def fresh_complement(fresh: torch.Tensor, axis: int, src: tuple[int, int, int], dst: tuple[int, int, int],
                     face_map: str = "stretch") -> torch.Tensor:
    """The part of ``fresh`` (a target tensor at initialisation) along face directions a grown face cannot get
    from the source: ``fresh (I - A pinv(A))`` on ``axis``, ``A`` the face map from ``src`` to ``dst``
    (interpolation or embedding, ``face_map``).

    ``A pinv(A) = (A_h pinv(A_h)) (x) (A_w pinv(A_w))`` is the symmetric projector onto the mapped faces,
    so the same product serves weights that write the face (rows) and weights that read it (columns).
    """
    q_h, q_w = (a @ torch.linalg.pinv(a) for a in _face_maps(src, dst, face_map))
    v = _face_view(fresh.float(), axis, dst)  # [..., F, H', W']
    inside = torch.einsum("ia,...fab,jb->...fij", q_h, v, q_w).reshape(*v.shape[:-3], dst[0] * dst[1] * dst[2])
    return (fresh.float() - inside.movedim(-1, axis)).to(fresh.dtype)


def embeds(src_dims: tuple[int, int, int], dst_dims: tuple[int, int, int]) -> bool:
    """Whether ``embed`` places the whole source lattice inside a larger target: as deep or deeper, a face as large
    or larger."""
    return src_dims != dst_dims and all(s <= d for s, d in zip(src_dims, dst_dims))


def embed_links(src: torch.Tensor, src_dims: tuple[int, int, int], dst: torch.Tensor,
                dst_dims: tuple[int, int, int]) -> torch.Tensor:
    """The target's distant links ``dst [N', L]`` with the source's ``src [N, L]`` carried into the embedded block.

    The block sits where ``embed`` puts the face (offset ``(n' - n) // 2`` on each face axis); along a deeper
    target its layers spread from the front face to the back one (``_embedded_index``), so a cell of the block
    links to the same partners, at the same places, as it did in the source; cells outside the block keep the
    links drawn for the target. Without this, a trained cell that leans on its distant
    partners can lose its whole function in the transfer (BENCHMARKS.md, issue 11).
    """
    to_target = _embedded_index(src_dims, dst_dims)  # [N] source flat index -> target flat index
    out = dst.clone()
    out[to_target] = to_target[src.to(torch.long)].to(dst.dtype)
    return out


def _embedded_index(src_dims: tuple[int, int, int], dst_dims: tuple[int, int, int]) -> torch.Tensor:
    """``[N]``: the target flat index of every source cell placed in the middle of the target's face.

    Along depth, layer ``z`` of ``d`` goes to ``round(z (d' - 1) / (d - 1))`` of a target ``d'`` deep: the front
    face stays the front (where the teacher writes), the back stays the back (where the output is read), and a
    link between the two still spans the lattice. The same depth maps every layer to itself.
    """
    d, h, w = src_dims
    d2, h2, w2 = dst_dims
    layers = torch.round(torch.arange(d, dtype=torch.float64) * (d2 - 1) / max(d - 1, 1)).long()  # [d], increasing
    z, y, x = torch.meshgrid(layers, torch.arange(h), torch.arange(w), indexing="ij")
    return (z * h2 * w2 + (y + (h2 - h) // 2) * w2 + (x + (w2 - w) // 2)).reshape(-1)


def _face_axis(name: str, src: torch.Tensor, dst: torch.Tensor, n_src: int, n_dst: int) -> int | None:
    """The axis indexed by face position in both tensors, or None when the shapes do not line up."""
    if src.dim() != dst.dim():
        return None
    axes = [i for i in range(src.dim()) if src.shape[i] == n_src and dst.shape[i] == n_dst]
    others_equal = lambda i: all(src.shape[j] == dst.shape[j] for j in range(src.dim()) if j != i)  # noqa: E731
    axes = [i for i in axes if others_equal(i)]
    if not axes:
        return None
    # Linear weights are [out, in]: a map that reads the face has it on its input axis
    return axes[-1] if name.startswith(READ_SIDE) else axes[0]


# --------------------------------------------------------------------------- compatibility


def _cell_problems(source: LatticeStudent, target: LatticeStudent) -> list[str]:
    problems = []
    if source.state_size != target.state_size:
        problems.append(f"lattice.state_size {source.state_size} != {target.state_size}")
    if source.expert_names != target.expert_names:
        problems.append(f"moe.experts {','.join(source.expert_names)} != {','.join(target.expert_names)}")
    if source.teacher_dim != target.teacher_dim:
        problems.append(f"teacher dimension {source.teacher_dim} != {target.teacher_dim} (a different teacher needs a new adapter)")
    if problems:
        return problems
    src, dst = source.processor.state_dict(), target.processor.state_dict()
    for name, tensor in dst.items():
        if name in src and src[name].shape != tensor.shape and not name.endswith(".links"):
            key = next((k for frag, k in CELL_KEYS.items() if frag in name), f"processor.{name}")
            problems.append(f"{key} ({name} {list(src[name].shape)} != {list(tensor.shape)})")
    return sorted(set(problems))


def init_source(config: Config) -> str:
    """``train.init_from``, or ``''`` when it is empty or ``none`` (a tuner sweep's from-scratch value)."""
    value = config.train.init_from.strip()
    return "" if value.lower() in ("", "none") else value


def precheck(config: Config) -> None:
    """Fail fast, before any data work, when ``train.init_from`` is no checkpoint or has another cell."""
    if not init_source(config):
        return
    source, _ = read_checkpoint_meta(config.train.init_from)
    keys = ("lattice.state_size", "moe.experts", "moe.local_hidden", "moe.functional_radius", "moe.distant_links")
    flat_src, flat_dst = flatten(source), flatten(config)
    problems = [f"{k} {_show(flat_src[k])} != {_show(flat_dst[k])}" for k in keys if flat_src[k] != flat_dst[k]]
    if problems:
        raise TransferError(
            f"cannot transfer {config.train.init_from} into this model: {'; '.join(problems)} "
            "(the cell and the teacher must match; size, depth, steps and face may differ)"
        )


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_compatible(source: LatticeStudent, target: LatticeStudent, source_name: str = "the source") -> None:
    """Raise ``TransferError`` naming every config key that must match but does not."""
    problems = _cell_problems(source, target)
    if problems:
        raise TransferError(
            f"cannot transfer {source_name} into this model: {'; '.join(problems)} "
            "(the cell and the teacher must match; size, depth, steps and face may differ)"
        )


# --------------------------------------------------------------------------- the transfer


def _entry(name: str, src: torch.Tensor | None, dst: torch.Tensor) -> str:
    shape = lambda t: "x".join(map(str, t.shape)) or "scalar"  # noqa: E731
    return f"{name} [{shape(src)} -> {shape(dst)}]" if src is not None and src.shape != dst.shape else f"{name} [{shape(dst)}]"


@torch.no_grad()
def transfer_weights(source: LatticeStudent | str | Path, target: LatticeStudent,
                     fresh_directions: bool = False, face_map: str = "embed") -> TransferTable:
    """Fill ``target`` from ``source`` (a student or a checkpoint folder); returns what was done to each tensor.

    ``fresh_directions`` (``train.init_fresh_directions``): when the face grows, the face maps' matrices also
    keep the target's initial weights along the face directions interpolation cannot reach (see
    ``fresh_complement``). ``face_map`` (``train.transfer_face``): ``stretch`` interpolates the face,
    ``embed`` places it unscaled in the middle of a larger face (and, as deep or deeper, the distant links of
    the block with it): the new cells keep the target's initialisation in every tensor that writes or
    normalises the face, and the decoder reads them with zero weights at first. Raises ``TransferError``
    (a ``UserError``) when the cell, expert set or teacher dimension differ.
    """
    if face_map not in FACE_MAPS:
        raise UserError(f"train.transfer_face {face_map!r}: expected one of {', '.join(FACE_MAPS)}")
    name = str(source) if isinstance(source, (str, Path)) else "a student"
    if isinstance(source, (str, Path)):
        source = load_student(source)[0]
    check_compatible(source, target, name)
    src_face, dst_face = source.transform.face, target.transform.face  # (F, H, W)
    table = TransferTable(name, list(source.dims), list(target.dims))
    src_state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    buffers = {k for k, _ in target.named_buffers()}
    new_state = {}
    for key, dst in target.state_dict().items():
        src = src_state.get(key)
        if face_map == "embed" and key.endswith(LINKS) and embeds(source.dims, target.dims) and src is not None:
            new_state[key] = embed_links(src, source.dims, dst, target.dims)
            table.resampled.append(_entry(key, src, dst) + " embedded, new cells' links drawn fresh")
            continue
        new_state[key] = _transfer_one(key, src, dst, key in buffers, src_face, dst_face, table,
                                       fresh_directions, face_map)
    target.load_state_dict(new_state, strict=True)
    persistent = set(new_state)
    table.redrawn += [_entry(k, None, b) + " (rebuilt at construction)" for k, b in target.named_buffers()
                      if k not in persistent and source.dims != target.dims]
    table.dropped += [_entry(k, v, v) for k, v in src_state.items() if k not in new_state]
    return table


@torch.no_grad()
def transfer_maps(source: torch.nn.Module, target: torch.nn.Module, prefix: str, table: TransferTable,
                  face_map: str = "embed") -> None:
    """Fill one teacher's face maps (an ``EmbeddingTransformer``) from another's, resampled over the face like
    a student's ``transform.*``; entries join ``table`` named ``prefix + name``."""
    sub = TransferTable(table.source, [], [])
    src_state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    buffers = {k for k, _ in target.named_buffers()}
    new_state = {k: _transfer_one(FACE_PREFIX + k, src_state.get(k), dst, k in buffers, source.face, target.face, sub,
                                  face_map=face_map)
                 for k, dst in target.state_dict().items()}
    target.load_state_dict(new_state, strict=True)
    for action in ("copied", "resampled", "fresh", "redrawn"):
        getattr(table, action).extend(prefix + e[len(FACE_PREFIX):] for e in getattr(sub, action))


def _transfer_one(key, src, dst, is_buffer, src_face, dst_face, table: TransferTable,
                  fresh_directions: bool = False, face_map: str = "stretch") -> torch.Tensor:
    """The value ``key`` gets in the target, recording the action in ``table``."""
    face_changed = src_face != dst_face and key.startswith(FACE_PREFIX)
    if is_buffer:  # fixed patterns: the target's own, drawn by the same rule at its size
        if src is not None and src.shape == dst.shape and torch.equal(src.to(dst.device), dst):
            table.copied.append(_entry(key, src, dst))
        else:
            table.redrawn.append(_entry(key, src, dst))
        return dst
    if src is not None and src.shape == dst.shape and not face_changed:
        table.copied.append(_entry(key, src, dst))
        return src.to(dst.device, dst.dtype)
    if src is not None and face_changed and src_face[0] == dst_face[0]:
        n_src, n_dst = src_face[0] * src_face[1] * src_face[2], dst_face[0] * dst_face[1] * dst_face[2]
        axis = _face_axis(key, src, dst, n_src, n_dst)
        if axis is not None:
            out = resample_face(src, axis, src_face, dst_face, key.startswith(READ_SIDE), face_map).to(dst.device)
            if face_map == "embed" and n_dst > n_src and key.startswith(READ_SIDE):
                # weights reading the new border cells start at zero: the output is the embedded block's, as before
                # the transfer, and they still learn (their gradient is the border's values, not zero)
                table.resampled.append(_entry(key, src, dst) + " embedded, new cells read as zero")
            elif face_map == "embed" and n_dst > n_src:  # values on the new border cells: the target's own init
                # (every tensor, vectors too: a zero LayerNorm scale there would silence those cells for good)
                out = out + fresh_complement(dst, axis, src_face, dst_face, face_map).to(out.device)
                table.resampled.append(_entry(key, src, dst) + " embedded, new cells fresh")
            elif fresh_directions and dst.dim() == 2 and n_dst > n_src:  # a matrix on a grown face: no saddle
                out = out + fresh_complement(dst, axis, src_face, dst_face).to(out.device)
                table.resampled.append(_entry(key, src, dst) + " + fresh directions")
            else:
                table.resampled.append(_entry(key, src, dst))
            return out
        if src.shape == dst.shape:  # not indexed by the face (an output bias): same meaning
            table.copied.append(_entry(key, src, dst))
            return src.to(dst.device, dst.dtype)
    table.fresh.append(_entry(key, src, dst))
    return dst


# --------------------------------------------------------------------------- growing


def transfer_options(config: Config) -> dict[str, Any]:
    """``transfer_weights``'s options from a config (``train.init_fresh_directions``, ``train.transfer_face``)."""
    return {"fresh_directions": config.train.init_fresh_directions, "face_map": config.train.transfer_face}


def stage_config(config: Config, epoch: int) -> Config:
    """The config of the cube trained at 0-based ``epoch`` under ``train.grow_schedule``.

    A stage of side ``s`` sets ``lattice.size = s`` with height and width following it; the
    depth stays as configured (``lattice.depth = 0`` follows the side too). After the
    listed stages, ``config`` itself.
    """
    end = 0
    for size, epochs in grow_stages(config.train.grow_schedule):
        end += epochs
        if epoch < end:
            return with_overrides(config, {"lattice.size": size, "lattice.height": 0, "lattice.width": 0})
    return config


def grow(model: LatticeStudent, config: Config, device: torch.device) -> tuple[LatticeStudent, TransferTable]:
    """A new student for ``config`` (seeded by ``train.seed``), filled from ``model`` by ``transfer_weights``."""
    target = build_model(config, model.teacher_dim)
    table = transfer_weights(model, target, **transfer_options(config))
    table.source = "x".join(map(str, model.dims))
    return target.to(device), table


def log_table(table: TransferTable, level: int = logging.INFO) -> None:
    """The summary line at ``level``; the per-tensor table at DEBUG."""
    logger.log(level, "%s", table.summary())
    for line in table.lines():
        logger.debug("  %s", line)


def initial_student(config: Config, teacher_dim: int, device: torch.device,
                    resume_from: str | Path | None = None) -> tuple[LatticeStudent, dict[str, Any]]:
    """The student a training run starts from, and what its checkpoints' meta should add.

    Built at the grow stage of the run's first epoch (on resume: of the last epoch done, whose
    weights are loaded next) and, for a fresh run with ``train.init_from``, filled from that
    checkpoint by ``transfer_weights``; the table goes into the meta under ``transfer``.
    """
    first, extra = 0, {}
    if resume_from:
        _, meta = read_checkpoint_meta(resume_from)
        first = max(0, int(meta.get("epochs_done", 0)) - 1)
        extra = {k: meta[k] for k in ("transfer", "grow", "readout_refit") if k in meta}
    model = build_model(stage_config(config, first), teacher_dim)
    if init_source(config) and not resume_from:
        source, source_config, _ = load_student(config.train.init_from)
        _warn_other_teacher(source_config, config)
        table = transfer_weights(source, model, **transfer_options(config))
        table.source = str(config.train.init_from)
        log_table(table)
        extra["transfer"] = table.as_dict()
    return model.to(device), extra


def _warn_other_teacher(source: Config, target: Config) -> None:
    keys = ("model", "pooling", "normalize")
    differ = [f"teacher.{k}" for k in keys if getattr(source.teacher, k) != getattr(target.teacher, k)]
    if differ:  # same dimension (checked later), but another embedding space: the maps start off
        logger.warning("train.init_from was trained with another %s; its face maps start from a different space",
                       ", ".join(differ))


def carry_optimizer_state(old: torch.optim.Optimizer, old_model: LatticeStudent,
                          new: torch.optim.Optimizer, new_model: LatticeStudent) -> int:
    """Copy AdamW moments of parameters whose name and shape survived a grow step; returns how many."""
    old_params = dict(old_model.named_parameters())
    carried = 0
    for name, p in new_model.named_parameters():
        q = old_params.get(name)
        if q is not None and q.shape == p.shape and q in old.state:
            new.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in old.state[q].items()}
            carried += 1
    return carried


# --------------------------------------------------------------------------- the readout, refitted

REFIT_RIDGE = 1e-3  # ridge, relative to the back face features' mean square (LayerNorm'd: about 1)
REFIT_CHECK_ROWS = 2048  # rows whose cosine before and after the fit is reported (the sums need no rows kept)


@torch.no_grad()
def refit_readout(model: LatticeStudent, inputs: torch.Tensor, batch_size: int,
                  device: torch.device) -> dict[str, float] | None:
    """Fit the face->teacher map's linear part to ``inputs [n, T]`` (teacher embeddings, the targets too) by
    ridge regression over the back face, after a transfer or a growth step; None where the decoder has no
    linear part (``transform.kind=autoencoder``).

    A transferred cube reads its new face cells at zero (``embed``), so the cells the teacher now writes
    carry information no readout uses yet; gradient steps find it over an epoch, a least-squares solve
    over one forward pass finds it at once (BENCHMARKS.md, issue 11). The cube and the encoder are left
    as they are. With ``z`` the LayerNorm'd back face ``[n, F]``, the skip (or linear) map ``W`` solves
    ``(z^T z + r I) W^T = z^T (Y - body(z))`` (``r``: ``REFIT_RIDGE`` times the mean of ``diag(z^T z)``); a linear
    map's bias is fitted alongside, unpenalised (a column of ones). Only the sums ``z^T z`` and ``z^T Y`` are
    kept (float64, on the CPU), so memory does not grow with the corpus.
    Returns the mean cosine to the teacher of the first ``REFIT_CHECK_ROWS`` rows before and after, the rows
    fitted and the seconds taken.
    """
    started = time.perf_counter()
    decode = model.transform.decode
    skip, body = (decode.skip, decode.body) if isinstance(decode, Residual) else (decode, None)
    if not isinstance(skip, torch.nn.Linear):
        return None
    was_training = model.training
    model.eval()  # no dropout: the solve sees the back face the validation sees
    gram = cross = None
    checked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (features, target, body) of the first rows
    before = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size].to(device)
        out = model(x)
        z = model.transform.norm_out(out.face_out.flatten(1)).double().cpu()  # [b, F]
        teacher = x.double().cpu()
        # what the MLP body adds (kept fixed); the linear part fits the rest
        rest = body(z.to(device, torch.float32)).double().cpu() if body is not None else torch.zeros_like(teacher)
        target = teacher - rest
        features = torch.cat([z, z.new_ones(len(z), 1)], 1) if skip.bias is not None else z
        gram = features.T @ features if gram is None else gram + features.T @ features
        cross = features.T @ target if cross is None else cross + features.T @ target
        if i < REFIT_CHECK_ROWS:
            checked.append((features, teacher, rest))
            before.append(F.cosine_similarity(out.embedding.float(), x.float(), dim=-1).cpu())
    model.train(was_training)
    width = skip.weight.shape[1]
    ridge = torch.zeros(len(gram), dtype=gram.dtype)
    ridge[:width] = REFIT_RIDGE * gram.diagonal()[:width].mean()  # the bias goes unpenalised
    solution = torch.linalg.solve(gram + torch.diag(ridge), cross).T  # [T, F (+1)]
    skip.weight.copy_(solution[:, :width])
    if skip.bias is not None:
        skip.bias.copy_(solution[:, -1])
    features, target, rest = (torch.cat(parts)[:REFIT_CHECK_ROWS] for parts in zip(*checked))
    fitted = features @ solution.T + rest
    return {"rows": float(len(inputs)), "cosine_before": torch.cat(before)[:REFIT_CHECK_ROWS].mean().item(),
            "cosine_after": F.cosine_similarity(fitted, target, dim=-1).mean().item(),
            "seconds": time.perf_counter() - started}
