import pytest
import torch

from cnn3d import build_model, preset, with_overrides
from cnn3d.config import Config
from cnn3d.lattice import axial_offsets, cell_coords, chebyshev, neighbour_mix, neighbour_stack, stencil_offsets

TEACHER_DIM = 48


def small(**overrides):
    base = {"lattice.size": 4, "lattice.steps": 4, "lattice.state_size": 6}
    return with_overrides(Config(), {**base, **overrides})


def test_forward_shapes_for_non_cubic_lattice():
    cfg = small(**{"lattice.depth": 5, "lattice.height": 3, "lattice.width": 4, "lattice.face_channels": 2})
    model = build_model(cfg, TEACHER_DIM)
    out = model(torch.randn(3, TEACHER_DIM))
    assert out.embedding.shape == (3, TEACHER_DIM)
    assert out.face_in.shape == out.face_out.shape == (3, 2, 3, 4)
    assert out.state.shape == (3, 6, 5, 3, 4)
    assert out.gates.shape == (3, 3, 5, 3, 4)
    assert torch.allclose(out.gates.sum(1), torch.ones(3, 5, 3, 4), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "hierarchical", "attention", "autoencoder"])
def test_every_transform_kind_runs_and_trains(kind):
    model = build_model(small(**{"transform.kind": kind, "transform.hidden_sizes": "16,32"}), TEACHER_DIM)
    x = torch.randn(4, TEACHER_DIM)
    model(x).embedding.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.transform.parameters())


def test_zero_steps_output_does_not_depend_on_input():
    model = build_model(small(**{"lattice.steps": 0}), TEACHER_DIM).eval()
    a, b = model(torch.randn(2, TEACHER_DIM)).embedding, model(torch.randn(2, TEACHER_DIM) * 5).embedding
    assert torch.equal(a, b)


def test_output_depends_on_input_only_through_the_lattice():
    """With the lattice's final state replaced by a constant, the output no longer depends on the input."""
    model = build_model(small(), TEACHER_DIM).eval()
    x1, x2 = torch.randn(2, TEACHER_DIM), torch.randn(2, TEACHER_DIM)
    assert not torch.allclose(model(x1).embedding, model(x2).embedding)
    real_run = model.run_lattice

    def constant_lattice(face_in):
        state, gates, activity = real_run(face_in)
        return torch.ones_like(state), gates, activity

    model.run_lattice = constant_lattice
    assert torch.equal(model(x1).embedding, model(x2).embedding)


def test_back_face_responds_to_front_face_at_initialisation():
    """A fresh lattice must carry the signal: the back face varies with the input, not only with noise."""
    cfg = preset("test")
    model = build_model(cfg, 384).eval()
    with torch.no_grad():
        out = model(torch.randn(64, 384))
    back = out.face_out.flatten(1)
    # variance across inputs of back-face readings, relative to their mean magnitude
    relative_spread = back.std(0).mean() / back.abs().mean()
    assert relative_spread > 0.05


