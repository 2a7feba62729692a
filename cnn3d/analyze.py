"""``cnn3d-analyze``: everything about one trained checkpoint, beside its nulls, on one self-contained page.

``analyze_checkpoint(folder) -> Analysis`` computes, for the trained cube and the untrained cube
(same seed, initial weights):

- the emergence metrics with both nulls, excess and bootstrap std (``cnn3d.analysis``);
- information flow: effective dimension and a ridge probe's validation cosine to the teacher
  embedding for every depth layer z, and for the back layer after every step; the light cone of a
  one-cell perturbation of the front face (``cnn3d.flow``);
- probing tasks: logistic probes for each label of the built-in probing set (and a user file) on
  the teacher embedding (the ceiling), the front face, every depth layer, the back face and the
  output, beside chance and a shuffled-label control (``cnn3d.probes``);
- similarity matrices of the teacher and the student over a fixed validation sample, and RSA per layer;
- decoding top-1 against bank size, beside the same decoding of the PCA-through-the-face reconstruction
  (the ceiling) and of the train mean (the floor); and against near neighbours: a bank of the validation
  sentences and one-word edits of each, where decoding does fail.

``render_page(analysis) -> str`` draws it with plotly.js embedded once (no network needed).
"""

from __future__ import annotations

import html
import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import flow
from . import metrics as M
from .analysis import EMERGENCE_NAMES
from .errors import UserError
from .probes import (
    ProbingSet,
    builtin_probing_set,
    chance_accuracy,
    encode_labels,
    probe_accuracy,
    read_probing_file,
)

logger = logging.getLogger(__name__)

RSM_SENTENCES = 40  # validation sentences in the similarity-matrix heatmaps
RIDGE_TRAIN = 400  # train sentences the ridge probes are fitted on
DEFAULT_DISTRACTORS = (1000,)
DEFAULT_EDITS = 5  # one-word edits per validation sentence in the near-neighbour decoding bank


@dataclass
class Analysis:
    """What the page shows; plain numbers and lists (JSON-able)."""

    checkpoint: str
    config: dict[str, Any]
    emergence: dict[str, float]
    layers: list[str]
    effective_dim: dict[str, dict[str, float]]  # cube (trained | untrained) -> layer -> value
    ridge_cosine: dict[str, dict[str, float]]
    rsa: dict[str, dict[str, float]]
    steps: dict[str, dict[str, list[float]]]  # cube -> {effective_dim, ridge_cosine} per step of the back layer
    light_cone: dict[str, dict[str, list[float]]]  # cube -> {step, changed, one_cell_per_step}
    probes: dict[str, dict[str, Any]]  # task -> {chance, teacher, shuffled_labels, trained: {layer: acc}, untrained}
    rsm: dict[str, Any]  # texts, teacher, student (lists of lists)
    decoding: dict[str, list[float]]  # bank_size, distractors, student, pca, mean
    probing_source: list[str] = field(default_factory=list)
    seconds: float = 0.0
    decoding_edits: dict[str, float] = field(default_factory=dict)  # bank_size, edits, student, pca, mean

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --------------------------------------------------------------------------- computing


