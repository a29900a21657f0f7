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
    """The surface the batcher needs. ``encode`` returns float32 ``(len(texts), dim)``, L2-normalised.

    ``encode`` may raise ``EngineItemErrors`` to refuse some texts of a call,
    ``EngineDead`` when the engine can serve no more, and anything else for a
    failure the batcher isolates by splitting the call.
    """

    name: str
    dim: int
    max_tokens: int
    #: Engine calls the batcher keeps in flight at once: 1 for engines that run
    #: in the caller's thread; 2 lets an engine with its own scheduler start on
    #: the next call while the last one's results are written.
    concurrent_calls: int
    #: True when ``encode`` counts its real tokens into the metrics itself;
    #: otherwise the batcher counts an estimate.
    counts_tokens: bool

    def load(self) -> None: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def format_query(self, instruction: str, text: str) -> str: ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


class EngineItemErrors(Exception):
    """Raised by ``encode`` for texts it refuses (too long, say); the other texts of the call are fine."""

    def __init__(self, errors: dict[int, str]) -> None:
        super().__init__(f"{len(errors)} texts refused: " + "; ".join(list(errors.values())[:3]))
        self.errors = errors


class EngineDead(Exception):
    """Raised when the engine can serve no more: the worker stops taking work and exits."""


def apply_instruction(template: str | None, instruction: str, text: str) -> str:
    """The prompt for ``text``: no instruction leaves it alone; no template prefixes the instruction."""
    if not instruction:
        return text
    return template.format(instruction=instruction, text=text) if template else instruction + text


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/accelerator OOM, which a smaller call may avoid; torch is not imported for it."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


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