def test_every_expert_parameter_gets_a_gradient():
    model = build_model(small(**{"lattice.steps": 5}), TEACHER_DIM)
    model(torch.randn(3, TEACHER_DIM)).embedding.pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_batch_equals_samples_one_by_one():
    model = build_model(small(), TEACHER_DIM).eval()
    x = torch.randn(5, TEACHER_DIM)
    batched = model(x).embedding
    single = torch.cat([model(x[i : i + 1]).embedding for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_same_seed_same_model_and_different_seed_differs():
    a = build_model(small(), TEACHER_DIM)
    b = build_model(small(), TEACHER_DIM)
    c = build_model(small(**{"train.seed": 1}), TEACHER_DIM)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("size", [2, 3, 8])
def test_neighbour_counts_match_config_at_every_size(size):
    cfg = small(**{"lattice.size": size, "moe.functional_radius": 2, "moe.distant_links": 5})
    model = build_model(cfg, TEACHER_DIM)
    assert model.processor.neighbours == {"local": 26, "functional": 12, "distant": 5}
    links = model.processor.experts["distant"].links
    assert links.shape == (size**3, 5)
    assert links.min() >= 0 and links.max() < size**3
    assert len(stencil_offsets(1)) == 26 and len(axial_offsets(3)) == 18


def test_distant_links_span_the_configured_distance():
    model = build_model(small(**{"lattice.size": 8, "moe.distant_min_distance": 3}), TEACHER_DIM)
    links = model.processor.experts["distant"].links
    coords = cell_coords((8, 8, 8))
    dist = chebyshev(coords.unsqueeze(1), coords[links], (8, 8, 8), periodic=False)
    assert dist.min() >= 3


def test_local_expert_reads_its_26_neighbours_and_nothing_further():
    model = build_model(small(**{"lattice.size": 5, "moe.experts": "local"}), TEACHER_DIM)
    local = model.processor.experts["local"]
    state = torch.zeros(1, 6, 5, 5, 5, requires_grad=True)
    local(state)[0, :, 2, 2, 2].sum().backward()
    touched = state.grad[0].abs().sum(0) > 0
    assert touched.sum() == 27  # the cell and its 26 neighbours
    assert touched[1:4, 1:4, 1:4].all()


@pytest.mark.parametrize("boundary", ["zero", "periodic"])
def test_neighbour_mix_matches_autograd_reference(boundary):
    torch.manual_seed(0)
    offsets = axial_offsets(2)
    values = torch.randn(2, 3, 4, 3, 5, dtype=torch.double, requires_grad=True)
    weights = torch.randn(2, len(offsets), 4, 3, 5, dtype=torch.double, requires_grad=True)
    reference = (neighbour_stack(values, offsets, boundary) * weights.unsqueeze(2)).sum(1)
    assert torch.allclose(neighbour_mix(values, weights, offsets, boundary), reference)
    assert torch.autograd.gradcheck(lambda v, w: neighbour_mix(v, w, offsets, boundary), (values, weights))


def test_periodic_boundary_wraps_around():
    x = torch.arange(4.0).view(1, 1, 4, 1, 1)
    stacked = neighbour_stack(x, [(-1, 0, 0), (1, 0, 0)], "periodic")
    assert stacked[0, :, 0, 0, 0, 0].tolist() == [3.0, 1.0]  # cell z=0 sees z=3 (wrapped) and z=1
    zero = neighbour_stack(x, [(-1, 0, 0)], "zero")
    assert zero[0, 0, 0, :, 0, 0].tolist() == [0.0, 0.0, 1.0, 2.0]


def test_topk_gating_keeps_k_experts_per_cell():
    model = build_model(small(**{"moe.gating": "topk", "moe.top_k": 1}), TEACHER_DIM)
    state = torch.randn(2, 6, 4, 4, 4)
    gates = model.processor.gate_weights(state)
    assert ((gates > 0).sum(1) == 1).all()
    assert torch.allclose(gates.sum(1), torch.ones(2, 4, 4, 4))


def test_subset_of_experts():
    model = build_model(small(**{"moe.experts": "distant"}), TEACHER_DIM)
    assert model.expert_names == ("distant",)
    assert model(torch.randn(2, TEACHER_DIM)).gates.shape[1] == 1


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(3, TEACHER_DIM)
    grads = []
    for ckpt in (False, True):
        model = build_model(small(**{"train.gradient_checkpointing": ckpt}), TEACHER_DIM)
        model(x).embedding.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, atol=1e-6)


def test_parameter_counts_add_up():
    model = build_model(small(), TEACHER_DIM)
    counts = model.parameter_counts()
    parts = sum(v for k, v in counts.items() if k != "total")
    assert parts == counts["total"] == sum(p.numel() for p in model.parameters())
    groups = model.parameter_groups()
    assert set(groups) == {"transform", "gating", "local", "functional", "distant"}
    assert sum(p.numel() for ps in groups.values() for p in ps) == counts["total"]


def test_teacher_dim_mismatch_is_an_error():
    with pytest.raises(ValueError, match="teacher.embedding_dim=768"):
        build_model(small(**{"teacher.embedding_dim": 768}), TEACHER_DIM)


@pytest.mark.slow
def test_full_preset_forward_and_backward_at_batch_two():
    cfg = preset("full")
    model = build_model(cfg, 384)
    out = model(torch.randn(2, 384))
    assert out.face_in.shape == (2, 1, 37, 37)
    out.embedding.pow(2).mean().backward()
    assert model.processor.experts["local"].stencil.weight.grad.abs().sum() > 0