def analyze_checkpoint(folder: str | Path, corpus: str | None = None, probing_file: str | Path | None = None,
                       distractors: tuple[int, ...] = DEFAULT_DISTRACTORS, probe_sentences: int = 600,
                       progress: bool = True, device: torch.device | None = None, edits: int = DEFAULT_EDITS) -> Analysis:
    """Analyse the checkpoint ``folder`` (a ``cnn3d-train --out`` folder); see the module docstring."""
    from .checkpoint import load_weights, read_checkpoint_meta
    from .config import flatten, with_overrides
    from .model import build_model
    from .train import EMERGENCE_SAMPLES, emergence_nulls, evaluate, prepare_data

    started = time.perf_counter()
    config, meta = read_checkpoint_meta(folder)  # UserError when the folder is not a checkpoint
    if "teachers" in meta:
        raise UserError(f"{folder} is a several-teacher checkpoint ({', '.join(meta['teachers'])}); cnn3d-analyze "
                        "reads single-teacher checkpoints only (decode each teacher with cnn3d-decode --teacher)")
    probing = read_probing_file(probing_file) if probing_file else None  # fail on a bad file before heavy work
    if corpus:
        config = with_overrides(config, {"data.corpus": corpus})
    device = device or torch.device("cpu")
    bar = tqdm(total=8, desc="analysing", disable=not progress)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    data = prepare_data(config, device)
    cubes = {"trained": build_model(config, data.teacher_dim), "untrained": build_model(config, data.teacher_dim)}
    load_weights(folder, cubes["trained"], device)
    for model in cubes.values():
        model.to(device).eval()
    stage("emergence")
    nulls = emergence_nulls(config, data, device, None)
    metrics = evaluate(cubes["trained"], data, config, device, None, nulls)["metrics"]
    emergence = {k: v for k, v in metrics.items() if k.split("_null")[0].split("_excess")[0] in EMERGENCE_NAMES}
    emergence.update({k: metrics[k] for k in ("val_cosine", "baseline_pca_cosine", "baseline_mean_cosine")
                      if k in metrics})

    batch = config.train.batch_size
    train_x, val_x = data.train[:RIDGE_TRAIN], data.val[:EMERGENCE_SAMPLES]
    stage("layers")
    reps = {name: (flow.layer_representations(m, train_x, batch, device), flow.layer_representations(m, val_x, batch, device))
            for name, m in cubes.items()}
    layers = list(reps["trained"][1])
    eff = {c: flow.effective_dim_by_layer(reps[c][1], layers) for c in cubes}
    ridge = {c: flow.ridge_by_layer(reps[c][0], reps[c][1], train_x, val_x, layers) for c in cubes}
    rsa = {c: flow.rsa_by_layer(reps[c][1], val_x, layers) for c in cubes}
    stage("steps")
    steps = {}
    for c, m in cubes.items():
        tr, va = flow.last_layer_by_step(m, train_x, batch, device), flow.last_layer_by_step(m, val_x, batch, device)
        steps[c] = {"effective_dim": [M.effective_dim(v) for v in va],
                    "ridge_cosine": [flow.ridge_by_layer({"x": a}, {"x": b}, train_x, val_x, ["x"])["x"]
                                     for a, b in zip(tr, va)]}
    stage("light cone")
    cone = {c: flow.light_cone(m, val_x[:1].to(device)) for c, m in cubes.items()}
    stage("probes")
    sets = [builtin_probing_set(probe_sentences)] + ([probing] if probing else [])
    probes = {}
    for pset in sets:
        probes.update(_probe_tasks(pset, cubes, config, device, batch, prefix="" if pset is sets[0] else "file: "))
    stage("similarity")
    sample = val_x[:RSM_SENTENCES]
    with torch.no_grad():
        student = cubes["trained"](sample.to(device)).embedding.float().cpu()
    rsm = {"texts": data.val_texts[:RSM_SENTENCES], "teacher": M.similarity_matrix(sample).tolist(),
           "student": M.similarity_matrix(student).tolist()}
    stage("decoding")
    decoding = decoding_by_bank_size(cubes["trained"], data, config, device, distractors, progress)
    near = decoding_against_edits(cubes["trained"], data, config, device, edits, progress) if edits > 0 else {}
    stage("done")
    bar.close()
    flat = {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(config).items()}
    return Analysis(str(folder), flat, emergence, layers, eff, ridge, rsa, steps, cone, probes, rsm, decoding,
                    [s.source for s in sets], time.perf_counter() - started, near)


def _probe_tasks(pset: ProbingSet, cubes: dict, config, device, batch: int, prefix: str) -> dict[str, dict]:
    """Accuracy per task and layer for every cube, beside chance, the teacher and a shuffled-label control."""
    from .cache import EmbeddingCache, embed_with_cache
    from .teacher import load_teacher

    teacher = load_teacher(config.teacher, device)
    vectors = embed_with_cache(teacher, pset.texts, EmbeddingCache.from_config(config.data)).float().cpu()
    reps = {c: flow.layer_representations(m, vectors, batch, device) for c, m in cubes.items()}
    out = {}
    for task, values in pset.labels.items():
        labels, names = encode_labels(values)
        if len(names) < 2:
            continue
        entry: dict[str, Any] = {
            "classes": names,
            "chance": chance_accuracy(labels[pset.train], labels[pset.test]),
            "teacher": probe_accuracy(vectors, labels, pset.train, pset.test),
            "shuffled_labels": probe_accuracy(vectors, labels, pset.train, pset.test, shuffle_seed=0),
        }
        for c in cubes:
            entry[c] = {layer: probe_accuracy(x, labels, pset.train, pset.test) for layer, x in reps[c].items()}
        out[prefix + task] = entry
    return out


