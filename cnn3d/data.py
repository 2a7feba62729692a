"""Corpora: the built-in and held-out sentence files, synthetic text and user files.

``load_corpus(data_cfg)`` reads ``data.corpus`` (``"builtin"``, ``"synthetic"``, a
``.txt``/``.jsonl``/``.csv`` file, a folder of those, or ``hf:NAME[:SPLIT]``), cleans the
text, and splits it into train and validation **by hash** of each sentence.

Cleaning, in order: collapse whitespace and strip; drop empty lines; drop repeats
(the first occurrence keeps its place); keep sentences of ``data.min_words`` to
``data.max_words`` words; keep the first ``data.max_sentences`` (0 = all).

Split: ``u = blake2b(text, digest_size=8) / 2**64`` in [0, 1); a sentence is in
validation when ``u < data.validation_fraction``. A sentence therefore never changes
sides when the corpus grows. Tiny corpora may leave one side empty; then the one
sentence whose ``u`` lies closest to the threshold crosses over (the smallest ``u`` of
train moves to validation, or the largest ``u`` of validation moves to train), so both
sides hold at least one sentence. Split order follows corpus order.

Difficulty (for curricula), each in [0, 1]:

* synthetic sentences keep the generator's score (``cnn3d.synthetic.sentence_difficulty``);
* other text gets ``0.5 * length_percentile + 0.5 * rarity_percentile`` where a
  sentence's rarity is the mean over its words of ``log((T + V + 1) / (count(word) + 1))``
  (``count`` and the token total ``T``/vocabulary size ``V`` come from the train split),
  and a percentile is the mid-rank of the value among the train split's values. It needs
  no teacher and is deterministic.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import DataConfig
from .errors import UserError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Corpus",
    "builtin_sentences",
    "clean_sentences",
    "curriculum_fraction",
    "curriculum_indices",
    "curriculum_subset",
    "hash_unit",
    "heldout_sentences",
    "load_corpus",
    "read_phrase_file",
    "read_corpus_texts",
    "split_by_hash",
    "text_difficulties",
]

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".csv")
CORPUS_HELP = "use 'builtin', builtin:news|science|dialogue, 'synthetic', a .txt/.jsonl/.csv file or a folder of them, or hf:DATASET[:SPLIT]"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


# --------------------------------------------------------------------------- the corpus


@dataclass
class Corpus:
    """Cleaned sentences split into train and validation, with a difficulty per sentence."""

    train: list[str]
    validation: list[str]
    source: str
    difficulties: dict[str, float] = field(default_factory=dict)

    @property
    def sentences(self) -> list[str]:
        """Train then validation sentences."""
        return self.train + self.validation

    def __len__(self) -> int:
        return len(self.train) + len(self.validation)

    def difficulty(self, texts: Sequence[str]) -> list[float]:
        """Difficulty in [0, 1] of each text: the stored score, else the text-only score against train."""
        missing = [t for t in texts if t not in self.difficulties]
        extra = dict(zip(missing, text_difficulties(missing, reference=self.train))) if missing else {}
        return [self.difficulties[t] if t in self.difficulties else extra[t] for t in texts]


# --------------------------------------------------------------------------- package files


def _package_lines(name: str) -> list[str]:
    text = resources.files("cnn3d").joinpath("corpus").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def builtin_sentences() -> list[str]:
    """The built-in training corpus shipped with the package (one sentence per line)."""
    return _package_lines("builtin.txt")


def heldout_sentences() -> list[str]:
    """Held-out sentences, never in the built-in corpus, for measuring generalisation."""
    return _package_lines("heldout.txt")


# --------------------------------------------------------------------------- reading


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_text(path: Path) -> str:
    """UTF-8 text of ``path``; empty or binary files raise ``UserError``."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"corpus file {path} is empty; it needs one sentence per line (or records with text)")
    if b"\x00" in data:
        raise UserError(f"corpus file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"corpus file {path} is not UTF-8 text (undecodable byte at offset {exc.start}); convert it to UTF-8"
        ) from None


def _missing_column(path: Path | str, column: str, columns: Iterable[str]) -> UserError:
    found = ", ".join(repr(c) for c in columns) or "none"
    return UserError(
        f"corpus {path} has no column {column!r} (columns: {found}); set data.text_column to one of them"
    )


def _read_jsonl(path: Path, column: str) -> list[str]:
    out = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"corpus file {path} line {number} is not valid JSON ({exc.msg}); "
                            "a .jsonl file needs one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"corpus file {path} line {number} is a JSON {type(record).__name__}, "
                            f"not an object with a {column!r} field")
        if column not in record:
            raise _missing_column(f"{path} line {number}", column, record)
        if record[column] is not None:
            out.append(str(record[column]))
    return out


def _read_csv(path: Path, column: str) -> list[str]:
    try:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        if column not in (reader.fieldnames or []):
            raise _missing_column(path, column, reader.fieldnames or [])
        return [row[column] for row in reader if row.get(column)]
    except csv.Error as exc:
        raise UserError(f"corpus file {path} is not valid CSV ({_first_line(exc)})") from None


