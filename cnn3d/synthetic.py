"""Grammatical synthetic sentences with a known difficulty, for warm-up and curricula.

Sentences are built from a small lexicon and a phrase grammar: a subject noun
phrase (determiner, optional adjective, optional prepositional phrase, optional
relative clause), a verb that agrees with the subject in number and tense, an
object noun phrase, optional adverbs and place/time modifiers, and optional
subordinate (``because``, ``although``, ``when`` ...) or coordinated (``and``,
``but``) clauses. Some sentences are turned into yes/no questions.

Every sentence carries a difficulty in [0, 1] (see ``sentence_difficulty``)::

    clause_term = (clauses - 1) / (MAX_CLAUSES - 1)
    length_term = clip((words - 4) / (MAX_WORDS - 4), 0, 1)
    rare_term   = rare content words / content words
    difficulty  = 0.45 * clause_term + 0.35 * length_term + 0.20 * rare_term

Generation is deterministic by seed (one ``random.Random(seed)``, no global
state) and deduplicated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import UserError

__all__ = [
    "MAX_CLAUSES",
    "MAX_WORDS",
    "PROBE_LABELS",
    "SyntheticSentence",
    "generate_examples",
    "generate_sentences",
    "probe_labels",
    "sentence_difficulty",
]

MAX_CLAUSES = 4
MAX_WORDS = 40
CLAUSE_WEIGHT, LENGTH_WEIGHT, RARE_WEIGHT = 0.45, 0.35, 0.20

# --------------------------------------------------------------------------- lexicon
# Nouns are (singular, plural); verbs are (base, third person singular, past).

PEOPLE = [
    ("teacher", "teachers"), ("baker", "bakers"), ("farmer", "farmers"), ("doctor", "doctors"),
    ("child", "children"), ("student", "students"), ("neighbour", "neighbours"), ("pilot", "pilots"),
    ("nurse", "nurses"), ("painter", "painters"), ("driver", "drivers"), ("writer", "writers"),
    ("gardener", "gardeners"), ("fisherman", "fishermen"), ("engineer", "engineers"), ("singer", "singers"),
    ("woman", "women"), ("man", "men"), ("girl", "girls"), ("boy", "boys"), ("librarian", "librarians"),
    ("carpenter", "carpenters"), ("musician", "musicians"), ("scientist", "scientists"),
]
RARE_PEOPLE = [
    ("cartographer", "cartographers"), ("apothecary", "apothecaries"), ("lexicographer", "lexicographers"),
    ("ornithologist", "ornithologists"), ("luthier", "luthiers"), ("stevedore", "stevedores"),
    ("haberdasher", "haberdashers"), ("archivist", "archivists"), ("numismatist", "numismatists"),
    ("cooper", "coopers"),
]
ANIMALS = [
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("fox", "foxes"), ("rabbit", "rabbits"),
    ("goat", "goats"), ("crow", "crows"), ("mouse", "mice"), ("bear", "bears"), ("duck", "ducks"),
]
RARE_ANIMALS = [("pangolin", "pangolins"), ("ibis", "ibises"), ("marmoset", "marmosets"), ("axolotl", "axolotls")]
THINGS = [
    ("book", "books"), ("box", "boxes"), ("letter", "letters"), ("bicycle", "bicycles"), ("lamp", "lamps"),
    ("basket", "baskets"), ("map", "maps"), ("chair", "chairs"), ("window", "windows"), ("radio", "radios"),
    ("kettle", "kettles"), ("ladder", "ladders"), ("blanket", "blankets"), ("key", "keys"), ("photo", "photos"),
    ("bottle", "bottles"), ("clock", "clocks"), ("rope", "ropes"), ("coat", "coats"), ("bag", "bags"),
    ("boat", "boats"), ("candle", "candles"), ("drum", "drums"), ("fence", "fences"),
]
RARE_THINGS = [
    ("astrolabe", "astrolabes"), ("reliquary", "reliquaries"), ("palimpsest", "palimpsests"),
    ("sextant", "sextants"), ("theodolite", "theodolites"), ("harpsichord", "harpsichords"),
    ("chronometer", "chronometers"), ("escritoire", "escritoires"), ("samovar", "samovars"),
    ("tapestry", "tapestries"),
]
PLACES = [
    "kitchen", "garden", "station", "library", "market", "harbour", "village", "forest", "river",
    "bridge", "school", "hospital", "barn", "square", "museum", "hill", "beach", "office",
]
RARE_PLACES = ["scriptorium", "apiary", "belvedere", "cloister", "ossuary", "orangery", "atelier"]

TRANSITIVE = [
    ("carry", "carries", "carried"), ("find", "finds", "found"), ("paint", "paints", "painted"),
    ("repair", "repairs", "repaired"), ("open", "opens", "opened"), ("clean", "cleans", "cleaned"),
    ("sell", "sells", "sold"), ("buy", "buys", "bought"), ("hide", "hides", "hid"), ("move", "moves", "moved"),
    ("borrow", "borrows", "borrowed"), ("watch", "watches", "watched"), ("drop", "drops", "dropped"),
    ("keep", "keeps", "kept"), ("lose", "loses", "lost"), ("wrap", "wraps", "wrapped"),
    ("build", "builds", "built"), ("bring", "brings", "brought"), ("check", "checks", "checked"),
    ("describe", "describes", "described"),
]
RARE_TRANSITIVE = [
    ("scrutinize", "scrutinizes", "scrutinized"), ("refurbish", "refurbishes", "refurbished"),
    ("catalogue", "catalogues", "catalogued"), ("burnish", "burnishes", "burnished"),
    ("appraise", "appraises", "appraised"), ("annotate", "annotates", "annotated"),
    ("requisition", "requisitions", "requisitioned"), ("expropriate", "expropriates", "expropriated"),
]
INTRANSITIVE = [
    ("sleep", "sleeps", "slept"), ("laugh", "laughs", "laughed"), ("wait", "waits", "waited"),
    ("arrive", "arrives", "arrived"), ("leave", "leaves", "left"), ("sing", "sings", "sang"),
    ("rest", "rests", "rested"), ("listen", "listens", "listened"), ("work", "works", "worked"),
    ("run", "runs", "ran"), ("smile", "smiles", "smiled"), ("hesitate", "hesitates", "hesitated"),
]
RARE_INTRANSITIVE = [
    ("convalesce", "convalesces", "convalesced"), ("dawdle", "dawdles", "dawdled"),
    ("genuflect", "genuflects", "genuflected"), ("meander", "meanders", "meandered"),
    ("remonstrate", "remonstrates", "remonstrated"), ("expostulate", "expostulates", "expostulated"),
]
BELONG = ("belong", "belongs", "belonged")
PARTICIPLES = {"hide": "hidden"}
ANIMATE_ADJ = ["tired", "careful", "cheerful", "nervous", "patient", "young", "clever", "quiet", "busy", "kind"]
RARE_ANIMATE_ADJ = ["fastidious", "taciturn", "perspicacious", "garrulous", "lugubrious", "obstreperous", "intrepid"]
THING_ADJ = ["heavy", "broken", "shiny", "wooden", "empty", "old", "small", "red", "new", "strange", "dusty", "green"]
RARE_THING_ADJ = ["diaphanous", "ornate", "threadbare", "antediluvian", "ramshackle", "iridescent", "gossamer"]
ADVERBS = ["quickly", "slowly", "carefully", "quietly", "happily", "gently", "suddenly", "eagerly", "calmly"]
RARE_ADVERBS = ["surreptitiously", "perfunctorily", "assiduously", "inexorably", "lackadaisically"]
PREPOSITIONS = ["in", "near", "behind", "beside", "outside", "across"]
TIMES = ["yesterday", "every morning", "last winter", "on Sunday", "after lunch", "before dawn", "at noon", "this week"]
SUBORDINATORS = ["because", "although", "when", "while", "after", "before", "since", "as soon as"]
COORDINATORS = ["and", "but", "so"]

# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class SyntheticSentence:
    """One generated sentence with the quantities its difficulty is computed from."""

    text: str
    difficulty: float
    clauses: int
    words: int
    rare_share: float
    # exact labels decided by the generator (probing tasks): main clause's tense and subject
    tense: str = "present"  # present | past
    plural_subject: bool = False
    human_subject: bool = True  # a person (teacher, baker ...) rather than an animal (dog, fox ...)


def sentence_difficulty(clauses: int, words: int, rare_share: float) -> float:
    """Difficulty in [0, 1]: ``0.45*clause_term + 0.35*length_term + 0.20*rare_term``.

    ``clause_term = (clauses-1)/(MAX_CLAUSES-1)``, ``length_term = (words-4)/(MAX_WORDS-4)``
    and ``rare_term = rare_share``, each clipped to [0, 1].
    """
    clause_term = min(max((clauses - 1) / (MAX_CLAUSES - 1), 0.0), 1.0)
    length_term = min(max((words - 4) / (MAX_WORDS - 4), 0.0), 1.0)
    rare_term = min(max(rare_share, 0.0), 1.0)
    return round(CLAUSE_WEIGHT * clause_term + LENGTH_WEIGHT * length_term + RARE_WEIGHT * rare_term, 6)


class _Builder:
    """Builds one sentence at a time, counting content words, rare words and clauses."""

    def __init__(self, rng: random.Random, rare_rate: float) -> None:
        self.rng = rng
        self.rare_rate = rare_rate
        self.content = 0
        self.rare = 0
        self.clauses = 1
        self.tense = "past"
        self.relative_rate = 0.0
        self.subject_plural: bool | None = None  # of the main clause: the first animate noun phrase built
        self.subject_human: bool | None = None

    def pick(self, common: list, rare: list):
        """A lexicon entry; rare with probability ``rare_rate`` (counted as one content word)."""
        self.content += 1
        if self.rng.random() < self.rare_rate:
            self.rare += 1
            return self.rng.choice(rare)
        return self.rng.choice(common)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    # -- phrases

    def place(self) -> str:
        return f"{self.rng.choice(PREPOSITIONS)} the {self.pick(PLACES, RARE_PLACES)}"

    def noun_phrase(self, animate: bool, allow_clause: bool) -> tuple[str, bool]:
        """``(text, plural)`` for a noun phrase, maybe with an adjective, a place and a relative clause."""
        if animate:
            human = self.chance(0.7)
            pool, rare_pool = (PEOPLE, RARE_PEOPLE) if human else (ANIMALS, RARE_ANIMALS)
            adjs, rare_adjs = ANIMATE_ADJ, RARE_ANIMATE_ADJ
        else:
            pool, rare_pool, adjs, rare_adjs = THINGS, RARE_THINGS, THING_ADJ, RARE_THING_ADJ
        plural = self.chance(0.3)
        if animate and self.subject_human is None:  # no draw added: generation stays identical by seed
            self.subject_human, self.subject_plural = human, plural
        noun = self.pick(pool, rare_pool)[1 if plural else 0]
        words = [self.rng.choice(("the", "some", "those")) if plural else self.rng.choice(("the", "the", "a", "this"))]
        if words[0] == "a" and noun[0] in "aeiou":
            words[0] = "an"
        if self.chance(0.5):
            adj = self.pick(adjs, rare_adjs)
            if words[0] in ("a", "an"):
                words[0] = "an" if adj[0] in "aeiou" else "a"
            words.append(adj)
        words.append(noun)
        if self.chance(0.15):
            words.append(self.place())
        if allow_clause and self.clauses < MAX_CLAUSES and self.chance(self.relative_rate):
            words.append(self.relative_clause(animate, plural))
        return " ".join(words), plural

    def verb(self, entry: tuple[str, str, str], plural: bool, tense: str) -> str:
        if tense == "past":
            return entry[2]
        return entry[0] if plural else entry[1]

    def relative_clause(self, animate: bool, plural: bool) -> str:
        self.clauses += 1
        if self.chance(0.5):  # subject relative: "who repaired the lamp"
            rel = "who" if animate else "that"
            if animate:
                obj, _ = self.noun_phrase(False, False)
                return f"{rel} {self.verb(self.pick(TRANSITIVE, RARE_TRANSITIVE), plural, self.tense)} {obj}"
            be = ("were" if plural else "was") if self.tense == "past" else ("are" if plural else "is")
            if self.chance(0.5):
                owner = self.pick(PEOPLE, RARE_PEOPLE)[0]
                return f"{rel} {self.verb(BELONG, plural, self.tense)} to the {owner}"
            entry = self.pick(TRANSITIVE, RARE_TRANSITIVE)
            return f"{rel} {be} {PARTICIPLES.get(entry[0], entry[2])} {self.place()}"
        subj, subj_plural = self.noun_phrase(True, False)  # object relative: "that the baker found"
        return f"that {subj} {self.verb(self.pick(TRANSITIVE, RARE_TRANSITIVE), subj_plural, self.tense)}"

    def clause(self, allow_clause: bool) -> tuple[str, str, bool, str]:
        """``(subject, predicate, plural, verb_base)`` of a simple clause."""
        subject, plural = self.noun_phrase(True, allow_clause)
        if self.chance(0.7):
            entry = self.pick(TRANSITIVE, RARE_TRANSITIVE)
            obj, _ = self.noun_phrase(False, allow_clause)
            rest = [obj]
        else:
            entry = self.pick(INTRANSITIVE, RARE_INTRANSITIVE)
            rest = []
        if self.chance(0.35):
            rest.append(self.pick(ADVERBS, RARE_ADVERBS))
        if self.chance(0.3):
            rest.append(self.place())
        if self.chance(0.2):
            rest.append(self.rng.choice(TIMES))
        predicate = " ".join([self.verb(entry, plural, self.tense), *rest])
        return subject, predicate, plural, " ".join([entry[0], *rest])

    def sentence(self, extra_clauses: int) -> tuple[str, int]:
        """``(text, clause_count)``; ``extra_clauses`` beyond the main one are attempted."""
        self.tense = self.rng.choice(("present", "past"))
        self.relative_rate = 0.35 if extra_clauses else 0.0
        subject, predicate, plural, base = self.clause(extra_clauses > 0)
        if self.chance(0.1) and extra_clauses == 0:
            aux = "did" if self.tense == "past" else ("do" if plural else "does")
            return f"{aux.capitalize()} {subject} {base}?", self.clauses
        text = f"{subject} {predicate}"
        while self.clauses < 1 + extra_clauses:
            self.clauses += 1
            s2, p2, _, _ = self.clause(False)
            if self.chance(0.6):
                link = self.rng.choice(SUBORDINATORS)
                text = f"{link} {s2} {p2}, {text}" if self.chance(0.3) else f"{text} {link} {s2} {p2}"
            else:
                text = f"{text}, {self.rng.choice(COORDINATORS)} {s2} {p2}"
        return text[0].upper() + text[1:] + ".", self.clauses


def _one(rng: random.Random) -> SyntheticSentence:
    extra = rng.choices(range(MAX_CLAUSES), weights=(35, 30, 20, 15))[0]
    rare_rate = rng.choice((0.0, 0.05, 0.15, 0.35))
    b = _Builder(rng, rare_rate)
    text, clauses = b.sentence(extra)
    words = len(text.split())
    share = b.rare / b.content if b.content else 0.0
    return SyntheticSentence(text, sentence_difficulty(clauses, words, share), clauses, words, share,
                             b.tense, bool(b.subject_plural), bool(b.subject_human))


PROBE_LABELS = ("tense", "plural_subject", "human_subject", "clauses")


def probe_labels(sentence: SyntheticSentence) -> dict[str, str]:
    """The generator's exact labels of one sentence, as strings (for probing tasks)."""
    return {"tense": sentence.tense, "plural_subject": str(sentence.plural_subject).lower(),
            "human_subject": str(sentence.human_subject).lower(), "clauses": str(sentence.clauses)}


