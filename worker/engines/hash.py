"""Deterministic pseudo-vectors: for tests and load tests of the queue itself, never for production.

A text's vector depends only on the text and the dimension, so a test can
compute the exact expected array with ``hash_vector``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from worker.engines import apply_instruction


def hash_vector(text: str, dim: int) -> np.ndarray:
    """The unit vector the hash engine returns for ``text``."""
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return vector


class HashEngine:
    """Any model name; ``dim`` sets the width. Instructions prefix the text, as for sentence-transformers."""

    name = "hash"
    concurrent_calls = 1
    counts_tokens = False

    def __init__(
        self, model: str, *, dim: int = 384, max_tokens: int = 8192, instruction_template: str | None = None, **_: Any
    ) -> None:
        self.model = model
        self.instruction_template = instruction_template
        self.dim = dim
        self.max_tokens = max_tokens

    def checkpoint(self) -> str | None:
        """None needed: a vector depends only on the text and ``dim``."""
        return ""

    def load(self) -> None:
        """Nothing to load."""

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = hash_vector(text, self.dim)
        return out

    def format_query(self, instruction: str, text: str) -> str:
        return apply_instruction(self.instruction_template, instruction, text)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release."""
