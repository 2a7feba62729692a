"""A run's own memory figure: independent of what ran before it in the process."""

import torch

from cnn3d import preset, with_overrides
from cnn3d.memory import SavedActivations, run_peak_mb
from cnn3d.train import prepare_data, train

SMALL = {"lattice.size": 4, "lattice.steps": 4, "data.max_sentences": 48, "train.main_epochs": 1,
         "train.batch_size": 16}


def test_saved_activations_count_each_storage_once():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64)
    counter = SavedActivations(exclude={w.untyped_storage().data_ptr(): 0})
    with counter.watch():
        y = torch.tanh(x @ w)  # saves x (w excluded) and tanh's output
        (y * y).sum()  # saves y again (same storage) twice
    assert counter.bytes == 2 * 128 * 64 * 4
    model = torch.nn.Linear(64, 64)
    # 64*64 + 64 weights, the same again for gradients, no optimiser state yet
    assert abs(run_peak_mb(model, None, counter) - (2 * 4160 * 4 + counter.bytes) / 2**20) < 1e-9


def test_peak_memory_of_a_small_run_does_not_depend_on_a_bigger_one_before_it(warm_cache):
    small = with_overrides(preset("test"), {**SMALL, "data.cache_dir": str(warm_cache)})
    big = with_overrides(small, {"lattice.size": 8, "lattice.steps": 8})
    data = prepare_data(small, torch.device("cpu"))
    alone = train(small, data=data, progress=False).metrics["peak_memory_mb"]
    after_big = [train(big, data=data, progress=False).metrics["peak_memory_mb"]]
    after_big.append(train(small, data=data, progress=False).metrics["peak_memory_mb"])
    assert after_big[0] > 4 * alone  # the figure tracks the lattice (8^3 x 8 steps vs 4^3 x 4)
    assert abs(after_big[1] - alone) <= 0.1 * alone, (alone, after_big)
