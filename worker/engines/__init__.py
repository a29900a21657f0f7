"""Engines turn a list of texts into normalised vectors; one per worker process.

Each engine lives in its own module and is imported only when chosen, so the
worker (and the tests) never import torch or sglang unless they use them.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from producer.errors import ConfigurationError


class Engine(Protocol):
    """The surface the batcher needs. ``encode`` returns float32 ``(len(texts), dim)``, L2-normalised."""

    name: str
    dim: int
    max_tokens: int

    def load(self) -> None: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def format_query(self, instruction: str, text: str) -> str: ...

    def close(self) -> None: ...


#: Engine name -> "module:class". ``sglang`` hosts one SGLang engine per GPU.
ENGINES: dict[str, str] = {
    "sglang": "worker.engines.sglang:SGLangEngine",
    "sentence-transformers": "worker.engines.sentence_transformers:SentenceTransformersEngine",
    "hash": "worker.engines.hash:HashEngine",
}


def create_engine(name: str, model: str, **options: Any) -> Engine:
    """Instantiate (not load) the engine ``name`` for ``model``."""
    target = ENGINES.get(name)
    if target is None:
        raise ConfigurationError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(
            f"engine {name!r} is not available: {e}. Install the matching extra, e.g. pip install 'embq[{name}]'"
        ) from e
    engine: Engine = getattr(module, class_name)(model, **options)
    return engine
