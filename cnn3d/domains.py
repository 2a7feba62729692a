"""Built-in domains for continual learning: style-coherent slices of the shipped corpora.

``builtin:NAME`` (as ``data.corpus`` or an entry of ``data.domains``) reads one of
them. Each domain is a list of sections of ``cnn3d/corpus/builtin.txt`` and
``heldout.txt``; a section runs from its first to its last sentence (both quoted
here, so an edit of the corpus files that moves a section fails loudly instead of
silently changing a domain):

* ``news``: held-out news reports, and the built-in sentences about law, courts and politics;
* ``science``: built-in science explanations, and held-out encyclopedic sentences;
* ``dialogue``: built-in quoted speech, and held-out conversational turns.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from .errors import UserError

__all__ = ["BUILTIN_DOMAINS", "builtin_domain_sentences", "domain_label"]

# name -> sections (file, first sentence, last sentence), inclusive
BUILTIN_DOMAINS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "news": (
        ("heldout.txt", "The regional council approved a plan on Tuesday to expand the northern bus depot by 2027.",
         "Local businesses reported strong trade during the town's annual food festival."),
        ("builtin.txt", "Everyone accused of a crime has the right to a fair trial.",
         "Official documents have to be translated by a certified translator."),
    ),
    "science": (
        ("builtin.txt", "Water boils at a lower temperature on a mountain because the air pressure is lower.",
         "The old textbook claimed the atom was indivisible, which we now know is false."),
        ("heldout.txt", "The common kingfisher is a small bird found along rivers and lakes across much of Europe and Asia.",
         "The desert receives less than fifty millimetres of rain in an average year."),
    ),
    "dialogue": (
        ("builtin.txt", "\"I'll be there in ten minutes,\" she said, grabbing her coat.",
         "\"I suppose you want to know why I called you all here,\" the host began."),
        ("heldout.txt", "Honestly, I think we should just order takeaway and call it a night.",
         "Go on, have another slice, there's loads left."),
    ),
}


@cache
def _lines(name: str) -> tuple[str, ...]:
    text = resources.files("cnn3d").joinpath("corpus").joinpath(name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _section(file: str, first: str, last: str) -> list[str]:
    lines = _lines(file)
    try:
        start, end = lines.index(first), lines.index(last)
    except ValueError:
        raise RuntimeError(f"cnn3d/corpus/{file} no longer holds a built-in domain's anchor sentence; "
                           "update cnn3d/domains.py") from None
    return list(lines[start : end + 1])


def builtin_domain_sentences(name: str) -> list[str]:
    """Sentences of built-in domain ``name`` (news, science or dialogue), in file order."""
    if name not in BUILTIN_DOMAINS:
        raise UserError(f"unknown built-in domain {name!r}; use builtin:{', builtin:'.join(BUILTIN_DOMAINS)}")
    return [s for section in BUILTIN_DOMAINS[name] for s in _section(*section)]


def domain_label(spec: str) -> str:
    """Short column name of a domain spec: ``builtin:news`` -> news, ``data/chat.txt`` -> chat."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return spec[len("builtin:"):]
    if spec.startswith("hf:"):
        return spec[3:].replace("/", "_").replace(":", "_")
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name
