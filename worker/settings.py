"""Worker-only settings, read once at worker start; the shared ones come from ``producer.settings``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.errors import ConfigurationError
from producer.settings import Settings, read_env

DTYPES = ("float32", "float16")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """How one worker process hosts its engine and feeds it."""

    shared: Settings = field(default_factory=Settings)
    #: ``sglang`` on GPUs, ``sentence-transformers`` for development, ``hash`` for queue tests.
    engine: str = "sentence-transformers"
    #: Tasks executed at once (Celery threads). Their texts are what the batcher
    #: can coalesce, so it bounds the batch size under many small producers.
    concurrency: int = 16
    #: Estimated tokens (characters / 4) per engine call. Raise it on big GPUs
    #: until throughput stops growing; lower it if a call runs out of memory.
    batch_tokens: int = 16384
    #: Texts per engine call, whatever their length.
    batch_max_texts: int = 512
    #: How long the batcher waits for more texts before it calls an idle engine.
    #: Under load batches fill while the engine runs, so this only adds latency
    #: to a lone request.
    batch_wait_ms: float = 5.0
    #: Stored vector precision; float16 halves cache memory (~1e-3 error).
    cache_dtype: str = "float32"
    #: Torch device for sentence-transformers (``cpu``, ``cuda``, ``cuda:1``); None picks.
    device: str | None = None
    #: Texts per forward pass inside one sentence-transformers call.
    engine_batch_size: int = 32
    #: Width of the hash engine's vectors.
    hash_dim: int = 384
    #: Created once the engine is loaded and the worker consumes; removed at exit
    #: (readiness probes test for it).
    ready_file: str | None = None

    def __post_init__(self) -> None:
        if self.cache_dtype not in DTYPES:
            raise ConfigurationError(f"EMBQ_CACHE_DTYPE must be one of {DTYPES}, got {self.cache_dtype!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        env = os.environ if environ is None else environ
        shared = Settings.from_env(env, model=overrides.pop("model", None))
        values = read_env(cls, env, ENV_NAMES)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(shared=shared, **values)

    def engine_options(self) -> dict[str, Any]:
        """Keyword options for ``create_engine``; each engine takes the ones it knows."""
        return {"device": self.device, "batch_size": self.engine_batch_size, "dim": self.hash_dim}


ENV_NAMES: dict[str, str] = {
    "engine": "EMBQ_ENGINE",
    "concurrency": "EMBQ_CONCURRENCY",
    "batch_tokens": "EMBQ_BATCH_TOKENS",
    "batch_max_texts": "EMBQ_BATCH_MAX_TEXTS",
    "batch_wait_ms": "EMBQ_BATCH_WAIT_MS",
    "cache_dtype": "EMBQ_CACHE_DTYPE",
    "device": "EMBQ_DEVICE",
    "engine_batch_size": "EMBQ_ENGINE_BATCH_SIZE",
    "hash_dim": "EMBQ_HASH_DIM",
    "ready_file": "EMBQ_READY_FILE",
}
