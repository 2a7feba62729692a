"""``cnn3d-analyze``: the page on a real (tiny) checkpoint in headless Chromium, and bad input."""

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import cnn3d.analyze as analyze
from cnn3d import preset, with_overrides
from cnn3d.analyze_cli import analyze_cli
from cnn3d.checkpoint import save_checkpoint
from cnn3d.model import build_model
from tuner.report import check_in_browser, find_chromium

TINY = {"lattice.size": 4, "lattice.steps": 3, "lattice.state_size": 8, "data.max_sentences": 160,
        "train.batch_size": 16}


@pytest.fixture(scope="module")
def checkpoint(warm_cache, tmp_path_factory):
    """A checkpoint of a tiny cube at its initial weights (what the page needs; training is tested elsewhere)."""
    config = with_overrides(preset("test"), {**TINY, "data.cache_dir": str(warm_cache)})
    folder = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(folder, build_model(config, 384), config, {"teacher_dim": 384, "epochs_done": 0})
    return folder


@pytest.mark.slow
def test_page_draws_every_figure_in_headless_chromium(checkpoint, tmp_path, monkeypatch):
    if not find_chromium():
        pytest.skip("no chromium on PATH")
    monkeypatch.setattr(analyze, "RIDGE_TRAIN", 96)
    result = analyze.analyze_checkpoint(checkpoint, distractors=(20,), probe_sentences=80, progress=False)
    page = analyze.write_page(result, tmp_path / "page.html")
    text = page.read_text()
    assert text.count("plotly.js v") == 1  # the library embedded once
    check = check_in_browser(page)
    assert check.errors == []
    assert len(check.figures) == 7 and check.undrawn == []
    # the untrained checkpoint against the untrained null: no excess anywhere
    assert all(result.emergence[f"{name}_excess"] <= 1e-9 for name in ("cell_specialization", "rsa_teacher"))
    assert result.decoding["bank_size"][1] == result.decoding["bank_size"][0] + 20
    assert result.decoding_edits["edits"] == 5 * result.decoding["bank_size"][0] and "Near neighbours:" in text
    # the floor: one output for every sentence decodes at most one of the (distinct) validation sentences
    queries = result.decoding["bank_size"][0]
    assert all(0 <= m <= 1 / queries + 1e-9 for m in result.decoding["mean"]) and len(result.decoding["mean"]) == 2
    assert set(result.probes) == {"tense", "plural_subject", "human_subject", "clauses"}


def test_a_folder_that_is_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "page.html"
    result = CliRunner().invoke(analyze_cli, [str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "not a cnn3d checkpoint" in result.output
    assert not out.exists()


def test_a_probing_file_without_labels_is_one_line_and_writes_nothing(checkpoint, tmp_path):
    bad = tmp_path / "probe.csv"
    bad.write_text("text,tag\n" + "".join(f"sentence {i},a\n" for i in range(20)))
    out = tmp_path / "page.html"
    result = CliRunner().invoke(analyze_cli, [str(checkpoint), "--out", str(out), "--probing-file", str(bad)])
    assert result.exit_code == 2 and "no 'label' column" in result.output
    assert result.output.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == [bad]


def test_distractors_are_distinct_and_never_a_query():
    from cnn3d.data import builtin_sentences

    queries = builtin_sentences()[:50]
    train = builtin_sentences()[40:200] + ["  " + queries[0].upper() + " "]  # overlaps and a disguised query
    pool = analyze.distractor_pool(queries, train, 2500)
    assert len(pool) == 2500 and len(set(pool)) == 2500
    keys = {analyze._sentence_key(q) for q in queries}
    assert not any(analyze._sentence_key(t) in keys for t in pool)
    assert pool[:150] == builtin_sentences()[50:200]  # the training split first: the nearest distractors
    assert analyze.distractor_pool(queries, train, 0) == []


def test_one_word_edits_are_near_neighbours_never_a_query():
    from cnn3d.data import builtin_sentences

    queries = builtin_sentences()[:30]
    vocabulary = [w for t in builtin_sentences()[30:300] for w in t.split()]
    edits = analyze.one_word_edits(queries, vocabulary, per_query=3)
    assert len(edits) == 90 and len(set(edits)) == 90
    assert edits == analyze.one_word_edits(queries, vocabulary, per_query=3)  # deterministic
    keys = {analyze._sentence_key(q) for q in queries}
    assert not any(analyze._sentence_key(e) in keys for e in edits)
    for query, group in zip(queries, [edits[i : i + 3] for i in range(0, 90, 3)]):
        for edit in group:  # same length, exactly one word changed, its case and punctuation kept
            changed = [(a, b) for a, b in zip(query.split(), edit.split()) if a != b]
            assert len(edit.split()) == len(query.split()) and len(changed) == 1, (query, edit)
            (old, new), = changed
            assert old[0].isupper() == new[0].isupper() and old.lstrip("".join(c for c in old if c.isalpha())) == \
                new.lstrip("".join(c for c in new if c.isalpha()))


class _TeacherCopy(torch.nn.Module):
    """A student whose output is its input: it decodes every sentence exactly (a known answer)."""

    def forward(self, x):
        return SimpleNamespace(embedding=x)


def test_decoding_against_edits_on_known_answers(warm_cache):
    from cnn3d.train import prepare_data

    config = with_overrides(preset("test"), {**TINY, "data.max_sentences": 120, "data.cache_dir": str(warm_cache)})
    data = prepare_data(config, torch.device("cpu"))
    result = analyze.decoding_against_edits(_TeacherCopy(), data, config, torch.device("cpu"), per_query=2)
    queries = len(set(data.val_texts))
    assert result["edits"] == 2 * queries and result["bank_size"] == 3 * queries
    assert result["student"] == 1.0  # the teacher's own vector is in the bank
    assert 0 <= result["mean"] <= 1 / queries + 1e-9  # one output for every sentence: at most one is right
    assert result["pca"] <= 1.0
