"""The production engine: one in-process ``sglang.Engine(is_embedding=True)`` per GPU worker.

Written against sglang 0.5.23, ``srt/entrypoints/engine.py`` and
``srt/managers/tokenizer_manager.py``. What this module relies on:

- ``Engine(**kwargs)`` turns its keywords into ``ServerArgs`` and raises
  ``TypeError("Unexpected keyword argument ...")`` for an unknown one, before
  any process starts. It starts the scheduler and detokenizer as child
  processes, forces the ``spawn`` start method, and, on the main thread,
  installs a SIGQUIT handler that kills this whole process when a child fails
  (its scheduler turns any exception, CUDA OOM included, into a SIGQUIT). We
  pass ``custom_sigquit_handler`` instead: the engine is marked dead, calls in
  flight are aborted, and the worker requeues its tasks and exits. The engine
  is created in the worker's main process, never in a daemonic prefork child.
- ``async_encode(prompt=list[str])`` returns one dict per prompt, in order:
  ``{"embedding": [...], "meta_info": {"prompt_tokens": ..., "finish_reason": ...}}``;
  an aborted request comes back without ``"embedding"``. A prompt of
  ``context_len`` tokens or more raises ``ValueError`` for the whole call unless
  ``allow_auto_truncate``; we count tokens first so that such a text fails alone.
- The engine's ``loop`` is created in the constructing thread and bound to its
  sockets; sync ``encode`` runs it with ``run_until_complete`` and cannot be
  called inside a running loop. We run that loop forever in one thread and
  submit ``async_encode`` calls to it, so several calls are in flight and
  SGLang's continuous batching keeps the GPU busy between them. Its SIGTERM
  handler is only installed when the first request comes from the main thread,
  which never happens here, so Celery's warm shutdown stays in charge.
- ``shutdown()`` SIGKILLs every child of the calling process. A worker process
  has no children but the engine's, which is why one engine lives in one
  worker process and nothing else is started beside it.
- Qwen3-Embedding pools the last token and L2-normalises; SGLang's own
  ``dimensions`` needs ``is_matryoshka`` in the model config, so we always
  store the full vector and truncate on read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import multiprocessing
import threading
from typing import Any

import numpy as np

from producer.errors import EngineError
from worker import metrics
from worker.engines import EngineDead, EngineItemErrors, apply_instruction

log = logging.getLogger(__name__)

#: Qwen3-Embedding's query format; documents are embedded without an instruction.
QWEN3_INSTRUCTION = "Instruct: {instruction}\nQuery:{text}"


class SGLangEngine:
    """Hosts one SGLang engine; options map one to one onto ``sglang.Engine`` keywords."""

    name = "sglang"

    def __init__(
        self,
        model: str,
        *,
        mem_fraction_static: float = 0.85,
        max_running_requests: int | None = 256,
        chunked_prefill_size: int | None = 8192,
        context_length: int | None = None,
        tp_size: int = 1,
        dtype: str = "auto",
        load_format: str = "auto",
        trust_remote_code: bool = False,
        truncate: bool = False,
        instruction_template: str | None = None,
        call_timeout: float = 600.0,
        concurrent_calls: int = 2,
        sglang_args: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        self.model = model
        self.options: dict[str, Any] = {
            "mem_fraction_static": mem_fraction_static,
            "max_running_requests": max_running_requests,
            "chunked_prefill_size": chunked_prefill_size,
            "context_length": context_length,
            "tp_size": tp_size,
            "dtype": dtype,
            "load_format": load_format,
            "trust_remote_code": trust_remote_code,
            "allow_auto_truncate": truncate,
        }
        self.extra = dict(sglang_args or {})
        self.truncate = truncate
        self.instruction_template = instruction_template or QWEN3_INSTRUCTION
        self.call_timeout = call_timeout
        self.concurrent_calls = concurrent_calls
        self.counts_tokens = True
        self.dim = 0
        self.max_tokens = 0
        self._engine: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._dead: str | None = None
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._inflight_lock = threading.Lock()

    def engine_kwargs(self) -> dict[str, Any]:
        """The keywords for ``sglang.Engine``; unset options are left to SGLang's defaults."""
        kwargs: dict[str, Any] = {"model_path": self.model, "is_embedding": True}
        kwargs.update({k: v for k, v in self.options.items() if v is not None})
        kwargs.update(self.extra)
        return kwargs

    def load(self) -> None:
        try:
            import sglang
        except ImportError as e:
            raise EngineError(
                f"the sglang engine needs SGLang installed ({e}); use the GPU image or pip install 'embq[sglang]'"
            ) from e
        if threading.current_thread() is not threading.main_thread():
            log.warning("SGLang is created off the main thread: it cannot install its child-failure handler")
        kwargs = self.engine_kwargs()
        log.info("starting SGLang engine: %s", kwargs)
        kwargs["custom_sigquit_handler"] = self._on_child_failure
        try:
            self._engine = sglang.Engine(**kwargs)
        except TypeError as e:
            raise EngineError(f"sglang.Engine refused its options: {e}") from e
        self._loop = self._engine.loop
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="sglang-loop", daemon=True)
        self._loop_thread.start()
        manager = self._engine.tokenizer_manager
        # The scheduler refuses prompts of max_req_input_len tokens or more (it can be
        # below the context when the KV cache is small); the tokenizer manager refuses
        # prompts of context_len tokens or more. The lower of the two is our limit.
        limits = [manager.context_len, getattr(manager, "max_req_input_len", None)]
        self.max_tokens = int(min(limit for limit in limits if limit))
        self._tokenizer = _own_copy(manager.tokenizer)
        self._children = multiprocessing.active_children()  # SGLang's scheduler and detokenizer
        log.info("SGLang children: %s", [p.pid for p in self._children])
        probe = self._call(["embq warm-up"])
        self.dim = len(probe[0]["embedding"])
        log.info("SGLang engine ready: model=%s dim=%d context=%d", self.model, self.dim, self.max_tokens)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not self.truncate:
            self._refuse_too_long(texts)
        results = self._call(texts)
        refused = {
            i: f"SGLang aborted the request: {_abort_message(r)}"
            for i, r in enumerate(results)
            if not isinstance(r, dict) or "embedding" not in r
        }
        if refused:
            raise EngineItemErrors(refused)
        metrics.TOKENS_EMBEDDED.inc(sum(int(r.get("meta_info", {}).get("prompt_tokens", 0)) for r in results))
        vectors = np.asarray([r["embedding"] for r in results], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # Qwen3 pools normalised; others may not
        return np.divide(vectors, norms, out=vectors, where=norms > 0)

    def _call(self, texts: list[str]) -> list[dict[str, Any]]:
        if self._dead or self._loop is None or self._engine is None:
            raise EngineDead(self._dead or "SGLang engine is not running")
        future = asyncio.run_coroutine_threadsafe(self._engine.async_encode(prompt=texts), self._loop)
        with self._inflight_lock:
            self._inflight.add(future)
        try:
            result = future.result(timeout=self.call_timeout)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise EngineDead(f"SGLang did not answer {len(texts)} texts within {self.call_timeout:.0f}s") from e
        except concurrent.futures.CancelledError as e:
            raise EngineDead(self._dead or "SGLang call cancelled") from e
        finally:
            with self._inflight_lock:
                self._inflight.discard(future)
        return result if isinstance(result, list) else [result]

    def _on_child_failure(self, signum: int, frame: Any) -> None:
        """SGLang's children SIGQUIT us when they fail (a crash, a CUDA OOM in the scheduler).

        Its own handler would SIGKILL this whole process, leaving the batch to the
        visibility timeout; ours marks the engine dead so that the worker requeues
        its tasks at once and exits for its orchestrator to restart it.
        """
        self._dead = "an SGLang child process failed (SIGQUIT): scheduler crash or out of memory"
        threading.Thread(target=self._abort_inflight, name="sglang-abort", daemon=True).start()

    def _abort_inflight(self) -> None:
        log.critical("%s", self._dead)
        with self._inflight_lock:
            futures = list(self._inflight)
        for future in futures:
            future.cancel()

    def _refuse_too_long(self, texts: list[str]) -> None:
        """Fail texts of ``context_len`` tokens or more alone, as SGLang would fail their whole call."""
        if self._tokenizer is None:
            return
        with self._tokenizer_lock:  # a fast tokenizer must not be used from two threads at once
            ids = self._tokenizer(texts)["input_ids"]
        too_long = {
            i: (
                f"text is {len(tokens)} tokens, the model's context is {self.max_tokens} tokens; "
                "shorten it, or start the worker with EMBQ_TRUNCATE=1 to truncate"
            )
            for i, tokens in enumerate(ids)
            if len(tokens) >= self.max_tokens
        }
        if too_long:
            raise EngineItemErrors(too_long)

    def format_query(self, instruction: str, text: str) -> str:
        return apply_instruction(self.instruction_template, instruction, text)

    def healthy(self) -> bool:
        if self._dead or self._loop_thread is None or not self._loop_thread.is_alive():
            return False
        return all(child.is_alive() for child in self._children)

    def close(self) -> None:
        """Stop our loop first: SGLang's loop tasks kill the process if they fail while it runs."""
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _own_copy(tokenizer: Any) -> Any:
    """A private tokenizer: SGLang tokenizes with its own in its loop thread at the same time."""
    if tokenizer is None:
        return None
    try:
        return copy.deepcopy(tokenizer)
    except Exception as e:
        log.warning("cannot copy SGLang's tokenizer (%s); too-long texts will be isolated by bisection", e)
        return None


def _abort_message(result: Any) -> str:
    try:
        reason = result["meta_info"]["finish_reason"]
        return str(reason.get("message") or reason)
    except (KeyError, TypeError, AttributeError):
        return repr(result)[:200]
