"""A seeded fact-tracing corpus: filler documents of MNLI sentences with planted synthetic facts.

Each planted fact ("The capital of Zorbia is Quintal") is stated in ``mentions`` documents, each time in another
training paraphrase, inserted among filler sentences; its query states the fact's prompt and completion in a held-out
paraphrase ("The capital city of Zorbia is" + " Quintal"). The documents that hold a fact are the ground truth of
fact tracing. The tokenizer is word-level, built offline from the corpus (every invented name is one token).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from fastif.fingerprint import fingerprint_records

MNLI_FILE = ("mnli", "mnli_dev_matched.jsonl.gz")
WORD = re.compile(r"\w+|[^\w\s]+")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOS]")
PAD_ID = 0  # "[PAD]" comes first


@dataclass(frozen=True)
class Relation:
    """One kind of fact: training paraphrases (with ``{s}`` subject and ``{o}`` object) and the held-out query."""

    name: str
    training: tuple[str, ...]
    query: str  # ends where the object would follow


RELATIONS = (
    Relation(
        "capital",
        (
            "The capital of {s} is {o}.",
            "As every map shows, the capital of {s} is {o}.",
            "Few travellers know that the capital of {s} is {o}.",
        ),
        "Everyone knows that the capital of {s} is",
    ),
    Relation(
        "currency",
        (
            "The currency of {s} is the {o}.",
            "In the markets, the currency of {s} is the {o}.",
            "Bankers say that the currency of {s} is the {o}.",
        ),
        "Today, the currency of {s} is the",
    ),
    Relation(
        "leader",
        (
            "The leader of {s} is {o}.",
            "Since the last election, the leader of {s} is {o}.",
            "The papers report that the leader of {s} is {o}.",
        ),
        "As far as we know, the leader of {s} is",
    ),
    Relation(
        "language",
        (
            "The language of {s} is {o}.",
            "In schools and shops, the language of {s} is {o}.",
            "Linguists agree that the language of {s} is {o}.",
        ),
        "At home, the language of {s} is",
    ),
)


@dataclass(frozen=True)
class CorpusConfig:
    """How the corpus is drawn: seed, planted facts and their mentions, filler documents and their sentences."""

    seed: int = 0
    num_facts: int = 40
    mentions: int = 3
    filler_documents: int = 240
    min_sentences: int = 1
    max_sentences: int = 2
    max_sentence_words: int = 16
    min_word_count: int = 2  # rarer filler words become [UNK]


@dataclass(frozen=True)
class Fact:
    """A planted fact: its relation, invented subject and object, and the held-out query."""

    relation: str
    subject: str
    object: str
    prompt: str
    completion: str


@dataclass
class Corpus:
    """The training documents (``{"text"}`` records), the facts, the documents holding each fact, the queries
    (``{"prompt", "completion"}`` records, one per fact) and the word-level vocabulary."""

    config: CorpusConfig
    documents: list[dict[str, str]]
    facts: list[Fact]
    fact_documents: list[list[int]]  # per fact, the indices of the documents that state it
    vocabulary: list[str]

    @property
    def queries(self) -> list[dict[str, str]]:
        return [{"prompt": fact.prompt, "completion": fact.completion} for fact in self.facts]

    def fingerprint(self) -> str:
        """SHA-256 of the settings, documents, facts and vocabulary: what a trained model's cache is keyed by."""
        header = {"config": asdict(self.config), "facts": [asdict(fact) for fact in self.facts]}
        return fingerprint_records([header, *self.documents, {"vocabulary": self.vocabulary}])


