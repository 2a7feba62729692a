"""The lattice student: teacher embedding -> front face -> lattice steps -> back face -> teacher space.

The only path from input to output runs through the lattice: the front face is
lifted cell by cell into the states at ``z = 0``, the processor runs ``steps``
times, and only the back face ``z = D - 1`` is read out. With ``steps = 0`` the
output does not depend on the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import Config
from .fused import projection
from .moe import MoEProcessor
from .transform import EmbeddingTransformer


@dataclass
class StudentOutput:
    """What one forward pass produces. Shapes use B batch, T teacher dim, C state, E experts."""

    embedding: torch.Tensor  # [B, T]
    face_in: torch.Tensor  # [B, F, H, W] numbers injected at the front face
    face_out: torch.Tensor  # [B, F, H, W] numbers read from the back face
    state: torch.Tensor  # [B, C, D, H, W] final lattice state
    gates: torch.Tensor  # [B, E, D, H, W] gate weights averaged over steps (uniform if steps = 0)
    activity: torch.Tensor  # scalar: mean |state| over steps (for the sparsity loss)


class FaceIO(nn.Module):
    """Per-cell maps shared by all face cells: F numbers -> C state channels, and back."""

    def __init__(self, face_channels: int, state_size: int):
        super().__init__()
        self.lift = nn.Parameter(torch.randn(state_size, face_channels))
        self.lift_bias = nn.Parameter(torch.zeros(state_size))
        self.read = nn.Parameter(torch.randn(face_channels, state_size) / state_size**0.5)
        self.read_bias = nn.Parameter(torch.zeros(face_channels))

    def inject(self, face: torch.Tensor) -> torch.Tensor:
        """``[B, F, H, W] -> [B, C, H, W]``."""
        return torch.einsum("cf,bfhw->bchw", self.lift, face) + self.lift_bias.view(1, -1, 1, 1)

    def readout(self, back: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, F, H, W]``."""
        return torch.einsum("fc,bchw->bfhw", self.read, back) + self.read_bias.view(1, -1, 1, 1)


