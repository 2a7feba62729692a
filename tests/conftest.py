"""Shared fixtures: one teacher-embedding cache for the whole session, filled once."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
