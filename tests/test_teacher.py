"""The teacher: bundled MiniLM offline, a DistilBERT-shaped model through the same loader, one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertTokenizer, DistilBertConfig, DistilBertModel

from cnn3d.config import TeacherConfig
from cnn3d.errors import UserError
from cnn3d.teacher import BUNDLED_NAME, Teacher, load_teacher

WORDS = [
    "the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat", "tree", "house", "car",
    "red", "blue", "green", "small", "big", "old", "new", "quickly", "slowly", "market", "river", "city", "people",
    "music", "loud", "quiet", "morning", "night", "in", "at",
]
TEXTS = ["the cat sat on the mat", "a big dog ran under the old tree", "music in the city at night"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> Teacher:
    return load_teacher(TeacherConfig(), torch.device("cpu"))


def save_tiny_distilbert(folder, seed: int = 0) -> str:
    """A random DistilBERT (dim 768, 2 layers) plus a BERT WordPiece tokenizer, saved like a hub folder."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(vocab), dim=768, n_layers=2, n_heads=12, hidden_dim=1024, max_position_embeddings=128
    )
    DistilBertModel(config).save_pretrained(folder)
    return str(folder)


def test_bundled_minilm_loads_offline(minilm: Teacher) -> None:
    assert minilm.dim == 384
    assert minilm.identity.startswith(BUNDLED_NAME + "#")
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training


def test_minilm_embeddings(minilm: Teacher) -> None:
    emb = minilm.embed(TEXTS + [TEXTS[0]])
    assert emb.shape == (4, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.equal(emb[0], emb[3])
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    assert minilm.embed([]).shape == (0, 384)


def test_alias_and_full_name_give_same_identity(minilm: Teacher) -> None:
    other = load_teacher(TeacherConfig(model=BUNDLED_NAME), "cpu")
    assert other.identity == minilm.identity


def test_pooling_and_normalisation(minilm: Teacher) -> None:
    cls = load_teacher(TeacherConfig(pooling="cls"), "cpu").embed(TEXTS)
    mean = minilm.embed(TEXTS)
    assert (cls - mean).abs().max() > 1e-3
    assert mean.norm(dim=1).sub(1).abs().max() > 1e-2  # MiniLM's raw mean is not unit length
    normed = load_teacher(TeacherConfig(normalize=True), "cpu").embed(TEXTS)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(normed, torch.nn.functional.normalize(mean, dim=1), atol=1e-5, rtol=1e-5)


def test_batching_and_order_do_not_change_results(minilm: Teacher) -> None:
    one_by_one = load_teacher(dataclasses.replace(TeacherConfig(), batch_size=1), "cpu")
    texts = TEXTS + ["short", "a much longer sentence about rivers, markets and people in the morning"]
    torch.testing.assert_close(one_by_one.embed(texts), minilm.embed(texts), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(minilm.embed(texts[::-1]), minilm.embed(texts).flip(0), atol=1e-5, rtol=1e-4)


def test_max_length_truncates(minilm: Teacher) -> None:
    short = load_teacher(TeacherConfig(max_length=8), "cpu")
    long_text = "the cat sat on the mat while the dog ran under the old tree in the city"
    assert (short.embed([long_text]) - minilm.embed([long_text])).abs().max() > 1e-3
    # A sentence that fits in 8 tokens is unaffected (up to kernel-level noise).
    torch.testing.assert_close(short.embed(["the cat sat"]), minilm.embed(["the cat sat"]), atol=1e-5, rtol=1e-4)


def test_distilbert_path_through_same_loader(tmp_path) -> None:
    folder = save_tiny_distilbert(tmp_path / "distil")
    teacher = load_teacher(TeacherConfig(model=folder, batch_size=2), "cpu")
    assert teacher.dim == 768
    assert teacher.identity.startswith(str((tmp_path / "distil").resolve()) + "#")
    emb = teacher.embed(TEXTS)
    assert emb.shape == (3, 768) and emb.dtype == torch.float32
    assert (emb[0] - emb[1]).abs().max() > 1e-4
    assert teacher.forward_passes == 2 and teacher.sentences_embedded == 3
    cls = load_teacher(TeacherConfig(model=folder, pooling="cls"), "cpu").embed(TEXTS)
    assert cls.shape == (3, 768)


def test_identity_changes_with_weights(tmp_path) -> None:
    folder = save_tiny_distilbert(tmp_path / "m", seed=0)
    first = load_teacher(TeacherConfig(model=folder), "cpu")
    again = load_teacher(TeacherConfig(model=folder), "cpu")
    assert again.identity == first.identity and again.model is first.model  # second load is cached
    save_tiny_distilbert(tmp_path / "m", seed=1)
    changed = load_teacher(TeacherConfig(model=folder), "cpu")
    assert changed.identity != first.identity
    assert (changed.embed(TEXTS[:1]) - first.embed(TEXTS[:1])).abs().max() > 1e-4


def test_embedding_dim_mismatch_is_user_error(minilm: Teacher) -> None:
    assert load_teacher(TeacherConfig(embedding_dim=384), "cpu").dim == 384
    with pytest.raises(UserError, match="384"):
        load_teacher(TeacherConfig(embedding_dim=768), "cpu")


@pytest.mark.parametrize(
    "name",
    [
        "no-such-org/no-such-model-xyz",
        "distilbert-base-uncased",
        "./no/such/folder",
        "/definitely/not/here",
    ],
)
def test_unloadable_names_are_one_line_user_errors(name: str) -> None:
    with pytest.raises(UserError) as info:
        load_teacher(TeacherConfig(model=name), "cpu")
    message = str(info.value)
    assert name in message and "\n" not in message


def test_folder_without_model_is_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="config.json") as info:
        load_teacher(TeacherConfig(model=str(tmp_path)), "cpu")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_folder_with_config_but_no_weights_is_user_error(tmp_path) -> None:
    DistilBertConfig(dim=64, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    with pytest.raises(UserError) as info:
        load_teacher(TeacherConfig(model=str(tmp_path)), "cpu")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