def _read_file(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_text(path).splitlines()
    if suffix == ".jsonl":
        return _read_jsonl(path, column)
    if suffix == ".csv":
        return _read_csv(path, column)
    raise UserError(f"corpus file {path} has unsupported extension {path.suffix or '(none)'!r}; "
                    f"use one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _read_folder(folder: Path, column: str) -> list[str]:
    """Texts of every supported file under ``folder`` (recursive, sorted by relative path)."""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    out: list[str] = []
    used = 0
    for path in files:
        if not path.read_bytes().strip():
            logger.warning("skipping empty corpus file %s", path)
            continue
        out.extend(_read_file(path, column))
        used += 1
    if not used:
        raise UserError(f"corpus folder {folder} has no usable files; it needs non-empty "
                        f"{'/'.join(SUPPORTED_EXTENSIONS)} files (searched recursively)")
    logger.info("read %d files from corpus folder %s", used, folder)
    return out


def _read_hf(spec: str, column: str) -> list[str]:
    name, _, split = spec.partition(":")
    split = split or "train"
    if not name:
        raise UserError(f"data.corpus={'hf:' + spec!r} names no dataset; write hf:NAME or hf:NAME:SPLIT")
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.corpus=hf:{spec} needs the 'datasets' package, which is not installed; "
                        "pip install 'cnn3d[datasets]' or give a local file") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split: one line for the user
        raise UserError(f"could not load Hugging Face dataset {name!r} split {split!r} ({_first_line(exc)}); "
                        "check the name and split, and that it is cached or the network is reachable") from None
    if column not in ds.column_names:
        raise _missing_column(f"hf:{name}:{split}", column, ds.column_names)
    return [str(t) for t in ds[column] if t is not None]


def read_corpus_texts(corpus: str, text_column: str = "text") -> tuple[list[str], str]:
    """Raw texts and a description for a file, folder or ``hf:`` spec (not builtin/synthetic).

    Raises ``UserError`` for a missing path, empty or binary file, missing column,
    unsupported extension or a folder with no usable files.
    """
    if corpus.startswith("hf:"):
        return _read_hf(corpus[3:], text_column), f"Hugging Face dataset {corpus[3:]}"
    path = Path(corpus).expanduser()
    if not path.exists():
        raise UserError(f"corpus path {path} does not exist; {CORPUS_HELP}")
    if path.is_dir():
        return _read_folder(path, text_column), f"folder {path}"
    return _read_file(path, text_column), f"file {path}"


# --------------------------------------------------------------------------- cleaning & split


def clean_sentences(
    texts: Iterable[str], min_words: int = 1, max_words: int = 10_000, max_sentences: int = 0
) -> list[str]:
    """Normalise whitespace, drop empties and repeats (first kept), filter by word count, cap at ``max_sentences``."""
    seen: set[str] = set()
    out: list[str] = []
    for raw in texts:
        text = " ".join(raw.split())
        if not text or text in seen:
            continue
        seen.add(text)
        if min_words <= len(text.split()) <= max_words:
            out.append(text)
            if max_sentences and len(out) >= max_sentences:
                break
    return out


def hash_unit(text: str) -> float:
    """A stable number in [0, 1) from the blake2b hash of ``text``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_by_hash(sentences: Sequence[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """``(train, validation)``: validation holds sentences with ``hash_unit < validation_fraction``.

    With two or more sentences both sides are non-empty: if one is empty, the sentence
    whose hash lies closest to the threshold crosses over (see the module docstring).
    """
    units = {s: hash_unit(s) for s in sentences}
    val = {s for s in sentences if units[s] < validation_fraction}
    if len(sentences) >= 2 and not val:
        val = {min(sentences, key=lambda s: (units[s], s))}
    elif len(sentences) >= 2 and len(val) == len(sentences):
        val.discard(max(sentences, key=lambda s: (units[s], s)))
    return [s for s in sentences if s not in val], [s for s in sentences if s in val]


# --------------------------------------------------------------------------- difficulty


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _percentile(sorted_ref: Sequence[float], value: float) -> float:
    """Mid-rank of ``value`` among ``sorted_ref`` as a number in [0, 1]."""
    lo, hi = bisect.bisect_left(sorted_ref, value), bisect.bisect_right(sorted_ref, value)
    return (lo + hi) / (2 * len(sorted_ref))


def text_difficulties(texts: Sequence[str], reference: Sequence[str] | None = None) -> list[float]:
    """Text-only difficulty in [0, 1]: ``0.5 * length percentile + 0.5 * word-rarity percentile``.

    Word counts and both percentile scales come from ``reference`` (default: ``texts``);
    a word unseen in the reference counts as rarest. See the module docstring.
    """
    texts = list(texts)
    ref = list(reference) if reference else texts
    if not texts:
        return []
    counts = Counter(tok for s in ref for tok in _tokens(s))
    scale = sum(counts.values()) + len(counts) + 1

    def rarity(s: str) -> float:
        toks = _tokens(s)
        return sum(math.log(scale / (counts[t] + 1)) for t in toks) / len(toks) if toks else 0.0

    ref_len = sorted(len(s.split()) for s in ref)
    ref_rare = sorted(rarity(s) for s in ref)
    return [
        round(0.5 * _percentile(ref_len, len(s.split())) + 0.5 * _percentile(ref_rare, rarity(s)), 6) for s in texts
    ]


# --------------------------------------------------------------------------- loading


def _synthetic(data_cfg: DataConfig, seed: int) -> tuple[list[str], dict[str, float], str]:
    from .synthetic import generate_sentences

    pairs = generate_sentences(data_cfg.synthetic_sentences, seed=seed)
    return [t for t, _ in pairs], dict(pairs), f"synthetic ({data_cfg.synthetic_sentences} sentences, seed {seed})"


def load_corpus(data_cfg: DataConfig, *, min_sentences: int = 1, seed: int = 0) -> Corpus:
    """Read, clean and split ``data_cfg.corpus`` into a ``Corpus`` with per-sentence difficulty.

    ``min_sentences`` (the trainer passes its batch size) is the fewest cleaned sentences
    accepted; at least 2 are always needed so that train and validation are non-empty.
    ``seed`` only affects ``corpus="synthetic"``. Bad input raises a one-line ``UserError``.
    """
    spec = data_cfg.corpus.strip()
    known: dict[str, float] = {}
    if spec == "builtin":
        texts, source = builtin_sentences(), "built-in corpus"
    elif spec.startswith("builtin:"):
        from .domains import builtin_domain_sentences

        texts, source = builtin_domain_sentences(spec[len("builtin:"):]), f"built-in domain {spec}"
    elif spec == "synthetic":
        texts, known, source = _synthetic(data_cfg, seed)
    else:
        texts, source = read_corpus_texts(spec, data_cfg.text_column)
    raw_count = len(texts)
    sentences = clean_sentences(texts, data_cfg.min_words, data_cfg.max_words, data_cfg.max_sentences)
    needed = max(min_sentences, 2)
    if len(sentences) < needed:
        raise UserError(
            f"corpus {source} has {len(sentences)} usable sentences after cleaning (of {raw_count} lines), "
            f"but {needed} are needed; add text or widen data.min_words={data_cfg.min_words}/"
            f"data.max_words={data_cfg.max_words}" + (" or lower train.batch_size" if min_sentences > 2 else "")
        )
    train, validation = split_by_hash(sentences, data_cfg.validation_fraction)
    if known:
        difficulties = {s: known[s] for s in sentences}
    else:
        difficulties = dict(zip(sentences, text_difficulties(sentences, reference=train)))
    logger.info("corpus %s: %d train, %d validation sentences", source, len(train), len(validation))
    return Corpus(train=train, validation=validation, source=source, difficulties=difficulties)


# --------------------------------------------------------------------------- curriculum


def read_phrase_file(path: str) -> list[str]:
    """Non-empty stripped lines of a text file (extra phrases for the decoder's bank); ``""`` gives none."""
    if not path:
        return []
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.decode_bank={path} does not exist; give a text file with one phrase per line")
    return [line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def curriculum_indices(difficulties: Sequence[float], fraction: float, minimum: int = 1) -> list[int]:
    """Positions of the easiest ``fraction`` of items (at least ``minimum``, at most all), in ascending order.

    The one curriculum rule (the trainer passes ``minimum=train.batch_size``): keep
    ``k = clamp(ceil(fraction * n), minimum, n)`` items, easiest first, ties broken by position.
    """
    n = len(difficulties)
    if not n:
        return []
    # 1e-9: 0.3 * 10 is 3.0000000000000004 in floating point and must keep 3, not 4
    k = min(n, max(minimum, 1, math.ceil(min(max(fraction, 0.0), 1.0) * n - 1e-9)))
    return sorted(sorted(range(n), key=lambda i: (difficulties[i], i))[:k])


def curriculum_subset(texts: Sequence[str], difficulties: Sequence[float], fraction: float, minimum: int = 1) -> list[str]:
    """The texts at ``curriculum_indices(difficulties, fraction, minimum)``, in their original order."""
    if len(texts) != len(difficulties):
        raise ValueError(f"got {len(texts)} texts but {len(difficulties)} difficulties")
    return [texts[i] for i in curriculum_indices(difficulties, fraction, minimum)]


def curriculum_fraction(epoch: int, epochs: int, start: float, end: float) -> float:
    """Linear schedule: ``start`` at epoch 0, ``end`` at epoch ``epochs-1`` (``epochs <= 1`` gives ``end``)."""
    if epochs <= 1:
        return end
    t = min(max(epoch / (epochs - 1), 0.0), 1.0)
    return start + (end - start) * t
