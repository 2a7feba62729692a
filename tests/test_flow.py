"""Information-flow views on cubes with known answers."""

import torch

from cnn3d import preset, with_overrides
from cnn3d.flow import last_layer_by_step, layer_representations, light_cone
from cnn3d.model import build_model


def _stencil_cube(size: int = 5, steps: int = 3):
    """Only the local expert, every 3x3x3 weight equal and positive: a pure nearest-neighbour stencil."""
    config = with_overrides(preset("test"), {"lattice.size": size, "lattice.steps": steps, "lattice.state_size": 4,
                                             "moe.experts": "local"})
    model = build_model(config, 16).eval()
    with torch.no_grad():
        model.processor.experts["local"].stencil.weight.fill_(0.05)
    return model


def test_light_cone_of_a_nearest_neighbour_stencil_spreads_one_cell_per_step():
    model = _stencil_cube()
    cone = light_cone(model, torch.randn(1, 16))
    assert cone["step"] == [1, 2, 3]
    assert cone["changed"] == cone["one_cell_per_step"]  # exactly the Chebyshev ball of radius t
    assert cone["changed"][0] < cone["changed"][1] < cone["changed"][2] < 1.0


def test_layers_and_steps_have_the_lattice_shapes():
    model = _stencil_cube()
    reps = layer_representations(model, torch.randn(6, 16), 4, torch.device("cpu"))
    assert list(reps) == ["front face", "z=0", "z=1", "z=2", "z=3", "z=4", "back face", "output"]
    assert reps["z=2"].shape == (6, 4 * 5 * 5) and reps["output"].shape == (6, 16)
    per_step = last_layer_by_step(model, torch.randn(6, 16), 4, torch.device("cpu"))
    assert len(per_step) == 3 and model.steps == 3  # the step count is restored
    # the back layer z=4 is 4 hops from the front: after 3 steps a pure stencil has not reached it
    assert per_step[0].abs().max() == 0 and per_step[2].abs().max() == 0


def test_steps_read_from_one_run_equal_runs_of_t_steps():
    """The back layer after step t of one T-step run is the final back layer of a t-step run."""
    model = build_model(with_overrides(preset("test"), {"lattice.size": 3, "lattice.steps": 4, "lattice.state_size": 4}), 16)
    inputs = torch.randn(5, 16)
    per_step = last_layer_by_step(model, inputs, 8, torch.device("cpu"))
    saved = model.steps
    for t in range(1, saved + 1):
        model.steps = t
        with torch.no_grad():
            state, _, _ = model.run_lattice(model.transform.to_face(inputs))
        assert torch.allclose(per_step[t - 1], state[:, :, -1].flatten(1), atol=1e-6), t
    model.steps = saved