class LatticeStudent(nn.Module):
    """Maps ``[B, teacher_dim]`` to ``[B, teacher_dim]`` through a 3D lattice of identical cells."""

    fused: bool = True  # run the lattice through the fused step (False: the reference formulation)

    def __init__(self, config: Config, teacher_dim: int, *, checkpointing: bool = False):
        super().__init__()
        lat = config.lattice
        self.dims = lat.dims
        self.steps = lat.steps
        self.state_size = lat.state_size
        self.inject_every_step = lat.inject == "every_step"
        self.checkpointing = checkpointing  # recompute steps in backward (a training setting, passed in)
        self.teacher_dim = teacher_dim
        _, h, w = self.dims
        self.transform = EmbeddingTransformer(config.transform, teacher_dim, (lat.face_channels, h, w))
        self.face_io = FaceIO(lat.face_channels, lat.state_size)
        self.processor = MoEProcessor(config.moe, lat)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return self.processor.expert_names

    def _step(self, state: torch.Tensor, drive: torch.Tensor | None, proj_params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference step on ``[B, C, D, H, W]`` (the straightforward formulation, ``fused = False``).

        ``proj_params`` is the fused step's (the same call for both steps); the reference ignores it.
        """
        if drive is not None:  # add the lifted input to the front face only
            state = torch.cat([state[:, :, :1] + drive.unsqueeze(2), state[:, :, 1:]], dim=2)
        return self.processor.step(state)

    def _step_rows(self, rows: torch.Tensor, drive: torch.Tensor | None, proj_params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused step on rows ``[B, D, H, W, C]``; ``drive [B, H, W, C]`` joins the front face ``z = 0``."""
        if drive is not None:
            rows = torch.cat([rows[:, :1] + drive.unsqueeze(1), rows[:, 1:]], dim=1)
        return self.processor.step_rows(rows, proj_params)

    def run_lattice(self, face_in: torch.Tensor, on_step=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``face_in [B, F, H, W]`` -> (final state, mean gates, mean |state|).

        ``on_step(t, state)``, when given, sees the state ``[B, C, D, H, W]`` after every step
        ``t = 1..steps`` (the analysis reads all steps from one run instead of one run per step).

        The state is ``[B, C, D, H, W]`` in channels-last memory (per-cell channel vectors
        contiguous, so pointwise maps are plain matmuls). With ``fused`` (the default) the
        loop runs on its rows view ``[B, D, H, W, C]`` through ``MoEProcessor.step_rows``;
        ``fused = False`` runs the straightforward reference step.
        """
        b = face_in.shape[0]
        d, h, w = self.dims
        num_experts = len(self.expert_names)
        drive = self.face_io.inject(face_in)  # [B, C, H, W]
        if self.fused:
            state = face_in.new_zeros(b, d, h, w, self.state_size)
            drive = drive.permute(0, 2, 3, 1)  # [B, H, W, C]
            step = self._step_rows
        else:
            state = face_in.new_zeros(b, self.state_size, d, h, w).contiguous(memory_format=torch.channels_last_3d)
            step = self._step
        # the fused step's concatenated per-cell maps, built once for all steps (their gradient then
        # accumulates in one [P, C] tensor and is split back to the experts' weights once)
        proj_params = projection(self.processor) if self.fused else None
        gate_sum = None
        activity = face_in.new_zeros(())
        for t in range(self.steps):
            step_drive = drive if (t == 0 or self.inject_every_step) else None
            if self.checkpointing and self.training and torch.is_grad_enabled():
                state, gates = checkpoint(step, state, step_drive, proj_params, use_reentrant=False)
            else:
                state, gates = step(state, step_drive, proj_params)
            gate_sum = gates if gate_sum is None else gate_sum + gates
            activity = activity + state.abs().mean()
            if on_step is not None:
                on_step(t + 1, state.permute(0, 4, 1, 2, 3) if self.fused else state)
        if self.fused:
            state = state.permute(0, 4, 1, 2, 3)  # rows -> [B, C, D, H, W] (a channels-last view)
            gate_sum = None if gate_sum is None else gate_sum.permute(0, 4, 1, 2, 3)
        if self.steps == 0:
            return state, face_in.new_full((b, num_experts, d, h, w), 1.0 / num_experts), activity
        return state, gate_sum / self.steps, activity / self.steps

    def forward(self, embedding: torch.Tensor) -> StudentOutput:
        face_in = self.transform.to_face(embedding)
        state, gates, activity = self.run_lattice(face_in)
        face_out = self.face_io.readout(state[:, :, -1])
        out = self.transform.from_face(face_out)
        return StudentOutput(out, face_in, face_out, state, gates, activity)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per component: transform, face_io, gate, and each expert."""
        counts = {
            "transform": _count(self.transform),
            "face_io": _count(self.face_io),
            "gate": _count(self.processor.gate),
        }
        for name, expert in self.processor.experts.items():
            counts[f"expert.{name}"] = _count(expert)
        counts["total"] = _count(self)
        return counts

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group: transform (incl. face I/O), gating, and one per expert."""
        groups = {
            "transform": list(self.transform.parameters()) + list(self.face_io.parameters()),
            "gating": list(self.processor.gate.parameters()),
        }
        for name, expert in self.processor.experts.items():
            groups[name] = list(expert.parameters())
        return groups


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_model(
    config: Config, teacher_dim: int, *, seed: int | None = None, gradient_checkpointing: bool | None = None
) -> LatticeStudent:
    """The student for ``config`` with deterministic weights from ``seed``.

    The model reads only the model sections of ``config``; the two training settings it needs are
    passed in (the trainer does). Left as None they default to ``train.seed`` and
    ``train.gradient_checkpointing``, for scripts and tests that build a model from a config alone.
    """
    if config.teacher.embedding_dim and config.teacher.embedding_dim != teacher_dim:
        raise ValueError(
            f"teacher.embedding_dim={config.teacher.embedding_dim} but the teacher produces {teacher_dim}-D embeddings"
        )
    seed = config.train.seed if seed is None else seed
    checkpointing = config.train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LatticeStudent(config, teacher_dim, checkpointing=checkpointing)
