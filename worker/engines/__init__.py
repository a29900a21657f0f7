"""Engines turn a list of texts into normalised vectors; one per worker process.

Each engine lives in its own module and is imported only when chosen, so the
worker (and the tests) never import torch or sglang unless they use them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, NamedTuple, Protocol

import numpy as np

from embq.producer.errors import ConfigurationError

#: Rough characters per token, for engines that do not tokenise before their call.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 2


class Prepared(NamedTuple):
    """What an engine makes of texts before any pass, on the calling task's thread (so, ahead of
    the device): each text's tokens, its input to ``encode_prepared``, and the texts it refuses."""

    tokens: list[int]
    inputs: list[Any]
    errors: dict[int, str]


def prepare_by_estimate(texts: list[str]) -> Prepared:
    """``prepare`` for engines that take texts as they are: tokens estimated from characters."""
    return Prepared([estimate_tokens(t) for t in texts], list(texts), {})


#: How a caller has texts over the context cut rather than failed: the option of each way in.
CUT_HINT = (
    "shorten it, or have it cut at the context: truncate=True on embed, --truncate on embq embed, "
    '"truncate": true in a request to embq serve'
)


def too_long(tokens: int, limit: int, what: str = "this model takes") -> str:
    """Why a text over the context failed, and the per-call option that has it cut instead."""
    return f"the input ({tokens} tokens) is longer than {what} ({limit} tokens); {CUT_HINT}"


class TextsAsTheyAre:
    """The part of ``Engine`` shared by engines that take texts as they are, untokenised, and prefix
    instructions by ``instruction_template``: their passes are budgeted by estimated tokens."""

    instruction_template: str | None

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, texts: list[str], truncate: bool = False) -> Prepared:
        return prepare_by_estimate(texts)

    def encode_prepared(self, inputs: list[Any]) -> np.ndarray:
        return self.encode(inputs)

    def format_query(self, instruction: str, text: str) -> str:
        return apply_instruction(self.instruction_template, instruction, text)


class Engine(Protocol):
    """The surface the batcher needs. ``encode`` returns float32 ``(len(texts), dim)``, L2-normalised.

    ``encode`` may raise ``EngineItemErrors`` to refuse some texts of a call,
    ``EngineDead`` when the engine can serve no more, and anything else for a
    failure the batcher isolates by splitting the call. The batcher calls
    ``prepare`` once per task and ``encode_prepared`` once per pass, with the
    inputs ``prepare`` made.
    """

    name: str
    dim: int
    max_tokens: int
    #: True when a pass costs its longest text times its texts (padded batches): the batcher then
    #: budgets ``pass_tokens`` as padded tokens; False when the engine packs texts (SGLang) or
    #: does not care (hash), and the budget is the sum of tokens.
    pads: bool
    #: Tokens and texts per pass the engine suggests for its device, set by ``load``; the worker's
    #: settings override them.
    pass_tokens: int
    pass_texts: int
    #: Engine calls the batcher keeps in flight at once: 1 for engines that run
    #: in the caller's thread; 2 lets an engine with its own scheduler start on
    #: the next call while the last one's results are written.
    concurrent_calls: int
    #: True when ``encode`` counts its real tokens into the metrics itself;
    #: otherwise the batcher counts an estimate.
    counts_tokens: bool

    def checkpoint(self) -> str | None:
        """What decides this engine's vectors besides its name, dimension and instruction format:
        a fingerprint of its checkpoint and of options that change what it computes. Callable
        before ``load``; None while it cannot be known yet (a model still on the hub)."""
        ...

    def load(self) -> None: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def prepare(self, texts: list[str], truncate: bool = False) -> Prepared:
        """Tokens and inputs of one task's texts. ``truncate``: a text over the context is cut there
        (its input says so), else refused (``Prepared.errors``, naming the per-call option). One pass may
        mix the inputs of tasks that cut and of tasks that do not."""
        ...

    def encode_prepared(self, inputs: list[Any]) -> np.ndarray: ...

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
    "sglang": "embq.worker.engines.sglang_host:SGLangHostEngine",
    "sentence-transformers": "embq.worker.engines.sentence_transformers:SentenceTransformersEngine",
    "hash": "embq.worker.engines.hash:HashEngine",
}


#: Engine name -> (module it cannot start without, how to get it).
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "sglang": ("sglang", "use the GPU image (worker/Dockerfile), or pip install 'embq[sglang]' on a CUDA machine"),
    "sentence-transformers": (
        "sentence_transformers",
        "pip install torch==2.13.0 (the CPU build) first, then pip install 'embq[cpu]'",
    ),
}


def missing_requirement(name: str) -> str | None:
    """Why engine ``name`` cannot start here, found without importing anything heavy; None if it may."""
    if name not in ENGINES:
        return f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}"
    module, how = REQUIREMENTS.get(name, ("", ""))
    if module and importlib.util.find_spec(module) is None:
        return f"the {name} engine needs the Python package {module!r}, which is not installed: {how}"
    return None


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
