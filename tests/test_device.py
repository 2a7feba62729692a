"""Device helpers: the share of cores a tuner worker takes."""

import os

from cnn3d.device import available_cores, threads_per_worker


def test_workers_share_the_cores_instead_of_each_taking_all():
    cores = available_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert threads_per_worker(1) == cores
    assert threads_per_worker(2) == max(1, cores // 2)
    assert threads_per_worker(2 * cores + 1) == 1  # never zero threads
    assert threads_per_worker(2, configured=3) == 3  # train.num_threads wins
    assert threads_per_worker(2, cores=8) == 4 and threads_per_worker(3, cores=2) == 1  # another machine's cores
