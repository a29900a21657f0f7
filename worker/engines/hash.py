"""Deterministic pseudo-vectors: for tests and load tests of the queue itself, never for production.

A text's vector depends only on the text and the dimension, so a test can
compute the exact expected array with ``hash_vector``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from embq.worker.engines import CHARS_PER_TOKEN, Prepared, TextsAsTheyAre, prepare_by_estimate, too_long


def hash_vector(text: str, dim: int) -> np.ndarray:
    """The unit vector the hash engine returns for ``text``."""
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return vector


class HashEngine(TextsAsTheyAre):
    """Any model name; ``dim`` sets the width. Instructions prefix the text, as for sentence-transformers."""

    name = "hash"
    concurrent_calls = 1
    counts_tokens = False
    pads = False
    pass_tokens = 16384
    pass_texts = 512

    def __init__(
        self,
        model: str,
        *,
        dim: int = 384,
        max_tokens: int = 8192,
        instruction_template: str | None = None,
        seconds_per_text: float = 0.0,
        **_: Any,
    ) -> None:
        self.model = model
        self.instruction_template = instruction_template
        self.dim = dim
        self.max_tokens = max_tokens
        #: Time each call spends per text, as a model would: the queue tested against a slow engine.
        self.seconds_per_text = seconds_per_text

    def checkpoint(self) -> str | None:
        """None needed: a vector depends only on the text and ``dim``."""
        return ""

    def load(self) -> None:
        """Nothing to load."""

    def prepare(self, texts: list[str], truncate: bool = False) -> Prepared:
        """Texts over ``max_tokens`` (estimated from characters, the hash engine's only tokens) are cut to
        ``cut_text`` with ``truncate``, refused without it, as a model's would be."""
        prepared = prepare_by_estimate(texts)
        for i, tokens in enumerate(prepared.tokens):
            if tokens > self.max_tokens:
                if truncate:
                    prepared.inputs[i] = self.cut_text(texts[i])
                    prepared.tokens[i] = self.max_tokens
                else:
                    prepared.errors[i] = too_long(tokens, self.max_tokens)
        return prepared

    def cut_text(self, text: str) -> str:
        """What the engine keeps of a text over its context: the longest prefix within ``max_tokens``."""
        return text[: (self.max_tokens - 2) * CHARS_PER_TOKEN]  # estimate_tokens: len // 4 + 2

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.seconds_per_text:
            time.sleep(self.seconds_per_text * len(texts))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = hash_vector(text, self.dim)
        return out

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""
