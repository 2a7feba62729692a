"""EmbeddingTransformer: teacher space <-> lattice face.

One builder per ``transform.kind``; each returns an ``nn.Module`` mapping
``[B, in_dim] -> [B, out_dim]``:

- ``linear``: one affine map.
- ``hierarchical``: a linear skip plus an MLP through ``hidden_sizes``
  (e.g. 768 -> 512 -> 1024 -> 1369, the plan's suggestion), so it is never worse
  than linear at initialisation.
- ``attention``: the vector is cut into ``attention_tokens`` tokens, one
  self-attention encoder layer mixes them, then a linear map to ``out_dim``; plus
  the linear skip.
- ``autoencoder``: a plain MLP ``in -> hidden[0] -> out`` with no skip, the
  encoder/decoder pair of a classic autoencoder around the lattice.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TransformConfig


class Residual(nn.Module):
    """``skip(x) + body(x)``."""

    def __init__(self, skip: nn.Module, body: nn.Module):
        super().__init__()
        self.skip, self.body = skip, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _mlp(widths: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class TokenAttention(nn.Module):
    """Cut ``[B, in_dim]`` into tokens, one encoder layer over them, project to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, tokens: int, heads: int, dropout: float):
        super().__init__()
        self.tokens = min(tokens, in_dim)
        self.chunk = math.ceil(in_dim / self.tokens)
        self.pad = self.chunk * self.tokens - in_dim
        width = heads * max(8, 64 // heads)
        self.embed = nn.Linear(self.chunk, width)
        self.position = nn.Parameter(torch.zeros(self.tokens, width))
        self.encoder = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.project = nn.Linear(self.tokens * width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (0, self.pad)).view(x.shape[0], self.tokens, self.chunk)
        h = self.encoder(self.embed(x) + self.position)  # [B, T, width]
        return self.project(h.flatten(1))


def build_transform(config: TransformConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The ``[B, in_dim] -> [B, out_dim]`` map named by ``config.kind``."""
    hidden = list(config.hidden_sizes)
    if config.kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if config.kind == "hierarchical":
        return Residual(nn.Linear(in_dim, out_dim, bias=False), _mlp([in_dim, *hidden, out_dim], config.dropout))
    if config.kind == "attention":
        body = TokenAttention(in_dim, out_dim, config.attention_tokens, config.attention_heads, config.dropout)
        return Residual(nn.Linear(in_dim, out_dim, bias=False), body)
    if config.kind == "autoencoder":
        return _mlp([in_dim, hidden[0], out_dim], config.dropout)
    raise ValueError(f"unknown transform.kind {config.kind!r}")


class EmbeddingTransformer(nn.Module):
    """Teacher embedding -> front face, and back face -> teacher embedding.

    ``to_face``: ``[B, T] -> [B, F, H, W]`` (``F = face_channels``), with optional
    LayerNorm, dropout and a learned positional encoding over the face (added, so
    it never carries input information). ``from_face``: ``[B, F, H, W] -> [B, T]``,
    LayerNorm over the face first, so the readout is insensitive to the scale the
    lattice delivers.
    """

    def __init__(self, config: TransformConfig, teacher_dim: int, face: tuple[int, int, int]):
        super().__init__()
        self.face = face  # (F, H, W)
        numbers = face[0] * face[1] * face[2]
        self.encode = build_transform(config, teacher_dim, numbers)
        self.decode = build_transform(config, numbers, teacher_dim)
        self.norm_in = nn.LayerNorm(numbers) if config.layer_norm else nn.Identity()
        self.norm_out = nn.LayerNorm(numbers) if config.layer_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.position = nn.Parameter(torch.zeros(numbers)) if config.positional_encoding else None

    def to_face(self, embedding: torch.Tensor) -> torch.Tensor:
        face = self.norm_in(self.encode(embedding))
        if self.position is not None:
            face = face + self.position
        return self.dropout(face).view(-1, *self.face)

    def from_face(self, face: torch.Tensor) -> torch.Tensor:
        return self.decode(self.dropout(self.norm_out(face.flatten(1))))
