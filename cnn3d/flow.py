"""Information flow through the cube: what each depth layer and each step carries, and how fast it spreads.

Everything is read from the model's public forward pieces (``transform.to_face``, ``run_lattice``,
``face_io.readout``); per-step states come from running the lattice for ``t`` steps (the
lattice is deterministic, so the state after ``t`` of ``T`` steps is the final state of a
``t``-step run). Shapes: ``[n, ...]`` over n sentences; layers are flattened ``[n, C*H*W]``.
"""

from __future__ import annotations

import torch

from . import metrics as M
from .lattice import cell_coords, chebyshev


@torch.no_grad()
def layer_representations(model, inputs: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``{name: [n, features]}`` for the front face, every depth layer ``z=k``, the back face and the output."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, inputs.shape[0], batch_size):
        out = model(inputs[start : start + batch_size].to(device))
        reps = {"front face": out.face_in.float().flatten(1)}
        for z in range(out.state.shape[2]):
            reps[f"z={z}"] = out.state[:, :, z].float().flatten(1)
        reps["back face"] = out.face_out.float().flatten(1)
        reps["output"] = out.embedding.float()
        for name, value in reps.items():
            parts.setdefault(name, []).append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def last_layer_by_step(model, inputs: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The back layer's state ``[n, C*H*W]`` after each step ``t = 1..T`` (read from one run per batch)."""
    model.eval()
    per_step: list[list[torch.Tensor]] = [[] for _ in range(model.steps)]
    for start in range(0, inputs.shape[0], batch_size):
        face = model.transform.to_face(inputs[start : start + batch_size].to(device))
        model.run_lattice(face, on_step=lambda t, state: per_step[t - 1].append(state[:, :, -1].float().flatten(1).cpu()))
    return [torch.cat(chunks) for chunks in per_step]


@torch.no_grad()
def light_cone(model, embedding: torch.Tensor, cell: tuple[int, int] | None = None, epsilon: float = 1e-2,
               tolerance: float = 1e-6) -> dict[str, list[float]]:
    """Perturb one front-face cell of one input and follow the change step by step.

    ``embedding [1, T]`` is mapped to its face; ``epsilon`` is added to every face channel of
    ``cell`` (y, x; default the centre). For ``t = 1..T`` returns the fraction of cells whose
    state moved by more than ``tolerance`` (max over channels), and the fraction a front that
    spreads exactly one cell per step (Chebyshev distance ``<= t`` from the perturbed cell at
    z = 0) would reach: a nearest-neighbour stencil reaches exactly that.
    """
    model.eval()
    d, h, w = model.dims
    y, x = cell if cell is not None else (h // 2, w // 2)
    face = model.transform.to_face(embedding)
    moved = face.clone()
    moved[:, :, y, x] += epsilon
    coords = cell_coords((d, h, w))
    distance = chebyshev(coords, torch.tensor([0, y, x]), (d, h, w), periodic=False)  # [cells]
    # one run per input (not one batch: a batch could round the untouched cells differently), every step kept
    runs: list[dict[int, torch.Tensor]] = [{}, {}]
    for states, start in zip(runs, (face, moved)):
        model.run_lattice(start, on_step=lambda t, state, keep=states: keep.__setitem__(t, state.clone()))
    changed, bound = [], []
    for t in range(1, model.steps + 1):
        a, b = runs[0][t], runs[1][t]
        delta = (a - b).abs().amax(dim=1)[0].flatten()  # [cells]
        changed.append((delta > tolerance).double().mean().item())
        bound.append((distance <= t).double().mean().item())
    return {"step": list(range(1, model.steps + 1)), "changed": changed, "one_cell_per_step": bound}


def ridge_by_layer(train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], train_y: torch.Tensor,
                   val_y: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Validation cosine of a ridge probe from each named layer to the teacher embedding."""
    from .probes import ridge_probe_cosine

    return {name: ridge_probe_cosine(train[name], train_y, val[name], val_y) for name in names}


def effective_dim_by_layer(reps: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    return {name: M.effective_dim(reps[name]) for name in names}


def rsa_by_layer(reps: dict[str, torch.Tensor], teacher: torch.Tensor, names: list[str]) -> dict[str, float]:
    return {name: M.rsa(reps[name], teacher) for name in names}
