"""Deterministic benchmark texts: the same seed gives the same texts on every machine.

Words are whole-word entries of the benchmark model's own vocabulary (MiniLM's
``vocab.txt``: its first 8,000 alphabetic ASCII words of three letters or more,
kept in ``words.txt`` beside this file so that a machine without the model can
make the same texts), so a word costs about one token, as in real prose;
made-up words would split into many word pieces and make every text look
several times longer to the model.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = Path(__file__).with_name("words.txt")


@cache
def vocabulary() -> list[str]:
    return WORDS.read_text(encoding="utf-8").split()


def make_texts(count: int, *, seed: int, min_words: int = 5, max_words: int = 300) -> list[str]:
    """``count`` distinct texts; lengths log-uniform between the bounds, as real corpora skew short."""
    rng = random.Random(seed)
    words = vocabulary()
    texts: list[str] = []
    for i in range(count):
        length = round(min_words * (max_words / min_words) ** rng.random())
        body = " ".join(rng.choice(words) for _ in range(length))
        texts.append(f"{seed}-{i} {body}")  # the prefix keeps texts of one seed distinct
    return texts