def _sentence_key(text: str) -> str:
    """What makes two sentences the same for the bank: case and spacing do not count."""
    return " ".join(text.split()).casefold()


def distractor_pool(queries: list[str], train_texts: list[str], most: int, seed: int = 12345) -> list[str]:
    """Up to ``most`` distinct distractor sentences, none of them a query (nor equal to one but for case or spacing).

    Nearest first: the training split (same corpus as the queries), then the other built-in
    corpora (``builtin.txt``, ``heldout.txt``), then the synthetic generator for the rest.
    """
    from .data import builtin_sentences, heldout_sentences
    from .synthetic import generate_sentences

    taken = {_sentence_key(t) for t in queries}
    pool: list[str] = []

    def add(texts) -> None:
        for t in texts:
            key = _sentence_key(t)
            if len(pool) < most and key not in taken:
                taken.add(key)
                pool.append(t)

    add(train_texts)
    add(builtin_sentences() + heldout_sentences())
    if len(pool) < most:  # the generator's sentences are distinct; a few may repeat a corpus sentence
        add(t for t, _ in generate_sentences(int((most - len(pool)) * 1.02) + 16, seed=seed))
    return pool


_EDITABLE = re.compile(r"^([A-Za-z]{3,})([^A-Za-z]*)$")  # a word of 3+ letters, then any punctuation


def one_word_edits(queries: list[str], vocabulary: list[str], per_query: int, seed: int = 12345) -> list[str]:
    """Up to ``per_query`` near neighbours of each query: the query with one word (3+ letters) replaced by another
    word of ``vocabulary``, case and trailing punctuation kept. None equals a query or another edit (up to case
    and spacing). The hardest distractors a decoder meets: the teacher puts them next to their query.
    """
    rng = random.Random(seed)
    words = sorted({w.lower() for w in vocabulary if w.isalpha() and len(w) >= 3})
    taken = {_sentence_key(q) for q in queries}
    edits: list[str] = []
    for query in queries:
        tokens = query.split()
        slots = [i for i, t in enumerate(tokens) if _EDITABLE.match(t)]
        made, tries = 0, 0
        while slots and words and made < per_query and tries < 20 * per_query:
            tries += 1
            i = rng.choice(slots)
            word, tail = _EDITABLE.match(tokens[i]).groups()
            new = rng.choice(words)
            new = new.capitalize() if word[0].isupper() else new
            edited = " ".join(tokens[:i] + [new + tail] + tokens[i + 1 :])
            key = _sentence_key(edited)
            if key not in taken:
                taken.add(key)
                edits.append(edited)
                made += 1
    return edits


def _decode_top1(bank_texts: list[str], bank_vectors: torch.Tensor, outputs: dict[str, torch.Tensor],
                 queries: list[str]) -> dict[str, float]:
    from .decode import PhraseBank

    bank = PhraseBank(bank_texts, bank_vectors)
    return {name: bank.accuracy(pred, queries, k=1)[0] for name, pred in outputs.items()}


@torch.no_grad()
def decoding_against_edits(model, data, config, device, per_query: int = 5,
                           progress: bool = False) -> dict[str, float]:
    """Decode top-1 when the bank is the validation sentences plus ``per_query`` one-word edits of each.

    Beside the student: PCA through the face (the linear ceiling) and the train mean (the floor). Unlike
    distractors from other corpora, an edit differs from its query by one word, so this is where decoding fails.
    """
    from .cache import EmbeddingCache, embed_with_cache
    from .teacher import load_teacher

    outputs, queries, q_rows = _decoding_setup(model, data, config, device)
    val = data.val
    vocabulary = [w.strip(".,;:!?\"'()") for t in data.train_texts for w in t.split()]
    edits = one_word_edits(queries, vocabulary, per_query)
    vectors = embed_with_cache(load_teacher(config.teacher, device), edits, EmbeddingCache.from_config(config.data),
                               progress=progress).float().cpu() if edits else val.new_zeros(0, val.shape[1])
    top1 = _decode_top1(queries + edits, torch.cat([val[q_rows], vectors]), outputs, data.val_texts)
    return {"bank_size": float(len(queries) + len(edits)), "edits": float(len(edits)), **top1}


