"""The three experts of the connection processor, each shared by all cells.

Every expert maps a lattice state ``[B, C, D, H, W]`` to a message of the same
shape, vectorised over cells and batch (no Python loops over cells).

At initialisation the local and functional experts copy the cell in front
(``z - 1``) into each cell, so a fresh lattice is a conveyor from the front face
to the back face that training then modifies; without it the back face sees
almost none of the input after a few hops and the gradient vanishes with it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lattice import axial_offsets, inside_mask, neighbour_mix, neighbour_stack, sample_distant_links

FRONT_OFFSET = (-1, 0, 0)  # the neighbour one step closer to the front face


class Expert(Protocol):
    """What the MoE processor needs from an expert."""

    neighbours: int

    def __call__(self, state: torch.Tensor) -> torch.Tensor: ...


def _pointwise(channels_in: int, channels_out: int) -> nn.Conv3d:
    return nn.Conv3d(channels_in, channels_out, kernel_size=1)


class LocalExpert(nn.Module):
    """The 26-cell neighbourhood: a 3x3x3 convolution, plus an optional per-cell MLP (``hidden > 0``)."""

    neighbours = 26

    def __init__(self, channels: int, hidden: int, boundary: str):
        super().__init__()
        padding_mode = "circular" if boundary == "periodic" else "zeros"
        self.stencil = nn.Conv3d(channels, channels, kernel_size=3, padding=1, padding_mode=padding_mode)
        self.mlp = (
            nn.Sequential(_pointwise(channels, hidden), nn.GELU(), _pointwise(hidden, channels)) if hidden else None
        )
        with torch.no_grad():
            # kernel index 0 along depth reads z-1: out[z] = in[z-1] (+ small noise)
            self.stencil.weight.normal_(0.0, 0.01)
            self.stencil.weight[:, :, 0, 1, 1] += torch.eye(channels)
            self.stencil.bias.zero_()
            if self.mlp is not None:
                self.mlp[2].weight.normal_(0.0, 0.02)
                self.mlp[2].bias.zero_()

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        out = self.stencil(state)
        return out if self.mlp is None else out + self.mlp(state)


class FunctionalExpert(nn.Module):
    """Attention-weighted messages over a wider axial neighbourhood, GNN (GAT) style.

    Each cell attends to the ``6 * radius`` cells up to ``radius`` steps away along
    the three axes. Scores are additive, as in graph attention networks:
    ``e_k(p) = leaky_relu(a_dst . s(p) + a_src . s(p + o_k)) + bias_k``;
    out-of-lattice neighbours are masked for a zero boundary. The message
    ``sum_k softmax_k(e) * V s(p + o_k)`` goes through a gated update:
    ``sigmoid(gate(s)) * out(message)``. Additive scores need a single number per
    neighbour, so only the values are gathered at full width, by ``neighbour_mix``.
    """

    def __init__(self, channels: int, radius: int, boundary: str, dims: tuple[int, int, int]):
        super().__init__()
        self.offsets = axial_offsets(radius)
        self.neighbours = len(self.offsets)
        self.boundary = boundary
        # one pointwise map gives the update gate (C channels) and the two attention scores (a_dst, a_src)
        self.gate_score = _pointwise(channels, channels + 2)
        self.out = _pointwise(channels, channels)
        # one learned bias per relative offset; start by attending to the cell in front
        bias = torch.zeros(self.neighbours)
        bias[self.offsets.index(FRONT_OFFSET)] = 4.0
        self.offset_bias = nn.Parameter(bias)
        self.register_buffer("inside", inside_mask(dims, self.offsets, boundary), persistent=False)
        with torch.no_grad():
            self.out.weight.normal_(0.0, 0.02)
            self.out.weight[:, :, 0, 0, 0] += torch.eye(channels)  # messages start as the neighbour's state
            self.out.bias.zero_()
            self.gate_score.weight.normal_(0.0, 0.02)
            self.gate_score.bias.zero_()
            self.gate_score.bias[:channels].fill_(3.0)  # update gate starts nearly open

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        gate_score = self.gate_score(state)  # [B, C + 2, D, H, W]
        gate, dst, src = gate_score[:, :-2], gate_score[:, -2:-1], gate_score[:, -1:]
        src = neighbour_stack(src, self.offsets, self.boundary)[:, :, 0]  # [B, K, D, H, W]
        logits = F.leaky_relu(dst + src, 0.2) + self.offset_bias.view(1, -1, 1, 1, 1)
        attn = logits.masked_fill(~self.inside, float("-inf")).softmax(dim=1)  # [B, K, D, H, W]
        # the value map is linear, so it is folded into ``out`` after mixing: one projection, not two
        message = neighbour_mix(state, attn, self.offsets, self.boundary)
        return torch.sigmoid(gate) * self.out(message)


class DistantExpert(nn.Module):
    """A few fixed long-range links per cell, so information can skip across the lattice.

    The links are sampled once per lattice from ``seed`` (a buffer, saved with the
    model); each link slot has a learned weight, and the mixed partner states go
    through a per-cell linear map.
    """

    def __init__(self, channels: int, links: int, min_distance: int, boundary: str, dims, seed: int):
        super().__init__()
        self.neighbours = links
        index = sample_distant_links(dims, links, min_distance, boundary == "periodic", seed)
        self.register_buffer("links", index, persistent=True)  # [N, links]
        self.link_weight = nn.Parameter(torch.zeros(links))
        self.out = _pointwise(channels, channels)
        with torch.no_grad():
            self.out.weight.normal_(0.0, 0.5 / channels**0.5)
            self.out.bias.zero_()

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = state.shape
        # cells as rows of C numbers: a free view when the state is channels-last
        rows = state.permute(0, 2, 3, 4, 1).reshape(b, d * h * w, c)
        partners = rows.index_select(1, self.links.view(-1)).view(b, -1, self.neighbours, c)  # [B, N, links, C]
        mixed = (partners * self.link_weight.softmax(0).view(1, 1, -1, 1)).sum(2)  # [B, N, C]
        return self.out(mixed.view(b, d, h, w, c).permute(0, 4, 1, 2, 3))


def expert_kind(name: str) -> str:
    """The kind of an expert by its config name: ``local2`` (added by ``continual.new_expert``) is a ``local``."""
    return name.rstrip("0123456789")


def build_expert(name: str, moe, channels: int, boundary: str, dims) -> nn.Module:
    """One expert by its config name: 'local', 'functional' or 'distant' (or 'local2', ... another local)."""
    if expert_kind(name) == "local":
        return LocalExpert(channels, moe.local_hidden, boundary)
    if name == "functional":
        return FunctionalExpert(channels, moe.functional_radius, boundary, dims)
    if name == "distant":
        return DistantExpert(channels, moe.distant_links, moe.distant_min_distance, boundary, dims, moe.seed)
    raise ValueError(f"unknown expert {name!r}")
