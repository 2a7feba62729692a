"""The fused lattice step: the same maths as ``MoEProcessor.reference_step``, fewer passes over memory.

The step is bound by elementwise passes over the state, not by FLOPs (BENCHMARKS.md,
issue 13). Here the state lives in *rows* layout ``[B, D, H, W, C]`` (the memory of a
channels-last ``[B, C, D, H, W]`` tensor, so the two are free views of each other) and:

- every per-cell linear map that reads the state — the gate logits, the functional
  expert's update gate and two attention scores, the functional ``out`` map and the
  distant ``out`` map — is one concatenated ``[P, C]`` map of the state, built once per
  forward (on CPU, ``Projection`` runs it as one matmul per part, so the backward has no
  concatenation of the parts' gradients; elsewhere one ``[B*N, C] @ [C, P]`` and a split).
  ``out`` maps may move before the mixing because the mixing weights sum to 1 (softmax), so
  ``W (sum_k a_k s_k) + b = sum_k a_k (W s_k + b)``;
- the functional expert's neighbour mix reads shifted *views* of one padded buffer
  (``RowsNeighbourMix``, hand-written backward into one padded gradient);
- the distant links mix the projected partners as one sparse ``[N, N]`` CSR matmul on CPU
  (``SparseLinkMix``; elsewhere one matmul over the gathered link axis);
- the local expert's 3x3x3 convolution (``Stencil``) takes its input gradient from a
  forward convolution with the flipped kernel (oneDNN's forward is ~4x faster than its
  data-gradient pass on these shapes);
- the gate and attention softmaxes run over a leading axis (``[E, B, D, H, W]``,
  ``[K, B, D, H, W]``): over a last axis of 3-12 they are several times slower on CPU;
- the damped update is one ``lerp``.

Parameters are the experts' own (``state_dict`` keys and shapes do not change); the
concatenated weight is built at call time. ``tests/test_fused.py`` checks outputs and
gradients against the straightforward formulation.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from . import native
from .experts import expert_kind
from .lattice import Offset

# --------------------------------------------------------------------------- padding in rows layout


def pad_rows(x: torch.Tensor, r: int, boundary: str) -> torch.Tensor:
    """``[B, D, H, W, C] -> [B, D+2r, H+2r, W+2r, C]``: zeros, or wrapped copies for ``periodic``."""
    if boundary != "periodic":
        return F.pad(x, (0, 0, r, r, r, r, r, r))
    for dim in (1, 2, 3):
        n = x.shape[dim]
        x = torch.cat([x.narrow(dim, n - r, r), x, x.narrow(dim, 0, r)], dim=dim)
    return x


def shifted(padded: torch.Tensor, offset: Offset, r: int, dims: tuple[int, int, int]) -> torch.Tensor:
    """The view of a padded rows tensor holding, at cell p, the value at ``p + offset``."""
    dz, dy, dx = offset
    d, h, w = dims
    return padded[:, r + dz : r + dz + d, r + dy : r + dy + h, r + dx : r + dx + w]


class RowsNeighbourMix(torch.autograd.Function):
    """``out[p] = sum_k weights[k, p] * padded[p + offsets[k]]`` over rows-layout tensors.

    ``padded [B, D+2r, H+2r, W+2r, C]``, ``weights [K, B, D, H, W]`` -> ``[B, D, H, W, C]``.
    The weights come offset-first: each ``weights[k]`` is contiguous, and the softmax that
    makes them runs over the leading axis (a softmax over a last axis of 6-12 is ~6x slower
    on CPU). The backward writes every shifted gradient into one padded buffer (autograd
    through K slices would allocate and zero one per slice).
    """

    @staticmethod
    def forward(ctx, padded, weights, offsets, r):
        b, dp, hp, wp, c = padded.shape
        dims = (dp - 2 * r, hp - 2 * r, wp - 2 * r)
        out = torch.mul(shifted(padded, offsets[0], r, dims), weights[0].unsqueeze(-1))
        for k in range(1, len(offsets)):
            out.addcmul_(shifted(padded, offsets[k], r, dims), weights[k].unsqueeze(-1))
        ctx.save_for_backward(padded, weights)
        ctx.meta = (offsets, r, dims)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        padded, weights = ctx.saved_tensors
        offsets, r, dims = ctx.meta
        grad_out = grad_out.contiguous()
        grad_weights = grad_padded = None
        if ctx.needs_input_grad[1]:
            # [K, B, D, H, W, C] would be K times the state; K dot products over C instead
            grad_weights = torch.stack(
                [torch.linalg.vecdot(shifted(padded, o, r, dims), grad_out) for o in offsets], dim=0
            )
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros_like(padded)
            for k, offset in enumerate(offsets):
                shifted(grad_padded, offset, r, dims).addcmul_(grad_out, weights[k].unsqueeze(-1))
        return grad_padded, grad_weights, None, None


class NativeFunctional(torch.autograd.Function):
    """The whole functional expert through ``cnn3d/native.c`` (float32, CPU): attention, mix and gate in one pass.

    ``score [B, D, H, W, C+2]`` (the gate's C columns, then dst and src), ``value [B, D, H, W, C]``
    (both may be column slices of the step's projection: read in place), ``bias [K]`` (the
    offsets' bias), ``tables`` = ``native.neighbour_tables`` -> ``[B, D, H, W, C]``. Saves the
    attention ``[K, B, N]`` for the backward, which recomputes the message; ``_functional`` is the
    same maths in torch ops.
    """

    @staticmethod
    def forward(ctx, score, value, bias, tables):
        out, attn = native.functional_forward(score, value, bias.contiguous(), tables[0], tables[2])
        ctx.save_for_backward(score, value, attn)
        ctx.tables = tables
        return out.view(value.shape)

    @staticmethod
    def backward(ctx, grad_out):
        score, value, attn = ctx.saved_tensors
        b, c = value.shape[0], value.shape[-1]
        grad_score, grad_value, grad_bias = native.functional_backward(
            score, value, attn, grad_out.contiguous().view(b, -1, c), *ctx.tables)
        return grad_score.view(score.shape), grad_value.view(value.shape), grad_bias, None


class ShiftStack(torch.autograd.Function):
    """``padded [B, D+2r, H+2r, W+2r] -> [K, B, D, H, W]``: a scalar map's value at each of K neighbours.

    Offset-first, like ``RowsNeighbourMix``'s weights. The backward adds the K shifted
    gradients into one padded buffer (autograd through K slices would zero and fill one
    padded gradient per slice).
    """

    @staticmethod
    def forward(ctx, padded, offsets, r):
        b, dp, hp, wp = padded.shape
        dims = (dp - 2 * r, hp - 2 * r, wp - 2 * r)
        ctx.meta = (offsets, r, dims, padded.shape)
        return torch.stack([shifted(padded, o, r, dims) for o in offsets], dim=0)

    @staticmethod
    def backward(ctx, grad):
        offsets, r, dims, shape = ctx.meta
        grad_padded = grad.new_zeros(shape)
        for k, offset in enumerate(offsets):
            shifted(grad_padded, offset, r, dims).add_(grad[k])
        return grad_padded, None, None


class Stencil(torch.autograd.Function):
    """A 3x3x3 convolution, stride 1, ``same`` size: ``x [B, C, D, H, W]`` (channels-last) -> same shape.

    Zero borders are the convolution's own padding, so neither the input nor its gradient is ever
    copied into a padded tensor; wrapped (``periodic``) borders pad circularly here. The forward is
    torch's own convolution; the backward computes the input gradient as a forward convolution of
    the output gradient with the flipped, transposed kernel — oneDNN's forward is about 4x faster
    than its data-gradient pass on these shapes. The weight gradient comes from ``native.c`` with
    ``use_native`` (where the kernels apply), else, with the bias gradient, from
    ``convolution_backward``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, boundary, use_native=False):
        if boundary == "periodic":
            source, padding = F.pad(x, (1,) * 6, mode="circular"), 0
        else:
            source, padding = x, 1
        ctx.save_for_backward(source, weight)
        ctx.boundary, ctx.padding, ctx.use_native = boundary, padding, use_native
        return F.conv3d(source, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        source, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # adjoint of a correlation with zero (or wrapped) padding: the flipped kernel over the
            # gradient padded the same way (for ``periodic`` the circular pad folds the wrapped
            # margins back), giving the gradient of the unpadded input
            flipped = weight.flip(2, 3, 4).transpose(0, 1)
            if ctx.boundary == "periodic":
                grad_x = F.conv3d(F.pad(grad_out, (1,) * 6, mode="circular"), flipped)
            else:
                grad_x = F.conv3d(grad_out, flipped, padding=1)
        if ctx.needs_input_grad[1] and ctx.use_native and native.usable(grad_out, source):
            # native.c: oneDNN's weight gradient ran at a third of its forward's rate here (BENCHMARKS.md);
            # None for channel counts the kernel does not take
            grad_weight = native.stencil_weight_grad(grad_out, source, ctx.padding)
        if grad_weight is not None:
            grad_bias = grad_out.sum((0, 2, 3, 4)) if ctx.needs_input_grad[2] else None
        elif ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, source, weight, [weight.shape[0]], [1, 1, 1], [ctx.padding] * 3, [1, 1, 1], False,
                [0, 0, 0], 1, [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_weight, grad_bias, None, None


def _stencil_rows(expert, rows: torch.Tensor, use_native: bool = False) -> torch.Tensor:
    """The local expert on rows ``[B, D, H, W, C]`` (its convolution through ``Stencil``; with ``use_native``, its
    weight gradient from ``native.c`` where the kernels apply)."""
    state = rows.permute(0, 4, 1, 2, 3)  # the channels-last view [B, C, D, H, W]
    if torch.is_autocast_enabled(rows.device.type):  # Stencil's backward assumes one dtype throughout
        return expert(state).permute(0, 2, 3, 4, 1)
    conv = expert.stencil
    out = Stencil.apply(state, conv.weight, conv.bias, expert_boundary(conv), use_native)
    if expert.mlp is not None:
        out = out + expert.mlp(state)
    return out.permute(0, 2, 3, 4, 1)


def expert_boundary(conv: torch.nn.Conv3d) -> str:
    """``periodic`` for a circularly padded convolution, else ``zero``."""
    return "periodic" if conv.padding_mode == "circular" else "zero"


class SparseLinkMix(torch.autograd.Function):
    """``out[b, n] = sum_l weights[l] * flat[b, links[n, l]]`` as one sparse ``[N, N]`` matmul (CPU).

    ``flat [B, N, C]``, ``weights [L]``. The link structure is fixed per lattice, so the CSR
    indices of the link matrix and of its transpose are built once (``_link_csr``); only the
    values (the link weights) change per call. The weights' gradient gathers each slot's
    partners once in the backward.
    """

    @staticmethod
    def forward(ctx, flat, weights, csr):
        b, n, c = flat.shape
        crow, col, slot, crow_t, col_t, slot_t, links = csr
        matrix = _csr(crow, col, weights[slot], n)
        mixed = torch.sparse.mm(matrix, flat.transpose(0, 1).reshape(n, b * c))  # [N, B*C]
        ctx.save_for_backward(flat, weights)
        ctx.csr = csr
        return mixed.view(n, b, c).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        flat, weights = ctx.saved_tensors
        crow, col, slot, crow_t, col_t, slot_t, links = ctx.csr
        b, n, c = flat.shape
        grad_flat = grad_weights = None
        if ctx.needs_input_grad[0]:
            transposed = _csr(crow_t, col_t, weights[slot_t], n)
            grad = torch.sparse.mm(transposed, grad_out.transpose(0, 1).reshape(n, b * c))
            grad_flat = grad.view(n, b, c).transpose(0, 1).contiguous()
        if ctx.needs_input_grad[1]:
            grad_weights = torch.stack([torch.linalg.vecdot(flat.index_select(1, links[:, k]), grad_out).sum()
                                        for k in range(links.shape[1])])
        return grad_flat, grad_weights, None


class NativeLinkMix(torch.autograd.Function):
    """``SparseLinkMix`` through ``cnn3d/native.c`` (float32, CPU): ``flat [B, N, C]``, ``weights [L]``, ``links [N, L]``.

    A gather in one pass, no transposed copies; the backward scatters into each sample's own
    gradient (one thread per sample range) and sums the link weights' gradient per thread.
    """

    @staticmethod
    def forward(ctx, flat, weights, links):
        flat, weights = flat.contiguous(), weights.contiguous()
        ctx.save_for_backward(flat, weights, links)
        return native.link_forward(flat, weights, links)

    @staticmethod
    def backward(ctx, grad_out):
        flat, weights, links = ctx.saved_tensors
        grad_flat, grad_weights = native.link_backward(flat, weights, links, grad_out.contiguous(),
                                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_flat, grad_weights, None


class GatedUpdate(torch.autograd.Function):
    """The step's update in one pass (``cnn3d/native.c``): ``rows + rate * (tanh(sum_e gates[e] * outs[e]) - rows)``.

    ``rows`` and each expert output ``[B, D, H, W, C]``, ``gates [E, B, D, H, W]``. Keeps only
    the tanh for the backward (the gate sum is not needed again). Callers check
    ``native.vector_math()`` first: with a scalar tanh this is slower than torch's ops.
    """

    @staticmethod
    def forward(ctx, rows, gates, rate, *outs):
        b, d, h, w, c = rows.shape
        flat = [o.contiguous().view(b, -1, c) for o in outs]
        gates = gates.contiguous()
        new_rows, t = native.update_forward(rows.contiguous().view(b, -1, c), gates, flat, rate)
        ctx.save_for_backward(gates, t, *flat)
        ctx.rate, ctx.shape = rate, rows.shape
        return new_rows.view(b, d, h, w, c)

    @staticmethod
    def backward(ctx, grad_new):
        gates, t, *outs = ctx.saved_tensors
        b, n, c = t.shape
        grad_rows, grad_gates, grad_outs = native.update_backward(
            gates, outs, t, grad_new.contiguous().view(b, n, c), ctx.rate, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1], ctx.needs_input_grad[3:])
        shape = ctx.shape
        return (None if grad_rows is None else grad_rows.view(shape), grad_gates, None,
                *(None if g is None else g.view(shape) for g in grad_outs))


def _checked_links(expert, cells: int) -> torch.Tensor:
    """The distant links as contiguous int64, checked in range once per links tensor (C reads them unchecked)."""
    links = expert.links
    key = (links.data_ptr(), links._version, tuple(links.shape), cells)
    cached = getattr(expert, "_checked_links", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if links.numel() and (int(links.min()) < 0 or int(links.max()) >= cells):
        raise ValueError(f"distant links point outside the lattice's {cells} cells")
    checked = links.to(torch.int64).contiguous()
    expert._checked_links = (key, checked)
    return checked


def _csr(crow, col, values, n: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


def _link_csr(expert, device: torch.device):
    """CSR indices of the distant links ``[N, L]`` and of their transpose, cached per links tensor."""
    links = expert.links
    key = (device, links.data_ptr(), links._version, tuple(links.shape))
    cached = getattr(expert, "_rows_link_csr", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    n, k = links.shape
    links = links.to(device)
    rows = torch.arange(n, device=device).repeat_interleave(k)
    cols = links.reshape(-1)
    slots = torch.arange(k, device=device).repeat(n)
    by_row = torch.argsort(rows * n + cols, stable=True)  # columns sorted within each row
    by_col = torch.argsort(cols * n + rows, stable=True)  # the transpose: rows of A^T are A's columns
    crow = torch.arange(0, n * k + 1, k, device=device)
    crow_t = torch.cat([crow.new_zeros(1), torch.bincount(cols, minlength=n).cumsum(0)])
    csr = (crow, cols[by_row], slots[by_row], crow_t, rows[by_col], slots[by_col], links)
    expert._rows_link_csr = (key, csr)
    return csr


# --------------------------------------------------------------------------- the step


def _pointwise_weight(conv: torch.nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor]:
    return conv.weight.flatten(1), conv.bias  # [out, in], [out]


def projection(processor) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """The concatenated per-cell map of the state: weight ``[P, C]``, bias ``[P]``, part names and widths."""
    parts: list[tuple[str, torch.Tensor, torch.Tensor]] = [("gate", *_pointwise_weight(processor.gate))]
    experts = processor.experts
    if "functional" in experts:
        parts.append(("functional_gate_score", *_pointwise_weight(experts["functional"].gate_score)))
        parts.append(("functional_value", *_pointwise_weight(experts["functional"].out)))
    if "distant" in experts:
        parts.append(("distant_value", *_pointwise_weight(experts["distant"].out)))
    weight = torch.cat([w for _, w, _ in parts])
    bias = torch.cat([b for _, _, b in parts])
    return weight, bias, [name for name, _, _ in parts], [w.shape[0] for _, w, _ in parts]


class Projection(torch.autograd.Function):
    """The step's per-cell maps of the state as separate contiguous blocks (used on CPU): no split, no concatenation.

    ``rows [B, D, H, W, C]``, ``weight [P, C]`` and ``bias [P]`` (``projection``'s), ``widths`` (its parts'
    widths, the gate's first) -> the gate logits ``[E, B, D, H, W]`` (experts first, as the softmax over a
    leading axis wants, with no transposing copy), then every other part ``[B, D, H, W, width]``. One
    ``[B, D, H, W, P]`` output split into parts would cost, in the backward, a concatenation of the parts'
    gradients (a whole extra pass over ``P`` columns per step) and, for the distant links, a copy of its
    columns; here each part is its own matmul and the backward accumulates the parts' products instead.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, widths):
        c = rows.shape[-1]
        flat = rows.reshape(-1, c)  # [B*N, C]
        weights, biases = weight.split(widths), bias.split(widths)
        gate = torch.addmm(biases[0].unsqueeze(1), weights[0], flat.t())  # [E, B*N]
        parts = [torch.addmm(b, flat, w.t()) for w, b in zip(weights[1:], biases[1:])]  # [B*N, width] each
        ctx.save_for_backward(flat, weight)
        ctx.widths, ctx.shape = widths, rows.shape
        return (gate.view(widths[0], *rows.shape[:-1]), *(p.view(*rows.shape[:-1], w) for p, w in zip(parts, widths[1:])))

    @staticmethod
    def backward(ctx, *grads):
        flat, weight = ctx.saved_tensors
        widths = ctx.widths
        weights = weight.split(widths)
        grad_rows = flat.new_zeros(flat.shape)
        grad_weight, grad_bias = [], []
        for i, (grad, w, width) in enumerate(zip(grads, weights, widths)):
            if grad is None:  # a part nothing read
                grad_weight.append(w.new_zeros(w.shape))
                grad_bias.append(w.new_zeros(width))
                continue
            # [B*N, width]; the gate's [E, B*N] as a transposed view (matmuls take it without a copy)
            g = grad.reshape(width, -1).t() if i == 0 else grad.reshape(-1, width)
            grad_rows.addmm_(g, w)
            grad_weight.append(g.t() @ flat)
            grad_bias.append(g.sum(0))
        return grad_rows.view(ctx.shape), torch.cat(grad_weight), torch.cat(grad_bias), None


def gate_weights_rows(logits: torch.Tensor, temperature: float, top_k: int, dim: int = -1) -> torch.Tensor:
    """Gate logits -> weights summing to 1 over the experts' axis ``dim`` (softmax, or renormalised top-k)."""
    weights = (logits / temperature).softmax(dim=dim)
    if top_k and top_k < weights.shape[dim]:
        kth = weights.topk(top_k, dim=dim).values.narrow(dim, top_k - 1, 1)
        weights = weights * (weights >= kth)
        weights = weights / weights.sum(dim=dim, keepdim=True)
    return weights


def _functional(expert, rows, gate_score, value, use_native: bool = False) -> torch.Tensor:
    """The functional expert on rows: ``gate_score [B, D, H, W, C+2]``, ``value [B, D, H, W, C]``."""
    c = value.shape[-1]
    dims = tuple(rows.shape[1:4])
    if use_native and len(expert.offsets) <= native.MAX_OFFSETS and native.usable(gate_score, value) \
            and native.vector_math():  # the kernel's exp runs on vectors only with libmvec
        return NativeFunctional.apply(gate_score, value, expert.offset_bias, _neighbour_tables(expert, dims))
    gate, dst, src = gate_score.split([c, 1, 1], dim=-1)
    dst, src = dst.squeeze(-1), src.squeeze(-1)  # [B, D, H, W] each
    offsets = expert.offsets
    r = max(max(abs(v) for v in o) for o in offsets)
    if expert.boundary == "periodic" and r > min(dims):  # wraps further than the lattice: rolls (rare)
        src_k = torch.stack([torch.roll(src, (-o[0], -o[1], -o[2]), (1, 2, 3)) for o in offsets], 0)
        value_k = [torch.roll(value, (-o[0], -o[1], -o[2]), (1, 2, 3)) for o in offsets]
    else:
        padded_src = pad_rows(src.unsqueeze(-1), r, expert.boundary)[..., 0]
        src_k = ShiftStack.apply(padded_src, offsets, r)  # [K, B, D, H, W]
        value_k = None
    # [K, 1, D, H, W], -inf outside the lattice; offset-first, so the softmax runs over a leading axis
    bias = expert.offset_bias.view(-1, 1, 1, 1, 1) + _mask_bias(expert, dims, rows)
    attn = (F.leaky_relu(dst + src_k, 0.2) + bias).softmax(dim=0).to(value.dtype)  # [K, B, D, H, W]
    if value_k is None:
        message = RowsNeighbourMix.apply(pad_rows(value, r, expert.boundary), attn, offsets, r)
    else:
        message = sum(v * attn[k].unsqueeze(-1) for k, v in enumerate(value_k))
    return torch.sigmoid(gate) * message


def _neighbour_tables(expert, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``native.neighbour_tables`` of the functional expert at ``dims``, built once per expert and size."""
    cached = getattr(expert, "_native_tables", None)
    if cached is None or cached[0] != dims:
        cached = (dims, native.neighbour_tables(dims, expert.offsets, expert.boundary == "periodic"))
        expert._native_tables = cached
    return cached[1]


def _mask_bias(expert, dims, like: torch.Tensor) -> torch.Tensor:
    cached = getattr(expert, "_rows_mask_bias", None)
    if cached is None or cached.device != like.device or tuple(cached.shape[2:]) != dims:
        inside = expert.inside.unsqueeze(1).to(like.device)  # [K, 1, D, H, W]
        cached = torch.zeros(inside.shape, device=like.device).masked_fill(~inside, float("-inf"))
        expert._rows_mask_bias = cached
    return cached


def _distant(expert, value, use_native: bool = False) -> torch.Tensor:
    """The distant expert on rows: the partners' projected states mixed by the link weights."""
    b, d, h, w, c = value.shape
    flat = value.reshape(b, d * h * w, c)
    weights = expert.link_weight.softmax(0).to(value.dtype)  # [links]
    if use_native and expert.neighbours <= native.MAX_LINKS and native.usable(value):  # one gather pass (native.c)
        return NativeLinkMix.apply(flat, weights, _checked_links(expert, d * h * w)).view(b, d, h, w, c)
    # a sparse matmul: no [B, N, links, C] partner copy (CPU sparse kernels exist for float32/64 only)
    if value.device.type == "cpu" and value.dtype in (torch.float32, torch.float64):
        return SparseLinkMix.apply(flat, weights, _link_csr(expert, value.device)).view(b, d, h, w, c)
    partners = flat.index_select(1, expert.links.view(-1)).view(b, d * h * w, expert.neighbours, c)
    return torch.matmul(weights, partners).view(b, d, h, w, c)  # [B, N, links, C] -> [B, N, C]


def fused_step(processor, rows: torch.Tensor, proj_params=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on ``rows [B, D, H, W, C]`` -> (new rows, gates ``[B, D, H, W, E]``).

    ``proj_params``: ``projection(processor)``, when the caller built it once for all its steps (the
    concatenation and its backward then happen once per forward, not once per step).
    """
    weight, bias, names, widths = proj_params if proj_params is not None else projection(processor)
    # on CPU each part is its own matmul (Projection: 5-10 % of a training step at 8^3, BENCHMARKS.md); under
    # autocast, and on GPUs (where the step may be compiled), one linear and a split
    if rows.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        parts = Projection.apply(rows, weight, bias, tuple(widths))
        columns = dict(zip(names, parts))
        logits = columns["gate"]  # [E, B, D, H, W]
    else:
        proj = F.linear(rows, weight, bias)  # [B, D, H, W, P]: every per-cell map of the state at once
        # one split, not slices: each slice's backward would zero and fill a whole [B, D, H, W, P] gradient
        columns = dict(zip(names, proj.split(widths, dim=-1)))
        logits = columns["gate"].movedim(-1, 0)
    # experts-first [E, B, D, H, W]: a softmax over a last axis of 2-3 is ~8x slower on CPU than over a
    # leading one, and each expert's weight gates[i] comes out contiguous for the mixing below
    gates = gate_weights_rows(logits, processor.temperature, processor.top_k, dim=0)
    outs = []
    for name, expert in processor.experts.items():
        if expert_kind(name) == "local":  # local2, ... (continual.new_expert) are local experts too
            outs.append(_stencil_rows(expert, rows, processor.native))
        elif name == "functional":
            outs.append(_functional(expert, rows, columns["functional_gate_score"],
                                    columns["functional_value"], processor.native))
        else:
            outs.append(_distant(expert, columns["distant_value"], processor.native))
    if (processor.native and len(outs) <= native.MAX_EXPERTS and rows.shape[-1] <= native.MAX_CHANNELS
            and native.usable(rows, gates, *outs) and native.vector_math()):
        new_rows = GatedUpdate.apply(rows, gates, float(processor.update_rate), *outs)
    else:
        message = None
        for g, out in zip(gates.unsqueeze(-1), outs):
            g = g.to(out.dtype)
            message = out * g if message is None else torch.addcmul(message, out, g)
        new_rows = torch.lerp(rows, torch.tanh(message).to(rows.dtype), processor.update_rate)
    return new_rows, gates.permute(1, 2, 3, 4, 0)  # a [B, D, H, W, E] view


def compile_step(model, mode: str | None = None) -> None:
    """Run ``model``'s fused step through ``torch.compile`` from now on (meant for CUDA).

    On a GPU the step is launch-bound (about a hundred small kernels per lattice step);
    inductor fuses its elementwise passes into a few kernels, and ``mode="reduce-overhead"``
    also replays them as a CUDA graph. On CPU compiling made the step slower (BENCHMARKS.md)
    and is not used. Parameters and ``state_dict`` are untouched.
    """
    processor = model.processor
    processor.step_rows = torch.compile(functools.partial(fused_step, processor), mode=mode, dynamic=False)
