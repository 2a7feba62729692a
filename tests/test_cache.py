"""The embedding cache: keys, counters, LRU eviction, corruption recovery, concurrent processes, the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertModel, BertTokenizer

from cnn3d.cache import (
    HEADER_SIZE,
    EmbeddingCache,
    cache_key,
    embed_with_cache,
    namespace_name,
    namespace_spec,
)
from cnn3d.cli import cache_main
from cnn3d.config import DataConfig, TeacherConfig
from cnn3d.teacher import Teacher, load_teacher

WORDS = [
    "the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat", "tree", "house", "car",
    "red", "blue", "green", "small", "big", "old", "new", "quickly", "slowly", "market", "river", "city", "people",
    "music", "loud", "quiet", "morning", "night", "in", "at", "and", "with", "from", "near", "far",
]
DIM = 32
PER_VECTOR_F32 = 16 + DIM * 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences over WORDS (deterministic)."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))] = None
    return list(out)


def save_tiny_bert(folder: Path) -> str:
    """A random 1-layer BERT (hidden 32) with a WordPiece tokenizer over WORDS: a real teacher that loads in ms."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tiny_teacher(tiny_dir: str, **overrides) -> Teacher:
    return load_teacher(TeacherConfig(model=tiny_dir, batch_size=16, **overrides), "cpu")


def shard_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("ns-*/*.shard"))


# --------------------------------------------------------------------------- keys


def test_keys_change_with_each_component() -> None:
    base = {"identity": "m#abc", "pooling": "mean", "normalize": False, "max_length": 64, "embed_version": 1}
    variants = [
        base,
        {**base, "identity": "m#abd"},
        {**base, "identity": "other#abc"},
        {**base, "pooling": "cls"},
        {**base, "normalize": True},
        {**base, "max_length": 63},
        {**base, "embed_version": 2},
    ]
    keys = {cache_key(spec, "the cat sat") for spec in variants}
    keys |= {cache_key(base, t) for t in ("the cat sat ", "The cat sat", "the  cat sat")}
    assert len(keys) == len(variants) + 3
    assert all(len(k) == 16 for k in keys)
    assert cache_key(dict(reversed(list(base.items()))), "x") == cache_key(base, "x")  # order-independent
    assert namespace_name(base, "float16") != namespace_name(base, "float32")


def test_changed_pooling_or_length_never_serves_stale_vectors(tmp_path: Path, tiny_dir: str) -> None:
    texts = sentences(20)
    cache = EmbeddingCache(tmp_path)
    for overrides in ({}, {"pooling": "cls"}, {"normalize": True}, {"max_length": 8}):
        teacher = tiny_teacher(tiny_dir, **overrides)
        before = cache.stats.computed
        got = embed_with_cache(teacher, texts, cache)
        assert cache.stats.computed - before == len(texts), overrides
        torch.testing.assert_close(got, teacher.embed(texts), atol=1e-5, rtol=1e-4)
    assert len(cache.namespaces()) == 4


# --------------------------------------------------------------------------- counters and values