def generate_examples(n: int, seed: int = 0, *, max_attempts: int | None = None) -> list[SyntheticSentence]:
    """``n`` distinct sentences (4 to ``MAX_WORDS`` words) with their difficulty parts, deterministic by ``seed``.

    ``max_attempts`` bounds the draws (default ``50 * n + 1000``); when it runs out before
    ``n`` distinct sentences exist, the space is exhausted and a ``UserError`` says so.
    """
    if n < 0:
        raise UserError(f"the number of synthetic sentences must be >= 0, got {n}")
    rng = random.Random(seed)
    limit = 50 * n + 1000 if max_attempts is None else max_attempts
    seen: set[str] = set()
    out: list[SyntheticSentence] = []
    attempts = 0
    while len(out) < n:
        if attempts >= limit:
            raise UserError(
                f"the synthetic generator found only {len(out)} distinct sentences in {attempts} draws, "
                f"fewer than the {n} asked for; ask for fewer (data.synthetic_sentences) or use a real corpus"
            )
        attempts += 1
        s = _one(rng)
        if s.text in seen or not 4 <= s.words <= MAX_WORDS:
            continue
        seen.add(s.text)
        out.append(s)
    return out


def generate_sentences(n: int, seed: int = 0) -> list[tuple[str, float]]:
    """``n`` distinct grammatical sentences as ``(text, difficulty)``, deterministic by ``seed``.

    The difficulty formula is in the module docstring and ``sentence_difficulty``.
    """
    return [(s.text, s.difficulty) for s in generate_examples(n, seed)]