def _decoding_setup(model, data, config, device) -> tuple[dict[str, torch.Tensor], list[str], list[int]]:
    """What both decoding views compare, for the validation sentences ``[n, T]``: the student's output, PCA through
    ``lattice.face_numbers`` train-split components (the ceiling) and the train mean for every sentence (the
    floor); plus the distinct validation sentences (the queries) and the row of each."""
    val = data.val
    student = torch.cat([model(val[i : i + 256].to(device)).embedding.float().cpu() for i in range(0, len(val), 256)])
    mean = data.train.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd((data.train - mean).double(), full_matrices=False)
    basis = v[: min(config.lattice.face_numbers, v.shape[0])].float()
    pca = (val - mean) @ basis.T @ basis + mean
    first: dict[str, int] = {}
    for i, t in enumerate(data.val_texts):
        first.setdefault(t, i)
    return {"student": student, "pca": pca, "mean": mean.expand_as(val)}, list(first), list(first.values())


@torch.no_grad()
def decoding_by_bank_size(model, data, config, device, distractors: tuple[int, ...],
                          progress: bool = False) -> dict[str, list[float]]:
    """Decode top-1 of the student, of PCA-through-the-face (the ceiling) and of the train mean (the floor)
    against banks of growing size.

    Bank = the validation sentences (the queries) plus ``n`` distractors from ``distractor_pool``
    (never a query), for ``n`` in ``(0, *distractors)``. The PCA reconstruction keeps
    ``lattice.face_numbers`` components fitted on the train split: the linear ceiling of the face.
    Distractors are embedded by the teacher through the embedding cache (once per machine).
    """
    from .cache import EmbeddingCache, embed_with_cache
    from .teacher import load_teacher

    outputs, queries, q_rows = _decoding_setup(model, data, config, device)
    val = data.val
    most = max((0, *distractors))
    pool = distractor_pool(data.val_texts, data.train_texts, most)
    known = {t: i for i, t in enumerate(data.train_texts)}  # the training split is embedded already
    fresh = [t for t in pool if t not in known]
    embedded = (embed_with_cache(load_teacher(config.teacher, device), fresh, EmbeddingCache.from_config(config.data),
                                 progress=progress).float().cpu() if fresh else val.new_zeros(0, val.shape[1]))
    row = {t: i for i, t in enumerate(fresh)}
    vectors = torch.stack([data.train[known[t]] if t in known else embedded[row[t]] for t in pool]) if pool \
        else val.new_zeros(0, val.shape[1])
    out: dict[str, list[float]] = {"bank_size": [], "distractors": [], "student": [], "pca": [], "mean": []}
    for n in sorted({0, *distractors}):
        n = min(n, len(pool))
        top1 = _decode_top1(queries + pool[:n], torch.cat([val[q_rows], vectors[:n]]), outputs, data.val_texts)
        out["bank_size"].append(float(len(queries) + n))
        out["distractors"].append(float(n))
        for name, value in top1.items():
            out[name].append(value)
    return out


# --------------------------------------------------------------------------- the page


def render_page(analysis: Analysis) -> str:
    """One self-contained HTML page (plotly.js embedded once) with every view of ``analysis``."""
    from .analysis_page import render

    return render(analysis)


def write_page(analysis: Analysis, out: str | Path) -> Path:
    """Write the page atomically: a temporary file renamed into place, so a failure leaves nothing half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_page(analysis)
    fd, tmp = tempfile.mkstemp(prefix=".cnn3d-analyze-", suffix=".html", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a page is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def check_output_path(out: str | Path) -> Path:
    """``--out`` must be a file path whose folder can be written; a one-line ``UserError`` otherwise."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file such as {out / 'analysis.html'}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write into {parent}")
    return out


def escape(text: Any) -> str:
    return html.escape(str(text))
