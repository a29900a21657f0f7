"""Deterministic benchmark texts: the same seed gives the same texts on every machine.

Words are whole-word entries of the benchmark model's own vocabulary, so a word
costs about one token, as in real prose; made-up words would split into many
word pieces and make every text look several times longer to the model.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

from embq.worker.engines.sentence_transformers import resolve_model_path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@cache
def vocabulary(size: int = 8000) -> list[str]:
    entries = (Path(resolve_model_path(MINILM)) / "vocab.txt").read_text(encoding="utf-8").split()
    words = [w for w in entries if w.isascii() and w.isalpha() and len(w) >= 3]
    return words[:size]


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
