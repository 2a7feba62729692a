"""The fused lattice step against the straightforward formulation: same outputs, same gradients."""

import copy

import pytest
import torch

from cnn3d import build_model, with_overrides
from cnn3d.config import Config
from cnn3d.fused import Projection, RowsNeighbourMix, ShiftStack, pad_rows
from cnn3d.lattice import axial_offsets, neighbour_stack

TEACHER_DIM = 24

CASES = {
    "default": {},
    "periodic": {"lattice.boundary": "periodic"},
    "topk": {"moe.gating": "topk", "moe.gate_temperature": 0.5},
    "local_mlp_distant_only": {"moe.experts": ["local", "distant"], "moe.local_hidden": 8},
    "functional_only_once": {"moe.experts": ["functional"], "lattice.inject": "once"},
    "wrap_further_than_lattice": {"lattice.size": 3, "lattice.boundary": "periodic", "moe.functional_radius": 2},
    "non_cubic_checkpointed": {"lattice.depth": 5, "lattice.height": 3, "train.gradient_checkpointing": True},
}


def _run(model, x, fused):
    model.fused = fused
    model.zero_grad(set_to_none=True)
    out = model(x)
    # touch every output so that every path's gradient is compared
    loss = out.embedding.pow(2).sum() + out.gates.pow(2).sum() + out.activity + out.state.sin().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("case", CASES)
def test_fused_step_matches_reference_outputs_and_gradients(case):
    cfg = with_overrides(Config(), {"lattice.size": 4, "lattice.steps": 4, "lattice.state_size": 6, **CASES[case]})
    model = build_model(cfg, TEACHER_DIM).double().train()
    x = torch.randn(3, TEACHER_DIM, dtype=torch.float64)
    ref, ref_grads = _run(model, x, fused=False)
    new, new_grads = _run(model, x, fused=True)
    for field in ("embedding", "face_out", "state", "gates", "activity"):
        assert torch.allclose(getattr(new, field), getattr(ref, field), rtol=1e-9, atol=1e-12), field
    assert new.state.shape == ref.state.shape and new.gates.shape == ref.gates.shape
    assert set(new_grads) == set(ref_grads) and len(ref_grads) > 0
    for name, grad in ref_grads.items():
        assert torch.allclose(new_grads[name], grad, rtol=1e-8, atol=1e-10), name


def test_fused_step_matches_reference_in_float32():
    """In float32 the fused step is as close to the exact (float64) gradients as the straightforward step is.

    Comparing the two float32 results with each other alone does not work on every CPU: a gradient that is
    exactly zero in exact arithmetic (``face_io.read_bias``, whose output is normalised) comes out as ~1e-5 of
    summation noise whose size depends on the kernels' order of summation (AVX2 vs AVX-512).
    """
    cfg = with_overrides(Config(), {"lattice.size": 5, "lattice.steps": 5})
    model = build_model(cfg, TEACHER_DIM)
    x = torch.randn(4, TEACHER_DIM, generator=torch.Generator().manual_seed(0))
    ref, ref_grads = _run(model, x, fused=False)
    new, new_grads = _run(model, x, fused=True)
    exact, exact_grads = _run(copy.deepcopy(model).double(), x.double(), fused=False)
    assert torch.allclose(new.embedding, ref.embedding, rtol=1e-4, atol=1e-5)
    assert torch.allclose(new.embedding.double(), exact.embedding, rtol=1e-4, atol=1e-5)
    for name, truth in exact_grads.items():
        ref_error = (ref_grads[name].double() - truth).abs().max().item()
        new_error = (new_grads[name].double() - truth).abs().max().item()
        # a wrong gradient is off by about its own size (1-400 here); float32 noise is ~1e-6 of it
        assert new_error <= 4 * ref_error + 1e-6 * truth.abs().max().item() + 2e-5, (name, new_error, ref_error)


def test_fused_step_keeps_parameter_names_and_shapes():
    """Fusion concatenates weights at call time; the state_dict is the experts' own."""
    cfg = with_overrides(Config(), {"lattice.size": 4, "lattice.steps": 2})
    keys = {k: tuple(v.shape) for k, v in build_model(cfg, TEACHER_DIM).state_dict().items()}
    assert "processor.gate.weight" in keys and "processor.experts.functional.gate_score.weight" in keys
    assert keys["processor.experts.distant.out.weight"] == (16, 16, 1, 1, 1)


@pytest.mark.parametrize("boundary", ["zero", "periodic"])
def test_rows_kernels_match_autograd_reference(boundary):
    offsets = axial_offsets(2)
    values = torch.randn(2, 4, 5, 3, 3, dtype=torch.float64, requires_grad=True)  # [B, D, H, W, C]
    weights = torch.randn(2, 4, 5, 3, len(offsets), dtype=torch.float64, requires_grad=True)
    stacked = neighbour_stack(values.permute(0, 4, 1, 2, 3), offsets, boundary)  # [B, K, C, D, H, W]
    reference = (stacked * weights.permute(0, 4, 1, 2, 3).unsqueeze(2)).sum(1).permute(0, 2, 3, 4, 1)
    mixed = RowsNeighbourMix.apply(pad_rows(values, 2, boundary), weights.movedim(-1, 0), offsets, 2)
    assert torch.allclose(mixed, reference)
    assert torch.autograd.gradcheck(lambda v, w: RowsNeighbourMix.apply(pad_rows(v, 2, boundary), w.movedim(-1, 0),
                                                                        offsets, 2),
                                    (values, weights))
    scalar = values[..., 0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: ShiftStack.apply(pad_rows(s.unsqueeze(-1), 2, boundary)[..., 0], offsets, 2),
                                    (scalar,))


def test_projection_parts_are_one_linear_split_with_its_gradients():
    """``Projection`` (each part its own matmul, the gate experts-first) against ``F.linear`` then a split."""
    widths = (3, 8, 6, 6)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)  # [B, D, H, W, C]
    weight = torch.randn(sum(widths), 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(sum(widths), dtype=torch.float64, generator=gen, requires_grad=True)
    parts = Projection.apply(rows, weight, bias, widths)
    reference = torch.nn.functional.linear(rows, weight, bias).split(widths, dim=-1)
    assert torch.allclose(parts[0], reference[0].movedim(-1, 0))  # the gate comes experts-first
    for part, ref in zip(parts[1:], reference[1:]):
        assert part.shape == ref.shape and torch.allclose(part, ref)
    assert torch.autograd.gradcheck(lambda r, w, b: Projection.apply(r, w, b, widths), (rows, weight, bias))
    # a part nothing reads gets no gradient: the others' must still be right
    assert torch.autograd.gradcheck(lambda r, w, b: Projection.apply(r, w, b, widths)[1:3], (rows, weight, bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cuda_step_matches_eager_step():
    from cnn3d.fused import compile_step

    cfg = with_overrides(Config(), {"lattice.size": 6, "lattice.steps": 6})
    eager = build_model(cfg, TEACHER_DIM).cuda()
    compiled = build_model(cfg, TEACHER_DIM).cuda()
    compile_step(compiled, mode="reduce-overhead")
    x = torch.randn(4, TEACHER_DIM, device="cuda")
    for _ in range(3):  # CUDA graphs are recorded on a later call than the first
        ref, ref_grads = _run(eager, x, fused=True)
        new, new_grads = _run(compiled, x, fused=True)
    assert torch.allclose(new.embedding, ref.embedding, rtol=1e-3, atol=1e-4)
    for name, grad in ref_grads.items():
        assert torch.allclose(new_grads[name], grad, rtol=1e-2, atol=1e-4), name
