"""Validation decoder: student output embeddings back to text by nearest neighbour.

The phrase bank is embedded once by the same teacher and then frozen: it is never
trained by the student's loss, so decoding accuracy measures the student alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import DataConfig
    from .data import Corpus


@dataclass
class DecodedExample:
    """One ``input -> decoded`` pair with the cosine of the output to the decoded phrase."""

    input: str
    decoded: str
    score: float
    correct: bool

    def as_dict(self) -> dict:
        return {"input": self.input, "decoded": self.decoded, "score": round(self.score, 4), "correct": self.correct}


class PhraseBank:
    """Texts and their unit-normalised teacher embeddings ``[P, T]``; cosine nearest-neighbour search."""

    def __init__(self, texts: list[str], embeddings: torch.Tensor):
        if len(texts) != embeddings.shape[0]:
            raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
        self.texts = list(texts)
        self.index = {text: i for i, text in enumerate(self.texts)}
        self.vectors = F.normalize(embeddings.float(), dim=-1)

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [N, T]`` -> (scores ``[N, k]``, bank indices ``[N, k]``), best first."""
        sims = F.normalize(queries.float(), dim=-1) @ self.vectors.T
        return sims.topk(min(k, len(self)), dim=1)

    def decode(self, queries: torch.Tensor) -> list[tuple[str, float]]:
        scores, idx = self.search(queries, k=1)
        return [(self.texts[i], s) for i, s in zip(idx[:, 0].tolist(), scores[:, 0].tolist())]

    def accuracy(self, outputs: torch.Tensor, texts: list[str], k: int = 5) -> tuple[float, float]:
        """(top-1, top-k) share of outputs whose own sentence is among the k nearest bank phrases."""
        _, idx = self.search(outputs, k)
        own = torch.tensor([self.index.get(t, -1) for t in texts]).unsqueeze(1)
        hits = idx == own
        return hits[:, 0].float().mean().item(), hits.any(dim=1).float().mean().item()

    def examples(self, outputs: torch.Tensor, texts: list[str], n: int = 5) -> list[DecodedExample]:
        """The first ``n`` decodings, for logs and reports."""
        decoded = self.decode(outputs[:n])
        return [DecodedExample(t, d, s, d == t) for t, (d, s) in zip(texts[:n], decoded)]


def bank_texts(corpus: Corpus, data: DataConfig, extra: Sequence[str] = ()) -> list[str]:
    """The decoder's phrase bank, the one rule for the trainer and ``cnn3d-decode`` (distinct, first kept).

    The validation split, then every built-in sentence when ``data.corpus`` is ``builtin`` (already embedded
    for training, so free), then the lines of ``data.decode_bank``, then ``extra`` (the texts being decoded).
    A user corpus therefore embeds only its own sentences and ``data.decode_bank``, never the built-in corpus.
    """
    from .data import builtin_sentences, read_phrase_file

    builtin = builtin_sentences() if data.corpus.strip() == "builtin" else []
    return list(dict.fromkeys([*corpus.validation, *builtin, *read_phrase_file(data.decode_bank), *extra]))


def build_bank(texts: list[str], embeddings: torch.Tensor) -> PhraseBank:
    """A bank of distinct texts (first occurrence kept)."""
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        seen.setdefault(t, i)
    rows = list(seen.values())
    return PhraseBank(list(seen), embeddings[rows])


@dataclass
class Decoding:
    """What a trained student's output for ``text`` decodes to."""

    text: str
    candidates: list[tuple[str, float]]  # (bank phrase, cosine), best first
    fidelity: float  # cosine of the student output to the teacher's own embedding of ``text``


def decode_with_checkpoint(checkpoint: str, texts: list[str], bank_file: str | None = None, top: int = 3) -> list[Decoding]:
    """Load a checkpoint and its teacher, and decode ``texts`` against the bank of ``bank_texts`` (plus ``texts``).

    The checkpoint is verified and its weights loaded before the teacher is, so a damaged folder fails fast.
    """
    from .cache import EmbeddingCache, embed_with_cache
    from .checkpoint import CheckpointError, load_weights, open_checkpoint
    from .config import with_overrides
    from .data import load_corpus
    from .device import resolve_device
    from .model import build_model
    from .teacher import load_teacher

    ckpt = open_checkpoint(checkpoint)
    config = ckpt.config
    if bank_file:
        config = with_overrides(config, {"data.decode_bank": bank_file})
    device = resolve_device(config.train.device)
    try:
        model = build_model(config, ckpt.teacher_dim, seed=config.train.seed).to(device).eval()
    except ValueError as exc:  # config.json and meta.json disagree on the teacher dimension
        raise CheckpointError(f"checkpoint {ckpt.folder}: {exc}") from None
    load_weights(ckpt, model, device)
    bank_phrases = bank_texts(load_corpus(config.data), config.data, texts)
    teacher = load_teacher(config.teacher, device)
    if teacher.dim != ckpt.teacher_dim:
        raise CheckpointError(f"checkpoint {ckpt.folder} expects {ckpt.teacher_dim}-D teacher embeddings, "
                              f"but {config.teacher.model} gives {teacher.dim}-D")
    cache = EmbeddingCache.from_config(config.data)
    bank = build_bank(bank_phrases, embed_with_cache(teacher, bank_phrases, cache))
    targets = embed_with_cache(teacher, texts, cache).to(device)
    with torch.no_grad():
        outputs = model(targets).embedding.float().cpu()
    scores, idx = bank.search(outputs, k=top)
    fidelity = F.cosine_similarity(outputs, targets.cpu(), dim=-1)
    return [
        Decoding(text, [(bank.texts[i], s) for i, s in zip(row_idx.tolist(), row_scores.tolist())], fid.item())
        for text, row_idx, row_scores, fid in zip(texts, idx, scores, fidelity)
    ]
