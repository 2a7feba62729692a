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

from .lattice import axial_offsets, inside_mask, neighbour_stack, sample_distant_links

FRONT_OFFSET = (-1, 0, 0)  # the neighbour one step closer to the front face


class Expert(Protocol):
    """What the MoE processor needs from an expert."""

    neighbours: int

    def __call__(self, state: torch.Tensor) -> torch.Tensor: ...


def _pointwise(channels_in: int, channels_out: int) -> nn.Conv3d:
    return nn.Conv3d(channels_in, channels_out, kernel_size=1)


class LocalExpert(nn.Module):
    """The 26-cell neighbourhood: a 3x3x3 convolution plus a per-cell MLP."""

    neighbours = 26

    def __init__(self, channels: int, hidden: int, boundary: str):
        super().__init__()
        padding_mode = "circular" if boundary == "periodic" else "zeros"
        self.stencil = nn.Conv3d(channels, channels, kernel_size=3, padding=1, padding_mode=padding_mode)
        self.mlp_in = _pointwise(channels, hidden)
        self.mlp_out = _pointwise(hidden, channels)
        with torch.no_grad():
            # kernel index 0 along depth reads z-1: out[z] = in[z-1] (+ small noise)
            self.stencil.weight.normal_(0.0, 0.01)
            self.stencil.weight[:, :, 0, 1, 1] += torch.eye(channels)
            self.stencil.bias.zero_()
            self.mlp_out.weight.normal_(0.0, 0.02)
            self.mlp_out.bias.zero_()

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.stencil(state) + self.mlp_out(F.gelu(self.mlp_in(state)))


class FunctionalExpert(nn.Module):
    """Attention-weighted messages over a wider axial neighbourhood, GNN (GAT) style.

    Each cell attends to the ``6 * radius`` cells up to ``radius`` steps away along
    the three axes. Scores are additive as in graph attention networks:
    ``e_k(p) = leaky_relu(a_dst . z(p) + a_src . z(p + o_k)) + bias_k`` with
    ``z = W s``; out-of-lattice neighbours are masked for a zero boundary. The
    message ``sum_k softmax_k(e) * z(p + o_k)`` goes through a gated update:
    ``sigmoid(gate(s)) * out(message)``. Additive scores need only one number per
    cell and head from each neighbour, so the gather is of values alone; windows
    are strided views (``unfold``), not copies.
    """

    def __init__(self, channels: int, heads: int, radius: int, boundary: str, dims: tuple[int, int, int]):
        super().__init__()
        self.radius = radius
        self.neighbours = 6 * radius
        self.boundary = boundary
        self.heads = heads if channels % heads == 0 else 1
        self.value = _pointwise(channels, channels)
        self.score = _pointwise(channels, 2 * self.heads)  # (a_dst, a_src) per head
        self.out = _pointwise(channels, channels)
        self.gate = _pointwise(channels, channels)
        # one learned bias per axis and relative position; start by attending to the cell in front
        bias = torch.zeros(3, 2 * radius + 1)
        bias[0, radius - 1] = 4.0  # axis z, offset -1
        self.offset_bias = nn.Parameter(bias)
        self.register_buffer("allowed", _axial_window_mask(dims, radius, boundary), persistent=False)
        with torch.no_grad():
            for conv in (self.value, self.out):
                conv.weight.normal_(0.0, 0.02)
                conv.weight[:, :, 0, 0, 0] += torch.eye(channels)  # messages start as the neighbour's state
                conv.bias.zero_()
            self.score.weight.normal_(0.0, 0.02)
            self.score.bias.zero_()
            self.gate.bias.fill_(3.0)  # update gate starts nearly open

    def _windows(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """``[B, C, D, H, W] -> [B, C, D, H, W, 2r+1]`` view of neighbours along one axis."""
        r = self.radius
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        if self.boundary == "periodic":
            reps = -(-r // x.shape[2 + axis])  # wrap as often as the reach needs
            cat = [x.narrow(2 + axis, x.shape[2 + axis] - r % x.shape[2 + axis], r % x.shape[2 + axis])] if r % x.shape[2 + axis] else []
            padded = torch.cat(cat + [x] * (2 * reps + 1), dim=2 + axis) if reps > 1 else F.pad(x, pad, mode="circular")
            if reps > 1:
                start = reps * x.shape[2 + axis] - r + len(cat) * (r % x.shape[2 + axis])
                padded = padded.narrow(2 + axis, start, x.shape[2 + axis] + 2 * r)
        else:
            padded = F.pad(x, pad)
        return padded.unfold(2 + axis, 2 * r + 1, 1)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = state.shape
        z = self.value(state)  # [B, C, D, H, W]
        scores = self.score(state)  # [B, 2*heads, D, H, W]
        dst, src = scores[:, : self.heads], scores[:, self.heads :]
        message = 0.0
        logits = torch.stack(
            [F.leaky_relu(dst.unsqueeze(-1) + self._windows(src, axis), 0.2) for axis in range(3)], dim=-2
        )  # [B, heads, D, H, W, 3, 2r+1]
        logits = (logits + self.offset_bias).masked_fill(~self.allowed, float("-inf"))
        attn = logits.flatten(-2).softmax(-1).view_as(logits)  # one softmax over all 6r neighbours
        zh = z.view(b, self.heads, c // self.heads, d, h, w)
        for axis in range(3):
            win = self._windows(z, axis).view(b, self.heads, c // self.heads, d, h, w, -1)
            message = message + (win * attn[..., axis, :].unsqueeze(2)).sum(-1)
        del zh
        return torch.sigmoid(self.gate(state)) * self.out(message.view(b, c, d, h, w))


def _axial_window_mask(dims: tuple[int, int, int], radius: int, boundary: str) -> torch.Tensor:
    """``[D, H, W, 3, 2r+1]`` bool: neighbour j along axis a exists (not the cell itself, inside the lattice)."""
    r = radius
    rel = torch.arange(-r, r + 1)
    mask = torch.ones(*dims, 3, 2 * r + 1, dtype=torch.bool)
    mask[..., r] = False  # the centre is the cell itself
    if boundary == "periodic":
        return mask
    for axis in range(3):
        pos = torch.arange(dims[axis]).view(-1, 1) + rel  # [size, 2r+1]
        ok = (pos >= 0) & (pos < dims[axis])
        shape = [1, 1, 1, 2 * r + 1]
        shape[axis] = dims[axis]
        mask[..., axis, :] &= ok.view(shape)
    return mask


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
        flat = state.reshape(b, c, d * h * w)
        partners = flat.index_select(2, self.links.view(-1)).view(b, c, -1, self.neighbours)  # [B, C, N, links]
        mixed = (partners * self.link_weight.softmax(0)).sum(-1)  # [B, C, N]
        return self.out(mixed.view(b, c, d, h, w))


def build_expert(name: str, moe, channels: int, boundary: str, dims) -> nn.Module:
    """One expert by its config name: 'local', 'functional' or 'distant'."""
    if name == "local":
        return LocalExpert(channels, moe.local_hidden, boundary)
    if name == "functional":
        return FunctionalExpert(channels, moe.functional_heads, moe.functional_radius, boundary, dims)
    if name == "distant":
        return DistantExpert(channels, moe.distant_links, moe.distant_min_distance, boundary, dims, moe.seed)
    raise ValueError(f"unknown expert {name!r}")