def test_second_pass_computes_nothing(tmp_path: Path, tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    texts = sentences(40)
    requested = texts + texts[:10]  # duplicates are computed once
    cold_cache = EmbeddingCache(tmp_path)
    cold = embed_with_cache(teacher, requested, cold_cache)
    assert cold.shape == (50, DIM) and cold.dtype == torch.float32
    assert (cold_cache.stats.hits, cold_cache.stats.misses, cold_cache.stats.computed) == (0, 50, 40)
    assert teacher.sentences_embedded == 40
    torch.testing.assert_close(cold[:40], teacher.embed(texts), atol=1e-5, rtol=1e-4)
    assert torch.equal(cold[40:], cold[:10])

    calls = teacher.forward_passes
    warm_cache = EmbeddingCache(tmp_path)  # a fresh instance reads the shards from disk
    warm = embed_with_cache(teacher, requested[::-1], warm_cache)
    assert teacher.forward_passes == calls
    assert (warm_cache.stats.hits, warm_cache.stats.misses, warm_cache.stats.computed) == (50, 0, 0)
    assert torch.equal(warm, cold.flip(0))
    assert warm_cache.stats.hit_rate == 1.0

    more = sentences(50)[40:] + texts[:5]
    embed_with_cache(teacher, more, warm_cache)
    assert warm_cache.stats.computed == 10 and warm_cache.stats.hits == 55 and warm_cache.stats.misses == 10
    assert warm_cache.stats.bytes_on_disk == sum(p.stat().st_size for p in shard_files(tmp_path))
    assert warm_cache.stats.as_metrics()["cache_hit_rate"] == pytest.approx(55 / 65)


def test_no_cache_computes_directly(tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    texts = sentences(5)
    assert torch.equal(embed_with_cache(teacher, texts, None), teacher.embed(texts))
    assert embed_with_cache(teacher, [], EmbeddingCache("/nonexistent-never-created")).shape == (0, DIM)


def test_float16_round_trip(tmp_path: Path, tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    texts = sentences(30)
    exact = teacher.embed(texts)
    cold = embed_with_cache(teacher, texts, EmbeddingCache(tmp_path / "f16", dtype="float16"))
    warm = embed_with_cache(teacher, texts, EmbeddingCache(tmp_path / "f16", dtype="float16"))
    assert cold.dtype == torch.float32 and torch.equal(cold, warm)  # cold returns stored precision too
    torch.testing.assert_close(warm, exact, atol=2e-3, rtol=1e-3)
    embed_with_cache(teacher, texts, EmbeddingCache(tmp_path / "f32"))
    (f16,), (f32,) = shard_files(tmp_path / "f16"), shard_files(tmp_path / "f32")
    assert f16.stat().st_size == HEADER_SIZE + 30 * (16 + DIM * 2)
    assert f32.stat().st_size == HEADER_SIZE + 30 * PER_VECTOR_F32


def test_from_config(tmp_path: Path) -> None:
    assert EmbeddingCache.from_config(DataConfig(cache=False)) is None
    cache = EmbeddingCache.from_config(DataConfig(cache_dir=str(tmp_path), cache_dtype="float16", max_cache_size_gb=2))
    assert cache is not None and cache.dtype == "float16" and cache.max_bytes == 2 * 10**9
    assert EmbeddingCache("~/x").cache_dir == Path.home() / "x"


def test_unwritable_cache_still_returns_vectors(tmp_path: Path, tiny_dir: str, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    teacher = tiny_teacher(tiny_dir)
    with caplog.at_level(logging.WARNING, logger="cnn3d.cache"):
        got = embed_with_cache(teacher, sentences(4), EmbeddingCache(blocker))
    torch.testing.assert_close(got, teacher.embed(sentences(4)), atol=1e-5, rtol=1e-4)
    assert "cannot use" in caplog.text


# --------------------------------------------------------------------------- eviction and compaction


def test_eviction_drops_least_recently_used_shard(tmp_path: Path, tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    a, b, c = sentences(30)[:10], sentences(30)[10:20], sentences(30)[20:]
    shard_bytes = HEADER_SIZE + 10 * PER_VECTOR_F32
    cache = EmbeddingCache(tmp_path, max_size_gb=(2 * shard_bytes + 100) / 1e9)
    embed_with_cache(teacher, a, cache)
    time.sleep(0.01)
    embed_with_cache(teacher, b, cache)
    time.sleep(0.01)
    embed_with_cache(teacher, a, cache)  # a is now more recently used than b
    time.sleep(0.01)
    embed_with_cache(teacher, c, cache)  # over the cap: b goes
    assert cache.stats.shards_evicted == 1 and len(shard_files(tmp_path)) == 2
    assert cache.stats.bytes_on_disk == 2 * shard_bytes

    fresh = EmbeddingCache(tmp_path, max_size_gb=(2 * shard_bytes + 100) / 1e9)
    embed_with_cache(teacher, a + c, fresh)
    assert fresh.stats.computed == 0
    embed_with_cache(teacher, b, fresh)
    assert fresh.stats.computed == 10


def test_shard_larger_than_cap_is_kept_with_warning(tmp_path: Path, tiny_dir: str, caplog) -> None:
    cache = EmbeddingCache(tmp_path, max_size_gb=100 / 1e9)
    with caplog.at_level(logging.WARNING, logger="cnn3d.cache"):
        embed_with_cache(tiny_teacher(tiny_dir), sentences(5), cache)
    assert len(shard_files(tmp_path)) == 1 and "exceed the cap" in caplog.text


def test_many_small_shards_are_merged(tmp_path: Path, tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    texts = sentences(40)
    cache = EmbeddingCache(tmp_path, max_shards_per_namespace=3)
    for i in range(0, 40, 10):
        embed_with_cache(teacher, texts[i : i + 10], cache)
    assert len(shard_files(tmp_path)) == 1
    fresh = EmbeddingCache(tmp_path)
    torch.testing.assert_close(embed_with_cache(teacher, texts, fresh), teacher.embed(texts), atol=1e-5, rtol=1e-4)
    assert fresh.stats.computed == 0


# --------------------------------------------------------------------------- integrity


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_vector_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 30):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _break_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0:8] = b"NOTMAGIC"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_vector_bytes, _break_magic])
def test_corrupt_shard_is_discarded_and_recomputed(tmp_path: Path, tiny_dir: str, caplog, damage) -> None:
    teacher = tiny_teacher(tiny_dir)
    texts = sentences(20)
    good = embed_with_cache(teacher, texts, EmbeddingCache(tmp_path))
    (shard,) = shard_files(tmp_path)
    damage(shard)
    cache = EmbeddingCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cnn3d.cache"):
        again = embed_with_cache(teacher, texts, cache)
    assert "corrupt shard" in caplog.text
    assert cache.stats.shards_corrupt == 1 and cache.stats.computed == 20
    torch.testing.assert_close(again, good, atol=1e-5, rtol=1e-4)
    assert not shard.exists() and len(shard_files(tmp_path)) == 1
    assert EmbeddingCache(tmp_path).get_or_compute(namespace_spec(teacher), texts, DIM, _refuse).shape == (20, DIM)


def _refuse(texts: list[str]) -> np.ndarray:
    raise AssertionError(f"teacher called for {len(texts)} sentences")


def test_stray_temp_files_are_ignored(tmp_path: Path, tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    embed_with_cache(teacher, sentences(5), EmbeddingCache(tmp_path))
    (folder,) = tmp_path.glob("ns-*")
    (folder / ".tmp-dead.part").write_bytes(b"half a shard")
    fresh = EmbeddingCache(tmp_path)
    embed_with_cache(teacher, sentences(5), fresh)
    assert fresh.stats.computed == 0 and fresh.stats.shards_corrupt == 0


# --------------------------------------------------------------------------- several processes

WORKER = """
import json, os, sys, time
from pathlib import Path
from cnn3d.cache import EmbeddingCache, embed_with_cache
from cnn3d.config import TeacherConfig
from cnn3d.teacher import load_teacher

model, cache_dir, texts_file, me, other, out = sys.argv[1:]
texts = json.loads(Path(texts_file).read_text())
teacher = load_teacher(TeacherConfig(model=model, batch_size=8), "cpu")
slow = teacher.embed
def embed(batch, progress=False):
    time.sleep(0.1)  # hold the lock a while so the other worker really waits on it
    return slow(batch, progress)
teacher.embed = embed
Path(me).touch()
deadline = time.time() + 60
while not Path(other).exists() and time.time() < deadline:
    time.sleep(0.01)
cache = EmbeddingCache(cache_dir)
vectors = embed_with_cache(teacher, texts, cache)
Path(out).write_text(json.dumps({"computed": cache.stats.computed, "hits": cache.stats.hits,
                                 "teacher_sentences": teacher.sentences_embedded, "shape": list(vectors.shape)}))
"""


@pytest.mark.slow
def test_two_processes_fill_one_cache(tmp_path: Path, tiny_dir: str) -> None:
    texts = sentences(120)
    parts = [texts[:80], texts[40:]]  # 40 sentences wanted by both
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = []
    for i, part in enumerate(parts):
        (tmp_path / f"texts{i}.json").write_text(json.dumps(part))
        args = [tiny_dir, str(cache_dir), str(tmp_path / f"texts{i}.json"), str(tmp_path / f"ready{i}"),
                str(tmp_path / f"ready{1 - i}"), str(tmp_path / f"out{i}.json")]
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["shape"] for r in results] == [[80, DIM], [80, DIM]]
    # The lock makes the overlap computed once in total, whoever got there first.
    assert sum(r["computed"] for r in results) == 120
    assert sum(r["teacher_sentences"] for r in results) == 120
    assert sum(r["hits"] for r in results) == 40

    teacher = tiny_teacher(tiny_dir)
    union = EmbeddingCache(cache_dir)
    got = union.get_or_compute(namespace_spec(teacher), texts, DIM, _refuse)
    assert union.stats.shards_corrupt == 0 and union.stats.hits == 120
    torch.testing.assert_close(torch.from_numpy(got), teacher.embed(texts), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- CLI


def test_cli_warm_stats_clear(tmp_path: Path, tiny_dir: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(25)) + "\n")
    cache_dir = tmp_path / "cache"
    runner = CliRunner()
    common = ["--cache-dir", str(cache_dir), "--set", f"teacher.model={tiny_dir}", "--log-level", "warning"]

    result = runner.invoke(cache_main, ["warm", "--corpus", str(corpus), "--device", "cpu", "--no-progress", *common])
    assert result.exit_code == 0, result.output
    assert "computed" in result.output

    result = runner.invoke(cache_main, ["stats", *common])
    assert result.exit_code == 0, result.output
    assert "1 namespaces" in result.output and tiny_dir in result.output

    result = runner.invoke(cache_main, ["warm", "--corpus", str(corpus), "--device", "cpu", "--no-progress", *common])
    assert result.exit_code == 0 and "0 computed" in result.output

    result = runner.invoke(cache_main, ["clear", *common])
    assert result.exit_code == 0 and "cleared" in result.output
    assert not shard_files(cache_dir)
    assert "0 namespaces" in runner.invoke(cache_main, ["stats", *common]).output


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "--set", "no.such_key=1"],
        ["stats", "--set", "missing-equals"],
        ["stats", "--no-such-option"],
        ["no-such-command"],
        ["warm", "--corpus", "/no/such/corpus.txt", "--device", "cpu"],
        ["warm", "--corpus", "builtin", "--device", "cpu", "--set", "teacher.model=/no/such/model"],
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(cache_main, [*args, "--cache-dir", str(tmp_path), "--log-level", "warning"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


def test_cli_entry_point_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from cnn3d.cli import cache_main; cache_main()", "stats", "--cache-dir", str(tmp_path),
         "--set", "data.cache_dtype=float64"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: data.cache_dtype")


# --------------------------------------------------------------------------- issue 14


def test_bytes_on_disk_is_measured_when_every_lookup_hits(tmp_path: Path, tiny_dir: str) -> None:
    teacher = tiny_teacher(tiny_dir)
    texts = sentences(30)
    embed_with_cache(teacher, texts, EmbeddingCache(tmp_path))
    warm = EmbeddingCache(tmp_path)
    embed_with_cache(teacher, texts, warm)
    assert warm.stats.hit_rate == 1.0 and warm.stats.computed == 0
    on_disk = sum(p.stat().st_size for p in shard_files(tmp_path))
    assert on_disk > 0 and warm.stats.as_metrics()["cache_bytes_on_disk"] == on_disk


def test_a_user_corpus_embeds_only_its_own_sentences_and_the_bank_file(tmp_path: Path, tiny_dir: str) -> None:
    """The decode bank of a user corpus is its validation split + data.decode_bank, never the built-in corpus."""
    from cnn3d import preset, with_overrides
    from cnn3d.train import prepare_data

    texts = sentences(60)
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
    extra = sentences(70)[60:]
    (tmp_path / "bank.txt").write_text("\n".join(extra) + "\n")
    config = with_overrides(preset("test"), {
        "teacher.model": tiny_dir, "data.corpus": str(tmp_path / "corpus.txt"), "data.decode_bank": str(tmp_path / "bank.txt"),
        "data.cache_dir": str(tmp_path / "cache"), "data.min_words": 1, "train.batch_size": 8,
    })
    data = prepare_data(config, torch.device("cpu"))
    assert data.cache_metrics["cache_computed"] == 70  # the corpus and the bank file, nothing else
    assert set(data.bank.texts) == set(data.val_texts) | set(extra)
    again = prepare_data(config, torch.device("cpu"))
    assert again.cache_metrics["cache_hit_rate"] == 1.0
    assert again.cache_metrics["cache_bytes_on_disk"] == sum(p.stat().st_size for p in shard_files(tmp_path / "cache"))
