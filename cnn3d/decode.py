"""Validation decoder: student output embeddings back to text by nearest neighbour.

The phrase bank is embedded once by the same teacher and then frozen: it is never
trained by the student's loss, so decoding accuracy measures the student alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """Load a checkpoint and its teacher, and decode ``texts`` against the validation + built-in + extra bank."""
    from .cache import EmbeddingCache, embed_with_cache
    from .checkpoint import load_weights, read_checkpoint_meta
    from .config import with_overrides
    from .data import builtin_sentences, load_corpus, read_phrase_file
    from .device import resolve_device
    from .model import build_model
    from .teacher import load_teacher

    config, meta = read_checkpoint_meta(checkpoint)
    if bank_file:
        config = with_overrides(config, {"data.decode_bank": bank_file})
    device = resolve_device(config.train.device)
    teacher = load_teacher(config.teacher, device)
    cache = EmbeddingCache.from_config(config.data)
    extra = read_phrase_file(config.data.decode_bank)
    bank_texts = list(dict.fromkeys(load_corpus(config.data).validation + builtin_sentences() + extra + texts))
    bank = build_bank(bank_texts, embed_with_cache(teacher, bank_texts, cache))
    model = build_model(config, int(meta["teacher_dim"])).to(device).eval()
    load_weights(checkpoint, model, device)
    targets = embed_with_cache(teacher, texts, cache).to(device)
    with torch.no_grad():
        outputs = model(targets).embedding.float().cpu()
    scores, idx = bank.search(outputs, k=top)
    fidelity = F.cosine_similarity(outputs, targets.cpu(), dim=-1)
    return [
        Decoding(text, [(bank.texts[i], s) for i, s in zip(row_idx.tolist(), row_scores.tolist())], fid.item())
        for text, row_idx, row_scores, fid in zip(texts, idx, scores, fidelity)
    ]
