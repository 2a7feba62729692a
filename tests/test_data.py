"""Corpora: shipped files, user files, cleaning, the hash split, difficulty and curricula."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from cnn3d.config import DataConfig
from cnn3d.data import (
    Corpus,
    builtin_sentences,
    clean_sentences,
    curriculum_fraction,
    curriculum_subset,
    hash_unit,
    heldout_sentences,
    load_corpus,
    split_by_hash,
    text_difficulties,
)
from cnn3d.errors import UserError

SENTENCES = [f"Sentence number {i} talks about {topic} today." for i, topic in
             enumerate(["rivers", "bread", "music", "stars", "trains", "law", "cats", "rain"] * 25)]


def cfg(corpus: str, **kw) -> DataConfig:
    return DataConfig(corpus=corpus, **kw)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- shipped corpora


def test_builtin_corpus_size_and_lengths():
    lines = builtin_sentences()
    assert len(set(lines)) >= 1500
    assert len(set(lines)) == len(lines)
    assert all(4 <= len(s.split()) <= 40 for s in lines)
    assert all(s == " ".join(s.split()) for s in lines)


def test_builtin_corpus_is_varied():
    lines = builtin_sentences()
    lengths = [len(s.split()) for s in lines]
    assert min(lengths) <= 5 and max(lengths) >= 30
    assert sum(s.endswith("?") for s in lines) >= 50  # questions
    assert sum(s.startswith('"') for s in lines) >= 50  # quoted dialogue
    first_three = {" ".join(s.split()[:3]) for s in lines}
    assert len(first_three) > 0.8 * len(lines)  # not a template with swapped nouns


def test_heldout_is_distinct_and_disjoint_from_builtin():
    held = heldout_sentences()
    assert len(held) >= 250
    assert len(set(held)) == len(held)
    assert not set(held) & set(builtin_sentences())
    assert all(3 <= len(s.split()) <= 40 for s in held)


def test_load_builtin_splits_both_sides():
    corpus = load_corpus(DataConfig())
    assert corpus.source == "built-in corpus"
    assert not set(corpus.train) & set(corpus.validation)
    share = len(corpus.validation) / len(corpus)
    assert 0.15 < share < 0.25
    assert len(corpus) == len(builtin_sentences())


def test_load_is_deterministic():
    a, b = load_corpus(DataConfig()), load_corpus(DataConfig())
    assert a.train == b.train and a.validation == b.validation and a.difficulties == b.difficulties


# --------------------------------------------------------------------------- user files


def test_txt_corpus(tmp_path):
    path = write_lines(tmp_path / "c.txt", SENTENCES[:50])
    corpus = load_corpus(cfg(str(path)))
    assert sorted(corpus.sentences) == sorted(SENTENCES[:50])
    assert str(path) in corpus.source


def test_jsonl_corpus_with_custom_column(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": s}) for i, s in enumerate(SENTENCES[:30])) + "\n\n")
    corpus = load_corpus(cfg(str(path), text_column="body"))
    assert sorted(corpus.sentences) == sorted(SENTENCES[:30])


def test_csv_corpus_with_quoted_commas(tmp_path):
    path = tmp_path / "c.csv"
    rows = ["label,text"] + [f'{i},"{s}, with a comma"' for i, s in enumerate(SENTENCES[:20])]
    path.write_text("\n".join(rows) + "\n")
    corpus = load_corpus(cfg(str(path)))
    assert len(corpus) == 20
    assert all(s.endswith(", with a comma") for s in corpus.sentences)


def test_folder_corpus_is_recursive_sorted_and_skips_others(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    write_lines(tmp_path / "b" / "two.txt", SENTENCES[10:20])
    write_lines(tmp_path / "a.txt", SENTENCES[:10])
    (tmp_path / "c.csv").write_text("text\n" + "\n".join(SENTENCES[20:25]) + "\n")
    write_lines(tmp_path / "notes.md", ["This markdown file should be ignored entirely."])
    write_lines(tmp_path / ".hidden" / "x.txt", ["This hidden file should be ignored too."])
    (tmp_path / "empty.txt").write_text("")
    corpus = load_corpus(cfg(str(tmp_path)))
    order = {s: i for i, s in enumerate(corpus.sentences)}
    assert set(order) == set(SENTENCES[:25])
    # split lists keep corpus order: a.txt, then b/two.txt, then c.csv
    for side in (corpus.train, corpus.validation):
        idx = [SENTENCES.index(s) for s in side]
        assert idx == sorted(idx)


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_lines(tmp_path / "mine.txt", SENTENCES[:10])
    assert len(load_corpus(cfg("~/mine.txt"))) == 10


# --------------------------------------------------------------------------- bad corpora


def test_missing_path(tmp_path):
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "nope.txt")))
    msg = one_line_error(e)
    assert "nope.txt does not exist" in msg and "builtin" in msg


def test_empty_file(tmp_path):
    (tmp_path / "e.txt").write_text("  \n\n")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "e.txt")))
    assert "is empty" in one_line_error(e)


def test_binary_file_with_nul_bytes(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"hello world there\x00\x01\x02binary")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "b.txt")))
    assert "binary" in one_line_error(e)


def test_undecodable_utf8(tmp_path):
    (tmp_path / "l.txt").write_bytes("caf\xe9 au lait is nice\n".encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "l.txt")))
    assert "not UTF-8" in one_line_error(e)


def test_csv_without_column_lists_columns(tmp_path):
    (tmp_path / "c.csv").write_text("sentence,label\nA cat sat down here.,1\n")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "c.csv")))
    msg = one_line_error(e)
    assert "no column 'text'" in msg and "'sentence', 'label'" in msg and "data.text_column" in msg


def test_jsonl_without_column_lists_columns(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "A cat sat down here.", "id": 1}) + "\n")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "c.jsonl")))
    msg = one_line_error(e)
    assert "no column 'text'" in msg and "'body', 'id'" in msg


def test_jsonl_with_invalid_line(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Fine line of text here."}) + "\n{broken\n")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "c.jsonl")))
    assert "line 2 is not valid JSON" in one_line_error(e)


def test_unsupported_extension(tmp_path):
    (tmp_path / "c.pdf").write_text("Some text that is not in a supported file.")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path / "c.pdf")))
    msg = one_line_error(e)
    assert "'.pdf'" in msg and ".txt, .jsonl, .csv" in msg


def test_too_few_sentences_says_found_and_needed(tmp_path):
    path = write_lines(tmp_path / "c.txt", SENTENCES[:3] + ["too short", ""])
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(path)), min_sentences=32)
    msg = one_line_error(e)
    assert "has 3 usable sentences" in msg and "but 32 are needed" in msg and "batch_size" in msg


def test_single_sentence_is_too_few_to_split(tmp_path):
    path = write_lines(tmp_path / "c.txt", SENTENCES[:1])
    with pytest.raises(UserError, match="has 1 usable sentences .* but 2 are needed"):
        load_corpus(cfg(str(path)))


def test_folder_without_usable_files(tmp_path):
    write_lines(tmp_path / "readme.md", ["Nothing to see here at all."])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError) as e:
        load_corpus(cfg(str(tmp_path)))
    assert "has no usable files" in one_line_error(e)


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError) as e:
        load_corpus(cfg("hf:some/dataset:train"))
    msg = one_line_error(e)
    assert "'datasets' package" in msg and "not installed" in msg


def test_hf_without_name():
    with pytest.raises(UserError, match="names no dataset"):
        load_corpus(cfg("hf:"))


# --------------------------------------------------------------------------- cleaning


def test_clean_normalises_dedupes_and_keeps_first_order():
    raw = ["  The  cat\tsat on the mat. ", "", "A dog barked loudly.", "The cat sat on the mat.",
           "A dog barked loudly."]
    assert clean_sentences(raw) == ["The cat sat on the mat.", "A dog barked loudly."]


def test_length_filter(tmp_path):
    lines = ["Two words.", "Exactly four words here.", " ".join(["word"] * 10), " ".join(["long"] * 11)]
    path = write_lines(tmp_path / "c.txt", lines)
    corpus = load_corpus(cfg(str(path), min_words=4, max_words=10))
    assert sorted(corpus.sentences) == sorted(lines[1:3])


def test_max_sentences_keeps_first_n_after_dedupe(tmp_path):
    lines = [SENTENCES[0]] * 5 + SENTENCES[1:100]
    path = write_lines(tmp_path / "c.txt", lines)
    corpus = load_corpus(cfg(str(path), max_sentences=40))
    assert sorted(corpus.sentences) == sorted(SENTENCES[:40])


# --------------------------------------------------------------------------- hash split


def test_hash_split_is_stable_when_the_corpus_grows():
    small = SENTENCES[:100]
    big = SENTENCES + [f"Another new line number {i} appears here." for i in range(300)]
    t1, v1 = split_by_hash(small, 0.2)
    t2, v2 = split_by_hash(big, 0.2)
    assert v1 and t1
    assert set(t1) <= set(t2) and set(v1) <= set(v2)
    assert all((hash_unit(s) < 0.2) == (s in v1) for s in small)


def test_hash_unit_range_and_stability():
    values = [hash_unit(s) for s in SENTENCES]
    assert all(0.0 <= v < 1.0 for v in values)
    assert hash_unit("fixed text") == hash_unit("fixed text")
    assert len(set(values)) == len(set(SENTENCES))


def test_tiny_corpus_fallback_keeps_both_sides_non_empty():
    pair = ["First short sentence here.", "Second short sentence here."]
    for fraction in (0.0, 1.0):
        train, val = split_by_hash(pair, fraction)
        assert len(train) == 1 and len(val) == 1
    train, val = split_by_hash(pair, 0.0)
    assert val == [min(pair, key=hash_unit)]  # the sentence closest to the threshold crosses
    train, val = split_by_hash(pair, 1.0)
    assert train == [max(pair, key=hash_unit)]


# --------------------------------------------------------------------------- difficulty


def test_text_difficulty_range_and_ordering():
    ref = builtin_sentences()
    easy = "The dog is happy."
    hard = ("The perspicacious lexicographer meticulously annotated antediluvian palimpsests, scrutinising "
            "idiosyncratic orthographic peculiarities while contemplating etymological ambiguities "
            "throughout interminable crepuscular vigils beside the ossuary, whereupon obstreperous "
            "cartographers remonstrated vociferously about sesquipedalian nomenclature.")
    assert len(hard.split()) >= 30
    d_easy, d_hard = text_difficulties([easy, hard], reference=ref)
    assert 0.0 <= d_easy < d_hard <= 1.0
    assert d_hard > 0.9 and d_easy < 0.3


def test_text_difficulty_each_part_matters():
    ref = builtin_sentences()
    short_common, long_common, short_rare = text_difficulties(
        ["I like the house.",
         "I think that the people in the house like the food that we made for them at the weekend.",
         "Obstreperous pangolins excoriated sesquipedalians."],
        reference=ref,
    )
    assert long_common > short_common
    assert short_rare > short_common


def test_corpus_difficulties_cover_all_sentences(tmp_path):
    path = write_lines(tmp_path / "c.txt", SENTENCES)
    corpus = load_corpus(cfg(str(path)))
    assert set(corpus.difficulties) == set(corpus.sentences)
    assert all(0.0 <= d <= 1.0 for d in corpus.difficulties.values())
    assert corpus.difficulty(corpus.train[:3]) == [corpus.difficulties[s] for s in corpus.train[:3]]
    (unseen,) = corpus.difficulty(["A completely unseen sentence with zygomorphic words."])
    assert 0.0 <= unseen <= 1.0


def test_synthetic_corpus_uses_generator_difficulty():
    from cnn3d.synthetic import generate_sentences

    data = DataConfig(corpus="synthetic", synthetic_sentences=300, max_words=40, min_words=1)
    corpus = load_corpus(data, seed=5)
    expected = dict(generate_sentences(300, seed=5))
    assert len(corpus) == 300 and "seed 5" in corpus.source
    assert corpus.difficulties == expected
    assert load_corpus(data, seed=6).sentences != corpus.sentences


def test_corpus_dataclass_helpers():
    c = Corpus(train=["a b c"], validation=["d e f"], source="x", difficulties={"a b c": 0.1, "d e f": 0.9})
    assert len(c) == 2 and c.sentences == ["a b c", "d e f"]
    assert c.difficulty(["d e f", "a b c"]) == [0.9, 0.1]


# --------------------------------------------------------------------------- curriculum


def test_curriculum_subset_keeps_easiest_in_original_order():
    texts = ["a", "b", "c", "d", "e", "f"]
    diff = [0.9, 0.1, 0.5, 0.1, 0.7, 0.3]
    assert curriculum_subset(texts, diff, 0.5) == ["b", "d", "f"]
    assert curriculum_subset(texts, diff, 1.0) == texts
    assert curriculum_subset(texts, diff, 0.0) == ["b"]  # at least one, ties broken by position
    assert curriculum_subset(texts, diff, 0.01) == ["b"]
    assert curriculum_subset([], [], 0.5) == []


def test_curriculum_subset_exact_fractions_and_errors():
    texts = [str(i) for i in range(10)]
    assert len(curriculum_subset(texts, [0.0] * 10, 0.3)) == 3  # no float round-up to 4
    assert curriculum_subset(texts, [0.0] * 10, 0.3) == ["0", "1", "2"]
    with pytest.raises(ValueError):
        curriculum_subset(texts, [0.0] * 9, 0.5)


def test_curriculum_fraction_schedule():
    assert curriculum_fraction(0, 5, 0.3, 1.0) == pytest.approx(0.3)
    assert curriculum_fraction(4, 5, 0.3, 1.0) == pytest.approx(1.0)
    assert curriculum_fraction(2, 5, 0.3, 1.0) == pytest.approx(0.65)
    assert curriculum_fraction(0, 1, 0.3, 0.8) == 0.8
    values = [curriculum_fraction(e, 7, 0.2, 0.9) for e in range(7)]
    assert values == sorted(values)
    assert curriculum_fraction(10, 5, 0.3, 1.0) == pytest.approx(1.0)  # clamped past the end


def test_curriculum_on_real_corpus_grows_with_epochs():
    corpus = load_corpus(replace(DataConfig(), max_sentences=400))
    diffs = corpus.difficulty(corpus.train)
    sizes = [len(curriculum_subset(corpus.train, diffs, curriculum_fraction(e, 4, 0.3, 1.0))) for e in range(4)]
    assert sizes == sorted(sizes) and sizes[-1] == len(corpus.train)
    easiest = curriculum_subset(corpus.train, diffs, 0.3)
    rest = [s for s in corpus.train if s not in set(easiest)]
    mean = lambda xs: sum(len(s.split()) for s in xs) / len(xs)  # noqa: E731
    assert mean(easiest) < mean(rest)


def test_one_curriculum_rule_with_a_minimum():
    from cnn3d.data import curriculum_indices

    diff = [0.9, 0.1, 0.5, 0.1, 0.7, 0.3]
    assert curriculum_indices(diff, 0.5) == [1, 3, 5]
    assert curriculum_indices(diff, 0.0, minimum=4) == [1, 2, 3, 5]  # the trainer keeps at least one batch
    assert curriculum_indices(diff, 0.3, minimum=100) == list(range(6))
    assert curriculum_indices([0.0] * 10, 0.3) == [0, 1, 2]
    assert curriculum_subset(list("abcdef"), diff, 0.0, minimum=4) == ["b", "c", "d", "f"]