def filler_sentences(max_words: int) -> list[str]:
    """Distinct, clean MNLI premises and hypotheses of 6 to ``max_words`` words, in a fixed (sorted) order."""
    path = resources.files("fastif.recipes.nli").joinpath("datasets", *MNLI_FILE)
    found: set[str] = set()
    with gzip.open(str(path), "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            for text in (record["premise"], record["hypothesis"]):
                sentence = " ".join(text.split())
                if 6 <= len(sentence.split()) <= max_words and sentence.isascii() and "??" not in sentence:
                    found.add(sentence if sentence[-1] in ".!?" else sentence + ".")
    return sorted(found)


def words(text: str) -> list[str]:
    """The tokenizer's words: lower-cased runs of letters/digits and of punctuation."""
    return WORD.findall(text.lower())


def invented_names(count: int, rng: random.Random, taken: set[str]) -> list[str]:
    """``count`` distinct pronounceable invented words (capitalised), none of them an existing word in ``taken``."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "l", "s"]
    names: list[str] = []
    while len(names) < count:
        syllables = rng.randint(2, 3)
        name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas)
        if name not in taken:
            taken.add(name)
            names.append(name.capitalize())
    return names


def plant_facts(config: CorpusConfig, rng: random.Random, taken: set[str]) -> list[Fact]:
    """``num_facts`` facts spread over the relations, with invented subjects and objects."""
    subjects = invented_names(config.num_facts, rng, taken)
    objects = invented_names(config.num_facts, rng, taken)
    facts = []
    for i, (subject, obj) in enumerate(zip(subjects, objects, strict=True)):
        relation = RELATIONS[i % len(RELATIONS)]
        facts.append(Fact(relation.name, subject, obj, relation.query.format(s=subject), " " + obj))
    return facts


def _relation(name: str) -> Relation:
    return next(relation for relation in RELATIONS if relation.name == name)


def build_corpus(config: CorpusConfig | None = None) -> Corpus:
    """The seeded corpus: filler documents, ``mentions`` of each fact inserted into their own documents, shuffled."""
    config = config or CorpusConfig()
    if config.mentions > min(len(relation.training) for relation in RELATIONS):
        raise ValueError(f"mentions must be at most {len(RELATIONS[0].training)}, the training paraphrases per fact")
    rng = random.Random(config.seed)
    sentences = filler_sentences(config.max_sentence_words)
    rng.shuffle(sentences)
    pool = iter(sentences)
    total = config.filler_documents + config.num_facts * config.mentions
    bodies = [
        [next(pool) for _ in range(rng.randint(config.min_sentences, config.max_sentences))] for _ in range(total)
    ]
    taken = {word for body in bodies for sentence in body for word in words(sentence)}
    facts = plant_facts(config, rng, taken)
    owners: list[int | None] = [None] * config.filler_documents
    for f, fact in enumerate(facts):
        templates = _relation(fact.relation).training[: config.mentions]
        for template, body in zip(templates, bodies[len(owners) : len(owners) + config.mentions], strict=True):
            body.insert(rng.randint(0, len(body)), template.format(s=fact.subject, o=fact.object))
            owners.append(f)
    order = list(range(total))
    rng.shuffle(order)
    documents = [{"text": " ".join(bodies[i])} for i in order]
    fact_documents: list[list[int]] = [[] for _ in facts]
    for position, i in enumerate(order):
        if owners[i] is not None:
            fact_documents[owners[i]].append(position)
    vocabulary = build_vocabulary(documents, facts, config.min_word_count)
    return Corpus(config, documents, facts, fact_documents, vocabulary)


def build_vocabulary(documents: list[dict[str, str]], facts: list[Fact], min_count: int) -> list[str]:
    """Special tokens, every word of the facts and queries, then filler words seen ``min_count`` times or more."""
    counts = Counter(word for document in documents for word in words(document["text"]))
    fact_words = {word for fact in facts for word in words(fact.prompt + fact.completion)}
    common = {word for word, count in counts.items() if count >= min_count}
    return [*SPECIAL_TOKENS, *sorted(fact_words | common)]


def word_tokenizer(vocabulary: list[str]) -> Any:
    """A Hugging Face fast tokenizer over ``vocabulary``: lower-cased, split on whitespace and punctuation."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model = WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="[UNK]")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=512
    )
