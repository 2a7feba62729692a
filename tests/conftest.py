"""Shared fixtures: one teacher-embedding cache for the whole session, filled once."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n 2``) each test process takes its share of the cores for torch:
    two processes asking for every core would oversubscribe them, and torch's threads then spin at barriers
    waiting for a descheduled partner (BENCHMARKS.md measured 20x slower steps that way)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory):
    """A cache folder holding teacher embeddings of the built-in corpus (what prepare_data needs)."""
    from cnn3d.cache import EmbeddingCache, embed_with_cache
    from cnn3d.config import TeacherConfig
    from cnn3d.data import builtin_sentences
    from cnn3d.teacher import load_teacher

    folder = tmp_path_factory.mktemp("embedding-cache")
    teacher = load_teacher(TeacherConfig(), torch.device("cpu"))
    embed_with_cache(teacher, builtin_sentences(), EmbeddingCache(folder))
    return folder


class Crash(Exception):
    """What ``crash_after``'s callback raises: a run dying right after an epoch's checkpoint was written."""


@pytest.fixture
def crash_after():
    """``crash_after(n)``: a trainer callback that raises ``crash_after.error`` once epoch ``n`` is reported."""

    def make(epoch: int):
        def callback(report):
            if report.epoch == epoch:
                raise Crash(f"crashed after epoch {epoch}")

        return callback

    make.error = Crash
    return make
