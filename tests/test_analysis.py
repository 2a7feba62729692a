"""Emergence nulls on cubes and responses whose answers are known."""

import pytest
import torch

from cnn3d import preset, with_overrides
from cnn3d.analysis import (
    EMERGENCE_NAMES,
    CubeResponses,
    EmergenceNulls,
    collect_responses,
    emergence_values,
    excess,
    structureless_inputs,
)
from cnn3d.model import build_model

SMALL = {"lattice.size": 4, "lattice.steps": 4, "lattice.state_size": 8}


def _responses(front, back_face, back_states=None, cells=None, usage=None, pred=None) -> CubeResponses:
    n = front.shape[0]
    return CubeResponses(
        front=front, back_face=back_face, back_states=back_face if back_states is None else back_states,
        cell_response=torch.rand(n, 6) if cells is None else cells,
        usage=torch.full((n, 3), 1 / 3) if usage is None else usage, sparsity=torch.zeros(n),
        pred=front if pred is None else pred,
    )


def _conveyor(n: int, k: int, width: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A front face of ``width`` numbers and a back face that carries exactly its first ``k`` (rotated)."""
    gen = torch.Generator().manual_seed(seed)
    front = torch.randn(n, width, generator=gen)
    rotation = torch.linalg.qr(torch.randn(k, k, generator=gen))[0]
    back = torch.zeros(n, width)
    back[:, :k] = front[:, :k] @ rotation
    return front, back


def test_hand_set_conveyor_carrying_k_dims_reports_k():
    front, back = _conveyor(400, 5, width=8)  # the MI estimator keeps 8 components: all of this face
    values = emergence_values(_responses(front, back), torch.randn(400, 8))
    assert values["effective_dim"] == pytest.approx(5, rel=0.15)
    # 5 independent unit-variance Gaussians copied exactly: the estimator sees a near-deterministic link
    assert values["mutual_info_front_back"] > 5


def test_excess_is_zero_for_the_untrained_cube_itself():
    """Comparing the untrained cube with itself: raw == untrained null, so no metric shows an excess."""
    config = with_overrides(preset("test"), SMALL)
    teacher = torch.randn(48, 32)
    nulls = EmergenceNulls.build(build_model(config, 32), teacher, 16, torch.device("cpu"), bootstrap=20)
    model = build_model(config, 32)
    trained = collect_responses(model, teacher, 16, torch.device("cpu"))
    control = collect_responses(model, nulls.control_inputs, 16, torch.device("cpu"))
    result = nulls.compare(trained, control)
    raw = emergence_values(trained, teacher)
    for name in EMERGENCE_NAMES:
        assert result[f"{name}_null_untrained"] == pytest.approx(raw[name], rel=1e-6, abs=1e-9)
        assert result[f"{name}_excess"] <= 1e-9, name
        assert result[f"{name}_excess_std"] >= 0


def test_mutual_information_excess_over_shuffle_removes_the_bias():
    """Independent faces: raw MI is the estimator's bias (> 0), the excess over the shuffle null is ~0."""
    gen = torch.Generator().manual_seed(1)
    n = 60
    front, back = torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen)
    r = _responses(front, back)
    null_model = _responses(torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen))
    nulls = EmergenceNulls.from_responses(null_model, front, bootstrap=40)
    result = nulls.compare(r, r)
    raw = emergence_values(r, front)["mutual_info_front_back"]
    assert raw > 0.2  # the k^2/2N bias the issue names (k=8, N=60: ~0.5 nats)
    mi_excess, mi_std = result["mutual_info_front_back_excess"], result["mutual_info_front_back_excess_std"]
    assert abs(mi_excess) < 3 * mi_std + 0.05
    # a real k-dim link stands far above both nulls
    front_k, back_k = _conveyor(n, 4, width=8, seed=2)
    linked = nulls.compare(_responses(front_k, back_k), _responses(front_k, back_k))
    assert linked["mutual_info_front_back_excess"] > 5 * linked["mutual_info_front_back_excess_std"]


def test_rsa_shuffle_null_is_near_zero_and_identity_is_one():
    teacher = torch.randn(50, 12, generator=torch.Generator().manual_seed(3))
    r = _responses(teacher, teacher, pred=teacher)
    assert emergence_values(r, teacher)["rsa_teacher"] == pytest.approx(1.0)
    from cnn3d.analysis import shuffled_values

    shuffled = shuffled_values(r, r, teacher, torch.arange(50), torch.Generator().manual_seed(0), repeats=5)
    assert abs(shuffled["rsa_teacher"]) < 0.1


def test_excess_direction():
    assert excess("cell_specialization", 0.5, 0.2, 0.3) == pytest.approx(0.2)
    assert excess("cell_specialization", 0.25, 0.2, 0.3) == pytest.approx(-0.05)
    # lower usage entropy is the emergent direction: a gate that picks experts
    assert excess("expert_usage_entropy", 0.6, 0.99, 0.9) == pytest.approx(0.3)


def test_structureless_inputs_keep_each_column_and_lose_the_rows():
    x = torch.randn(40, 6)
    shuffled = structureless_inputs(x, seed=0)
    for col in range(6):
        assert torch.equal(shuffled[:, col].sort().values, x[:, col].sort().values)
    assert not torch.equal(shuffled, x)
    assert torch.equal(structureless_inputs(x, seed=0), shuffled)  # deterministic by seed


def test_vectorised_bootstrap_matches_the_row_by_row_metrics():
    """The batched bootstrap gives, per resample, what the metrics give on the resampled rows themselves."""
    from cnn3d.analysis import Prepared, Resampled, bootstrap_values, shuffled_values

    gen = torch.Generator().manual_seed(4)
    n = 30
    front = torch.randn(n, 12, generator=gen)
    r = _responses(front, front @ torch.randn(12, 12, generator=gen), back_states=torch.randn(n, 20, generator=gen),
                   cells=torch.rand(n, 6, generator=gen), usage=torch.softmax(torch.randn(n, 3, generator=gen), 1),
                   pred=front + 0.5 * torch.randn(n, 12, generator=gen))
    r.sparsity = torch.rand(n, generator=gen)
    control = _responses(torch.randn(n, 12, generator=gen), torch.randn(n, 12, generator=gen),
                         cells=torch.rand(n, 6, generator=gen))
    teacher = front
    rows = [torch.randint(n, (n,), generator=gen) for _ in range(12)]
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(b)) for b in range(12)]
    prep = Prepared.of(r, teacher)
    raw, shuffled = bootstrap_values(Resampled.of(r, prep), rows, Resampled.of(control, prep), perms)
    for b, rw in enumerate(rows):
        want = emergence_values(r, teacher, rw, prep)
        want_shuffled = shuffled_values(r, control, teacher, rw, torch.Generator().manual_seed(b), 1, prep)
        for name in EMERGENCE_NAMES:
            # RSA ranks a resample's tied copies by mid-rank, the row-by-row Spearman by order
            tol = 0.03 if name == "rsa_teacher" else 1e-6
            assert raw[name][b].item() == pytest.approx(want[name], abs=tol, rel=1e-6), (name, b)
            assert shuffled[name][b].item() == pytest.approx(want_shuffled[name], abs=tol, rel=1e-6), (name, b)
