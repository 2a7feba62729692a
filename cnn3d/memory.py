"""A training run's own memory figure, independent of what ran before it in the process.

Process RSS never shrinks (a small run after a big one reports the big one's peak), so on
CPU the trainer counts the bytes the run itself holds at its peak, the end of a forward
pass: parameters, gradients, optimiser state, and the activations autograd saved for the
backward (counted once per storage through saved-tensor hooks). On CUDA the allocator's
own peak (``torch.cuda.max_memory_allocated``) is used instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _storage_bytes(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[int, int]:
    """Storages of parameters, their gradients and the optimiser state, by address."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [p for p in model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    return _storage_bytes(tensors)


class SavedActivations:
    """Counts the distinct storages autograd saves while the context is active (bytes, by address)."""

    def __init__(self, exclude: dict[int, int]):
        self.exclude = exclude
        self.saved: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in self.exclude:
            self.saved[address] = storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def watch(self) -> Iterator[SavedActivations]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


def run_peak_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, activations: SavedActivations) -> float:
    """Parameters + gradients + optimiser state + saved activations of one forward, in MiB.

    Gradients are counted at the size of the trainable parameters even before the first
    backward allocates them: at the end of a backward they coexist with the optimiser state.
    """
    held = state_bytes(model, optimizer)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None)
    return (sum(held.values()) + grads + activations.bytes) / 2**20
