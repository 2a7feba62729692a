"""Lattice geometry: one indexing convention for the whole project.

States are tensors ``[B, C, D, H, W]``; the front face is ``z = 0`` (``state[:, :, 0]``)
and the back face ``z = D - 1``. A cell's flat index is ``(z * H + y) * W + x``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

Offset = tuple[int, int, int]


def stencil_offsets(radius: int = 1) -> list[Offset]:
    """All (dz, dy, dx) with Chebyshev distance 1..radius: 26 for radius 1."""
    r = range(-radius, radius + 1)
    return [o for o in itertools.product(r, r, r) if o != (0, 0, 0)]


def axial_offsets(radius: int) -> list[Offset]:
    """Offsets along the three axes up to ``radius`` cells away: 6 * radius of them."""
    offsets = []
    for step in range(1, radius + 1):
        for axis in range(3):
            for sign in (-1, 1):
                o = [0, 0, 0]
                o[axis] = sign * step
                offsets.append(tuple(o))
    return offsets


def neighbour_stack(x: torch.Tensor, offsets: list[Offset], boundary: str) -> torch.Tensor:
    """Values of each cell's neighbours: ``[B, C, D, H, W] -> [B, K, C, D, H, W]``.

    Entry k at cell p is ``x[p + offsets[k]]``; beyond the edge it is 0 (``zero``)
    or wraps around (``periodic``).
    """
    r = max(max(abs(c) for c in o) for o in offsets)
    d, h, w = x.shape[-3:]
    mode = "circular" if boundary == "periodic" else "constant"
    if boundary == "periodic" and r > min(d, h, w):
        # circular padding cannot wrap further than the tensor itself
        return torch.stack([torch.roll(x, shifts=(-o[0], -o[1], -o[2]), dims=(2, 3, 4)) for o in offsets], dim=1)
    padded = F.pad(x, (r, r, r, r, r, r), mode=mode)
    return torch.stack(
        [padded[:, :, r + dz : r + dz + d, r + dy : r + dy + h, r + dx : r + dx + w] for dz, dy, dx in offsets], dim=1
    )


def _shifted_view(padded: torch.Tensor, offset: Offset, r: int, dims: tuple[int, int, int]) -> torch.Tensor:
    dz, dy, dx = offset
    d, h, w = dims
    return padded[:, :, r + dz : r + dz + d, r + dy : r + dy + h, r + dx : r + dx + w]


def _pad(x: torch.Tensor, r: int, boundary: str) -> torch.Tensor:
    return F.pad(x, (r,) * 6, mode="circular" if boundary == "periodic" else "constant")


class NeighbourMix(torch.autograd.Function):
    """``out[p] = sum_k weights[k, p] * values[p + offsets[k]]`` with a hand-written backward.

    Autograd through K shifted slices would allocate and zero a padded gradient per
    slice; here the backward accumulates into one padded buffer instead.
    """

    @staticmethod
    def forward(ctx, values, weights, offsets, boundary):  # values [B,C,D,H,W], weights [B,K,D,H,W]
        r = max(max(abs(c) for c in o) for o in offsets)
        dims = tuple(values.shape[-3:])
        padded = _pad(values, r, boundary)
        out = torch.zeros_like(values)
        for k, offset in enumerate(offsets):
            out.addcmul_(weights[:, k : k + 1], _shifted_view(padded, offset, r, dims))
        ctx.save_for_backward(padded, weights)
        ctx.meta = (offsets, boundary, r, dims, values.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        padded, weights = ctx.saved_tensors
        offsets, boundary, r, dims, shape = ctx.meta
        grad_weights = torch.empty_like(weights)
        grad_padded = torch.zeros_like(padded)
        for k, offset in enumerate(offsets):
            view = _shifted_view(padded, offset, r, dims)
            grad_weights[:, k] = (grad_out * view).sum(1)
            _shifted_view(grad_padded, offset, r, dims).addcmul_(grad_out, weights[:, k : k + 1])
        d, h, w = dims
        grad_values = grad_padded[:, :, r : r + d, r : r + h, r : r + w]
        if boundary == "periodic":  # fold the wrapped margins back onto the cells they copied
            with torch.enable_grad():
                probe = torch.zeros(shape, dtype=padded.dtype, device=padded.device, requires_grad=True)
                (grad_values,) = torch.autograd.grad(_pad(probe, r, boundary), probe, grad_padded)
        return grad_values.contiguous(memory_format=_memory_format(grad_out)), grad_weights, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous() else torch.contiguous_format


def neighbour_mix(values: torch.Tensor, weights: torch.Tensor, offsets: list[Offset], boundary: str) -> torch.Tensor:
    """Weighted sum of each cell's neighbours: ``values [B, C, D, H, W]``, ``weights [B, K, D, H, W]``."""
    # under autocast the softmaxed weights come back in float32 while values may be bf16/fp16
    return NeighbourMix.apply(values, weights.to(values.dtype), offsets, boundary)


def inside_mask(dims: tuple[int, int, int], offsets: list[Offset], boundary: str) -> torch.Tensor:
    """``[K, D, H, W]`` bool: whether neighbour k of each cell lies inside the lattice."""
    d, h, w = dims
    if boundary == "periodic":
        return torch.ones(len(offsets), d, h, w, dtype=torch.bool)
    z = torch.arange(d).view(d, 1, 1)
    y = torch.arange(h).view(1, h, 1)
    x = torch.arange(w).view(1, 1, w)
    masks = [
        ((z + dz >= 0) & (z + dz < d) & (y + dy >= 0) & (y + dy < h) & (x + dx >= 0) & (x + dx < w))
        for dz, dy, dx in offsets
    ]
    return torch.stack(masks).expand(len(offsets), d, h, w).clone()


def cell_coords(dims: tuple[int, int, int]) -> torch.Tensor:
    """``[N, 3]`` (z, y, x) of every cell in flat-index order."""
    d, h, w = dims
    grid = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


def chebyshev(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, int, int], periodic: bool) -> torch.Tensor:
    """Chebyshev distance between coordinate tensors ``[..., 3]``."""
    diff = (a - b).abs()
    if periodic:
        size = torch.tensor(dims)
        diff = torch.minimum(diff, size - diff)
    return diff.max(dim=-1).values


def sample_distant_links(
    dims: tuple[int, int, int], links: int, min_distance: int, periodic: bool, seed: int
) -> torch.Tensor:
    """``[N, links]`` flat indices of fixed long-range partners for every cell.

    Partners are drawn uniformly among cells at Chebyshev distance >= ``min_distance``,
    deterministically from ``seed``. On lattices too small to have such cells, the
    farthest reachable cells are used, so every cell always has exactly ``links`` partners.
    """
    gen = torch.Generator().manual_seed(seed)
    coords = cell_coords(dims)
    n = coords.shape[0]
    idx = torch.randint(n, (n, links), generator=gen)
    src = coords.unsqueeze(1)
    max_reach = max(s // 2 if periodic else s - 1 for s in dims)
    need = min(min_distance, max(max_reach, 1))
    for _ in range(64):  # rejection sampling: each round fixes most of the remaining misses
        bad = chebyshev(src, coords[idx], dims, periodic) < need
        if not bad.any():
            break
        idx[bad] = torch.randint(n, (int(bad.sum()),), generator=gen)
    bad = chebyshev(src, coords[idx], dims, periodic) < need
    if bad.any():  # practically never: fall back to the farthest cell from each
        far = torch.stack([chebyshev(coords[i], coords, dims, periodic).argmax() for i in range(n)])
        idx[bad] = far.unsqueeze(1).expand(n, links)[bad]
    return idx
