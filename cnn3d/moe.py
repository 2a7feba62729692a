"""The MoE connection processor: a per-cell gate mixing the experts' messages."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import LatticeConfig, MoEConfig
from .experts import build_expert
from .fused import fused_step


class MoEProcessor(nn.Module):
    """One lattice step, shared by all cells.

    ``step(state) -> (new_state, gates)`` where ``gates`` is ``[B, E, D, H, W]``, the
    per-cell weights over the experts (softmax, or renormalised top-k). The update
    is damped: ``s <- (1 - r) * s + r * tanh(sum_e g_e * expert_e(s))``.
    """

    # the fused step's functional expert, distant links and gated update through cnn3d/native.c on
    # CPU in float32, where it builds (False: torch ops only; the same maths, tests/test_native.py
    # compares the two)
    native: bool = True

    def __init__(self, moe: MoEConfig, lattice: LatticeConfig):
        super().__init__()
        channels = lattice.state_size
        self.expert_names = tuple(moe.experts)
        self.experts = nn.ModuleDict(
            {name: build_expert(name, moe, channels, lattice.boundary, lattice.dims) for name in self.expert_names}
        )
        self.gate = nn.Conv3d(channels, len(self.expert_names), kernel_size=1)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, 0.02)
            self.gate.bias.zero_()
        self.temperature = moe.gate_temperature
        self.top_k = moe.top_k if moe.gating == "topk" else 0
        self.update_rate = lattice.update_rate

    @property
    def neighbours(self) -> dict[str, int]:
        """Neighbours each expert reads per cell, as configured (same at every lattice size)."""
        return {name: int(expert.neighbours) for name, expert in self.experts.items()}

    def gate_weights(self, state: torch.Tensor) -> torch.Tensor:
        """``[B, E, D, H, W]`` expert weights per cell, summing to 1 over E."""
        weights = (self.gate(state) / self.temperature).softmax(dim=1)
        if self.top_k and self.top_k < weights.shape[1]:
            kth = weights.topk(self.top_k, dim=1).values[:, -1:]
            weights = weights * (weights >= kth)
            weights = weights / weights.sum(dim=1, keepdim=True)
        return weights

    def step(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The straightforward formulation on ``[B, C, D, H, W]``: each expert, then the gate mix.

        The reference for ``step_rows`` (tests compare the two) and for benchmarks' before/after.
        """
        gates = self.gate_weights(state)
        message = sum(gates[:, i : i + 1] * expert(state) for i, expert in enumerate(self.experts.values()))
        new_state = (1 - self.update_rate) * state + self.update_rate * torch.tanh(message)
        return new_state, gates

    def step_rows(self, rows: torch.Tensor, proj_params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same step, fused, on rows ``[B, D, H, W, C]``; gates come back as ``[B, D, H, W, E]``."""
        return fused_step(self, rows, proj_params)
