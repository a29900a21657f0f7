"""Worker-only settings, read once at worker start; the shared ones come from ``embq.producer.settings``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embq.producer.errors import ConfigurationError
from embq.producer.keys import HASH_DEFAULT_MODEL, HASH_MODEL_PREFIX
from embq.producer.settings import Settings, read_env

DTYPES = ("float32", "float16")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """How one worker process hosts its engine and feeds it."""

    shared: Settings = field(default_factory=Settings)
    #: ``sglang`` on GPUs, ``sentence-transformers`` for development, ``hash`` for queue tests.
    engine: str = "sentence-transformers"
    #: Tasks executed at once (Celery threads). Their texts are what the batcher
    #: can coalesce, so it bounds the batch size under many small producers.
    concurrency: int = 64
    #: Of those, the most bulk tasks may hold (``embq.worker.lanes``); the rest stay free for interactive
    #: tasks. None: a quarter of ``concurrency``. Raise it on a GPU whose passes need a deeper backlog.
    bulk_tasks: int | None = None
    #: Tokens per engine pass: the tokenizer's count where the engine has one (else characters / 4),
    #: padded (longest text x texts) for engines that pad. None takes the engine's choice for its
    #: device, logged at start (sentence-transformers: 2,048 on a CPU, 32,768 on a GPU; 16,384 for
    #: SGLang calls). Raise it while throughput grows; lower it if a pass runs out of memory.
    batch_tokens: int | None = None
    #: Texts per engine pass, whatever their length; None takes the engine's choice.
    batch_max_texts: int | None = None
    #: How long the batcher waits for more texts before it calls an idle engine.
    #: Under load batches fill while the engine runs, so this only adds latency
    #: to a lone request (the batcher's own short wait after a long call is apart).
    batch_wait_ms: float = 5.0
    #: Stored vector precision; float16 halves cache memory (~1e-3 error).
    cache_dtype: str = "float32"
    #: Torch device for sentence-transformers (``cpu``, ``cuda``, ``cuda:1``); None picks.
    device: str | None = None
    #: Texts per forward pass inside one sentence-transformers call; None picks
    #: by device (see ``SentenceTransformersEngine``).
    engine_batch_size: int | None = None
    #: sentence-transformers: run each pass padding-free, its texts packed into one sequence with
    #: attention kept within each text (flex attention on CUDA), where the model allows it; checked
    #: against the padded path at load, which stays the fallback (see ``SentenceTransformersEngine``).
    packed_passes: bool = False
    #: Width of the hash engine's vectors.
    hash_dim: int = 384
    #: Seconds the hash engine spends per text, to load-test the queue against a slow model (0: none).
    hash_seconds_per_text: float = 0.0
    #: The hash engine's context, in tokens estimated from characters (4 per token): longer texts are
    #: cut there for calls that ask for it, refused for the others, as a model's are.
    hash_max_tokens: int = 8192
    #: Weights dtype: ``auto`` takes the model's own (bfloat16 for Qwen3-Embedding).
    dtype: str = "auto"
    #: Let the engine run custom model code shipped with the checkpoint.
    trust_remote_code: bool = False
    #: No effect, read only to say so at start: a call asks for its texts to be cut (``truncate=True``),
    #: and every worker serves both kinds; the default for callers that cannot ask is the gateway's.
    truncate: bool = False
    #: How an instruction and a text become one prompt; None takes the engine's
    #: own (``Instruct: {instruction}\nQuery:{text}`` for SGLang/Qwen3-Embedding).
    instruction_template: str | None = None
    #: Seconds one engine call may take before the engine is declared dead (the
    #: worker then requeues its tasks and exits for its orchestrator to restart it).
    engine_call_timeout: float = 600.0
    #: SGLang: share of GPU memory for weights and KV cache. 0.85 suits
    #: Qwen3-Embedding-4B (8 GB of bf16 weights) on one 80 GB GPU and leaves
    #: room for activations; lower it if other processes share the GPU.
    mem_fraction_static: float = 0.85
    #: SGLang: requests it runs at once; embedding requests finish in one prefill,
    #: so this bounds the texts per forward pass.
    max_running_requests: int = 256
    #: SGLang: tokens per prefill chunk; long texts are split into chunks of this size.
    chunked_prefill_size: int = 8192
    #: SGLang: context length; None takes the model's (32768 for Qwen3-Embedding).
    #: Lower it to bound memory per request.
    context_length: int | None = None
    #: SGLang: GPUs one engine spans (tensor parallel). One worker per GPU is
    #: the default and scales best for models that fit on one GPU.
    tp_size: int = 1
    #: SGLang: ``auto``, or ``dummy`` for random weights (smoke tests without a download).
    load_format: str = "auto"
    #: SGLang: engine calls kept in flight, so the GPU works while results are stored.
    engine_inflight_calls: int = 2
    #: SGLang: any other ``sglang.Engine`` keyword, as a JSON object.
    sglang_args: str = ""
    #: SGLang: the engine class, ``module:Class``: ``sglang.Engine`` or a subclass
    #: that overrides its process functions (SGLang's hook for private forks).
    sglang_engine_class: str = "sglang:Engine"
    #: Created once the engine is loaded and the worker consumes; removed at exit
    #: (readiness probes test for it).
    ready_file: str | None = None
    #: Seconds a starting worker waits for its broker and cache Redis to answer before it
    #: gives up with one line and exit status 3 (its orchestrator restarts it). Enough for
    #: a Redis started beside it; a Redis lost later is waited for as long as it takes.
    redis_wait: float = 15.0
    #: Port of the Prometheus metrics (``/metrics``); 0 serves none. When it is taken (a
    #: second worker on one host), the next free one (``embq.worker.metrics.PORT_TRIES``).
    metrics_port: int = field(default=9808, metadata={"zero_means": "no metrics"})

    def __post_init__(self) -> None:
        check_engine_model(self.engine, self.shared.model)
        if self.cache_dtype not in DTYPES:
            raise ConfigurationError(f"EMBQ_CACHE_DTYPE must be one of {DTYPES}, got {self.cache_dtype!r}")
        if not 0 < self.mem_fraction_static < 1:
            raise ConfigurationError(
                f"EMBQ_MEM_FRACTION_STATIC must be between 0 and 1, got {self.mem_fraction_static}"
            )
        self.extra_sglang_args()  # fail at start, not at engine load

    def extra_sglang_args(self) -> dict[str, Any]:
        if not self.sglang_args:
            return {}
        try:
            extra = json.loads(self.sglang_args)
        except ValueError as e:
            raise ConfigurationError(f"EMBQ_SGLANG_ARGS must be a JSON object: {e}") from e
        if not isinstance(extra, dict):
            raise ConfigurationError("EMBQ_SGLANG_ARGS must be a JSON object of sglang.Engine keywords")
        return extra

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        urls: Mapping[str, str] | None = None,
        origins: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> WorkerSettings:
        """Read ``EMBQ_*`` variables; ``overrides`` win, and ``urls`` (``redis_url``, ... from flags named in
        ``origins``) win over the shared settings' variables."""
        env = os.environ if environ is None else environ
        engine = overrides.get("engine") or env.get(ENV_NAMES["engine"]) or cls.engine
        model = default_model(engine, overrides.pop("model", None), env)
        shared = Settings.from_env(env, origins=origins, model=model, **(urls or {}))
        values = read_env(cls, env, ENV_NAMES)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(shared=shared, **values)

    @property
    def bulk_task_limit(self) -> int:
        """Task slots bulk work may hold: ``bulk_tasks``, else a quarter of ``concurrency``."""
        return min(self.concurrency, self.bulk_tasks or max(1, self.concurrency // 4))

    def engine_options(self) -> dict[str, Any]:
        """Keyword options for ``create_engine``; each engine takes the ones it knows."""
        return {
            "device": self.device,
            "batch_size": self.engine_batch_size,
            "packed": self.packed_passes,
            "dim": self.hash_dim,
            "seconds_per_text": self.hash_seconds_per_text,
            "max_tokens": self.hash_max_tokens,
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
            "instruction_template": self.instruction_template,
            "call_timeout": self.engine_call_timeout,
            "mem_fraction_static": self.mem_fraction_static,
            "max_running_requests": self.max_running_requests,
            "chunked_prefill_size": self.chunked_prefill_size,
            "context_length": self.context_length,
            "tp_size": self.tp_size,
            "load_format": self.load_format,
            "concurrent_calls": self.engine_inflight_calls,
            "sglang_args": self.extra_sglang_args(),
            "engine_class": self.sglang_engine_class,
        }


def default_model(engine: str, model: str | None, env: Mapping[str, str]) -> str | None:
    """The model asked for; for the hash engine with none asked for, ``HASH_DEFAULT_MODEL``
    (None lets ``Settings`` take ``EMBQ_MODEL`` or its default)."""
    if model or env.get("EMBQ_MODEL") or engine != "hash":
        return model
    return HASH_DEFAULT_MODEL


def check_engine_model(engine: str, model: str) -> None:
    """Hash pseudo-vectors and real vectors never share model ids, so never keys or queues: a hash
    worker started with a real model's name would otherwise answer its producers with noise."""
    if engine == "hash" and not model.startswith(HASH_MODEL_PREFIX):
        raise ConfigurationError(
            f"the hash engine makes pseudo-vectors, so it serves only model ids that start with "
            f"{HASH_MODEL_PREFIX!r}, never a real model's such as {model!r}: use --model {HASH_MODEL_PREFIX}NAME "
            "(and the same model id in the producers)"
        )
    if engine != "hash" and model.startswith(HASH_MODEL_PREFIX):
        raise ConfigurationError(
            f"model ids that start with {HASH_MODEL_PREFIX!r} belong to the hash engine's pseudo-vectors; "
            f"the {engine} engine cannot serve {model!r}"
        )


ENV_NAMES: dict[str, str] = {
    "engine": "EMBQ_ENGINE",
    "concurrency": "EMBQ_CONCURRENCY",
    "bulk_tasks": "EMBQ_BULK_TASKS",
    "batch_tokens": "EMBQ_BATCH_TOKENS",
    "batch_max_texts": "EMBQ_BATCH_MAX_TEXTS",
    "batch_wait_ms": "EMBQ_BATCH_WAIT_MS",
    "cache_dtype": "EMBQ_CACHE_DTYPE",
    "device": "EMBQ_DEVICE",
    "engine_batch_size": "EMBQ_ENGINE_BATCH_SIZE",
    "packed_passes": "EMBQ_PACKED_PASSES",
    "hash_dim": "EMBQ_HASH_DIM",
    "hash_seconds_per_text": "EMBQ_HASH_SECONDS_PER_TEXT",
    "hash_max_tokens": "EMBQ_HASH_MAX_TOKENS",
    "ready_file": "EMBQ_READY_FILE",
    "metrics_port": "EMBQ_METRICS_PORT",
    "redis_wait": "EMBQ_REDIS_WAIT",
    "dtype": "EMBQ_DTYPE",
    "trust_remote_code": "EMBQ_TRUST_REMOTE_CODE",
    "truncate": "EMBQ_TRUNCATE",
    "instruction_template": "EMBQ_INSTRUCTION_TEMPLATE",
    "engine_call_timeout": "EMBQ_ENGINE_CALL_TIMEOUT",
    "mem_fraction_static": "EMBQ_MEM_FRACTION_STATIC",
    "max_running_requests": "EMBQ_MAX_RUNNING_REQUESTS",
    "chunked_prefill_size": "EMBQ_CHUNKED_PREFILL_SIZE",
    "context_length": "EMBQ_CONTEXT_LENGTH",
    "tp_size": "EMBQ_TP_SIZE",
    "load_format": "EMBQ_LOAD_FORMAT",
    "engine_inflight_calls": "EMBQ_ENGINE_INFLIGHT_CALLS",
    "sglang_args": "EMBQ_SGLANG_ARGS",
    "sglang_engine_class": "EMBQ_SGLANG_ENGINE_CLASS",
}
