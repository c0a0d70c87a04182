"""The bundled NLI text: where its encoding was damaged before it reached the project, and that nothing else is."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from fastif.recipes.nli.data import EMBEDDED_FILES, embedded_file

QUESTION_MARKS_IN_WORDS = re.compile(r"[^\W\d_]\?\?|\?\?[^\W\d_]")  # letters only: "19??" is a real unknown year
"""A non-ASCII letter whose UTF-8 bytes were each replaced by a literal '?' upstream (``R??publique``)."""
DAMAGED_MNLI_RECORDS = 56
"""Records of the bundled MNLI file with such a letter (of 9,815): the file came this way from the public HANS
repository's copy, and é, è, ê, ... all lose the same two bytes, so the letters cannot be recovered from it."""


def _texts(name: str) -> list[str]:
    """Every premise and hypothesis of a bundled file."""
    with gzip.open(embedded_file(name), "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [f"{row['premise']}\n{row['hypothesis']}" for row in rows]


def test_the_bundled_mnli_has_a_known_number_of_unrecoverable_letters():
    texts = _texts("mnli")
    assert len(texts) == 9815
    assert sum(bool(QUESTION_MARKS_IN_WORDS.search(text)) for text in texts) == DAMAGED_MNLI_RECORDS


@pytest.mark.parametrize("name", sorted(set(EMBEDDED_FILES) - {"mnli"}))
def test_the_other_bundled_sets_have_no_damaged_letters(name):
    texts = _texts(name)
    assert texts and not any(QUESTION_MARKS_IN_WORDS.search(text) or "\ufffd" in text for text in texts)
