"""The production engine: one in-process ``sglang.Engine(is_embedding=True)`` per GPU worker.

Written against sglang 0.5.23 (``srt/entrypoints/engine.py``,
``srt/managers/tokenizer_manager.py``, ``srt/managers/scheduler.py``) and tested
against that package itself, with only its scheduler process replaced by a CPU
one (``tests/sglang_cpu``). What this module relies on:

- ``Engine(**kwargs)`` builds a ``ServerArgs`` (a ``msgspec.Struct``) and raises
  ``TypeError("Unexpected keyword argument 'x'")`` for an unknown keyword, before
  any process starts. ``server_args`` is then pickled into the scheduler and
  detokenizer, which SGLang starts with the ``spawn`` method (forced for the
  whole process): every option must pickle. That is why the SIGQUIT handler we
  pass (``custom_sigquit_handler``) is the module-level ``on_child_failure``,
  which reaches the engine through module state, and not a bound method.
- Its launch calls ``configure_logger``: ``logging.basicConfig(force=True)`` at
  ``log_level`` (``"error"`` unless given), which removes the worker's log
  handlers and silences its INFO lines. ``keep_logging`` puts them back.
- A scheduler exception (a CUDA out-of-memory included) never reaches the
  caller: the scheduler logs it and SIGQUITs this process, and SGLang's watchdog
  does the same when a child dies. SGLang's own handler dumps diagnostics for a
  minute, then kills this process. Ours marks the engine dead and aborts the calls
  in flight; the worker requeues its tasks and exits with status 4, and texts
  that were in the engine are retried one by one (see ``embq.worker.tasks``).
- ``async_encode(prompt=list[str])`` returns one dict per prompt, in order:
  ``{"embedding": [...], "meta_info": {"prompt_tokens": ..., ...}}``. A prompt
  of ``context_len`` tokens or more makes the tokenizer manager raise
  ``ValueError("The input (N tokens) is longer than the model's context length
  (C tokens).")`` for the whole call, unless ``allow_auto_truncate``; the scheduler
  then cuts prompts of ``max_req_input_len`` tokens or more (``min(context - 1,
  KV pool - 1) - 5``) to that length. An abort with a status raises for the whole
  call too (``ValueError`` for 400, ``fastapi.HTTPException`` otherwise).
  ``allow_auto_truncate`` is engine-wide, and a task asks for the cut or not, so
  the engine always runs with it on: texts whose task wants them cut are cut by
  SGLang; the others are counted first (long ones only) and those over the
  limit fail alone. Anything else that fails a call is bisected by the batcher.
- The engine's ``loop`` is created in the constructing thread; sync ``encode``
  runs it with ``run_until_complete`` and cannot be called inside a running
  loop. We run that loop forever in one thread and submit ``async_encode`` calls
  to it, so several calls are in flight and SGLang's continuous batching keeps
  the GPU busy between them. The tokenizer manager installs its SIGTERM and
  SIGQUIT handlers only when its first request comes from the main thread,
  which never happens here, so Celery's warm shutdown stays in charge.
- ``shutdown()`` SIGKILLs every child of the calling process: one engine lives
  alone in one worker process.
- Qwen3-Embedding pools the last token and L2-normalises; SGLang's own
  ``dimensions`` needs ``is_matryoshka`` in the model config, so we always
  store the full vector and truncate on read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import importlib
import logging
import multiprocessing
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from embq.producer.errors import EngineError
from embq.worker import metrics
from embq.worker.engines import CUT_HINT, EngineDead, EngineItemErrors, TextsAsTheyAre, too_long
from embq.worker.engines.checkpoint import fingerprint, local_model_dir

log = logging.getLogger(__name__)

#: Qwen3-Embedding's query format; documents are embedded without an instruction.
QWEN3_INSTRUCTION = "Instruct: {instruction}\nQuery:{text}"
#: The class the worker hosts; a subclass of ``sglang.Engine`` may override its
#: process functions, as SGLang allows for private forks.
DEFAULT_ENGINE_CLASS = "sglang:Engine"
#: Tokens a tokenizer may add beyond one per UTF-8 byte (special tokens, a
#: SentencePiece prefix): a text of fewer bytes than the limit minus this
#: cannot be too long, and is never tokenised by us.
SPECIAL_TOKENS_MARGIN = 16
#: Seconds the first call may take: the detokenizer process may still be
#: importing when the scheduler reports ready.
WARMUP_TIMEOUT = 300.0

#: SGLang options that change what a checkpoint computes, beyond numeric precision. ``dtype`` is
#: left out: 16- and 32-bit floats give vectors within ~1e-3 of each other, as the cache's own
#: float16 storage does, while 8-bit or lower quantisation of weights or KV cache moves them
#: further, and the others pick other weights, tokenizer or architecture.
VECTOR_OPTIONS = ("quantization", "kv_cache_dtype", "json_model_override_args", "revision", "tokenizer_path")

#: The engine of this process, for the SIGQUIT handler (one engine per process).
_hosted: SGLangEngine | None = None


def on_child_failure(signum: int, frame: Any) -> None:
    """SIGQUIT from an SGLang child: its scheduler failed (a crash, a CUDA OOM) or died."""
    engine = _hosted
    if engine is None:
        log.critical("SIGQUIT from an SGLang child process, and no engine is hosted here")
        return
    engine.mark_dead("an SGLang child process failed (SIGQUIT): scheduler crash or out of memory")


@contextmanager
def keep_logging() -> Iterator[None]:
    """Undo SGLang's ``configure_logger`` (``basicConfig(force=True)``) on the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def load_class(path: str) -> Any:
    module_name, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name or "Engine")
    except ImportError as e:
        if module_name.split(".")[0] == "sglang":
            raise EngineError(
                f"the sglang engine needs SGLang ({e}): use the GPU image (worker/Dockerfile) "
                "or pip install 'embq[sglang]' on a CUDA machine"
            ) from e
        raise EngineError(f"cannot import the SGLang engine class {path!r}: {e}") from e
    except AttributeError as e:
        raise EngineError(f"no engine class {path!r}: {e}") from e


class SGLangEngine(TextsAsTheyAre):
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
        engine_class: str = DEFAULT_ENGINE_CLASS,
        attach_to: int | None = None,
        **_: Any,
    ) -> None:
        self.model = model
        #: The PID of a process hosting an engine with ``tokenizer_worker_num`` > 1: this one then joins it
        #: as one more tokenizer worker (``Engine.attach_tokenizer_worker``) instead of starting its own.
        self.attach_to = attach_to
        self.options: dict[str, Any] = {
            "mem_fraction_static": mem_fraction_static,
            "max_running_requests": max_running_requests,
            "chunked_prefill_size": chunked_prefill_size,
            "context_length": context_length,
            "tp_size": tp_size,
            "dtype": dtype,
            "load_format": load_format,
            "trust_remote_code": trust_remote_code,
            # Always: each task says whether its texts are cut (``encode_counted``'s ``cut``).
            "allow_auto_truncate": True,
            # One tokenizer call and one message per engine call instead of one per
            # text, in the process that also runs the queue (see docs/BENCHMARKS.md).
            "enable_tokenizer_batch_encode": True,
        }
        self.extra = dict(sglang_args or {})
        self.engine_class = engine_class
        #: Whether ``encode`` (a direct call, outside any task) cuts texts over the context.
        self.truncate = truncate
        self.instruction_template = instruction_template or QWEN3_INSTRUCTION
        self.call_timeout = call_timeout
        self.concurrent_calls = concurrent_calls
        self.counts_tokens = True
        #: SGLang packs the texts of a call and runs its own passes: a call is budgeted in tokens, unpadded.
        self.pads = False
        self.pass_tokens = 16384
        self.pass_texts = 512
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
        """The keywords for ``sglang.Engine``, exactly as passed (the SIGQUIT handler included)."""
        kwargs: dict[str, Any] = {"model_path": self.model, "is_embedding": True}
        kwargs.update({k: v for k, v in self.options.items() if v is not None})
        kwargs.update(self.extra)
        kwargs["custom_sigquit_handler"] = on_child_failure
        return kwargs

    def checkpoint(self) -> str | None:
        """The model directory's fingerprint (local, or SGLang's download in the Hugging Face cache once
        loaded) and the options that change the vectors; random weights (``load_format=dummy``) included."""
        directory = local_model_dir(self.model)
        if directory is not None:
            files = fingerprint(directory)
        elif self._engine is not None:
            files = f"hub:{self.model}"  # loaded from elsewhere (another hub): its id is all we know
        else:
            return None
        kwargs = self.engine_kwargs()
        options = {name: kwargs[name] for name in VECTOR_OPTIONS if kwargs.get(name) not in (None, "", "auto", "{}")}
        if kwargs.get("load_format") == "dummy":
            options["load_format"] = "dummy"
        return files + "".join(f" {name}={value}" for name, value in sorted(options.items()))

    def load(self) -> None:
        global _hosted
        engine_class = load_class(self.engine_class)
        if threading.current_thread() is not threading.main_thread():
            log.warning("SGLang is created off the main thread: it cannot install its child-failure handler")
        kwargs = self.engine_kwargs()
        # SGLang's loggers at SGLang's own level (``log_level``, "error" unless given):
        # ours stays at the worker's, which keep_logging restores.
        logging.getLogger("sglang").setLevel(str(kwargs.get("log_level", "error")).upper())
        try:
            with keep_logging():
                if self.attach_to is not None:
                    self._engine = engine_class.attach_tokenizer_worker(self.attach_to)
                else:
                    log.info("starting SGLang engine %s: %s", self.engine_class, kwargs)
                    _hosted = self
                    self._engine = engine_class(**kwargs)
        except TypeError as e:
            raise EngineError(f"sglang.Engine refused its options: {e}") from e
        except Exception as e:
            raise EngineError(f"SGLang engine did not start: {type(e).__name__}: {e}") from e
        self._loop = self._engine.loop
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="sglang-loop", daemon=True)
        self._loop_thread.start()
        manager = self._engine.tokenizer_manager
        # The tokenizer manager refuses prompts of context_len tokens or more; the
        # scheduler cuts (or, in other versions, refuses) those of max_req_input_len
        # or more, which is lower. The lower of the two is our limit.
        limits = [manager.context_len, getattr(manager, "max_req_input_len", None)]
        self.max_tokens = int(min(limit for limit in limits if limit))
        self._tokenizer = _own_copy(manager.tokenizer)
        if self.attach_to is None:
            self._children = multiprocessing.active_children()  # SGLang's scheduler and detokenizer
            log.info("SGLang children: %s", [p.pid for p in self._children])
        probe = self._call(["embq warm-up"], timeout=max(self.call_timeout, WARMUP_TIMEOUT))
        self.dim = len(probe[0]["embedding"])
        log.info("SGLang engine ready: model=%s dim=%d max input tokens=%d", self.model, self.dim, self.max_tokens)

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors, tokens = self.encode_counted(texts)
        metrics.TOKENS_EMBEDDED.inc(tokens)
        return vectors

    def encode_counted(self, texts: list[str], cut: list[bool] | None = None) -> tuple[np.ndarray, int]:
        """The vectors of ``texts`` and the tokens SGLang counted in them. ``cut[i]``: text i is cut at the
        context (SGLang does it), else refused there (we do); None: ``truncate`` for every text."""
        self._refuse_too_long(texts, [self.truncate] * len(texts) if cut is None else cut)
        results = self._call(texts)
        refused = {
            i: f"SGLang aborted the request: {_abort_message(r)}"
            for i, r in enumerate(results)
            if not isinstance(r, dict) or "embedding" not in r
        }
        if refused:
            raise EngineItemErrors(refused)
        tokens = sum(int(r.get("meta_info", {}).get("prompt_tokens", 0)) for r in results)
        vectors = np.asarray([r["embedding"] for r in results], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # Qwen3 pools normalised; others may not
        return np.divide(vectors, norms, out=vectors, where=norms > 0), tokens

    def _call(self, texts: list[str], timeout: float | None = None) -> list[dict[str, Any]]:
        if self._dead or self._loop is None or self._engine is None:
            raise EngineDead(self._dead or "SGLang engine is not running")
        future = asyncio.run_coroutine_threadsafe(self._engine.async_encode(prompt=texts), self._loop)
        with self._inflight_lock:
            self._inflight.add(future)
        limit = timeout or self.call_timeout
        try:
            result = future.result(timeout=limit)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise EngineDead(f"SGLang did not answer {len(texts)} texts within {limit:.0f}s") from e
        except concurrent.futures.CancelledError as e:
            raise EngineDead(self._dead or "SGLang call cancelled") from e
        finally:
            with self._inflight_lock:
                self._inflight.discard(future)
        return result if isinstance(result, list) else [result]

    def mark_dead(self, reason: str) -> None:
        """Called from the SIGQUIT handler: no blocking here, the aborts run in a thread."""
        self._dead = reason
        threading.Thread(target=self._abort_inflight, name="sglang-abort", daemon=True).start()

    def _abort_inflight(self) -> None:
        log.critical("%s", self._dead)
        with self._inflight_lock:
            futures = list(self._inflight)
        for future in futures:
            future.cancel()

    def _refuse_too_long(self, texts: list[str], cut: list[bool]) -> None:
        """Fail the texts not to be cut that SGLang would cut (it runs with ``allow_auto_truncate``), alone."""
        limit = self.max_tokens - SPECIAL_TOKENS_MARGIN
        suspects = [
            i for i, text in enumerate(texts) if not cut[i] and 4 * len(text) >= limit and len(text.encode()) >= limit
        ]
        if not suspects:
            return
        if self._tokenizer is None:  # not counted, SGLang would cut them silently: refuse what may be too long
            why = f"the input may be longer than this engine takes ({self.max_tokens - 1} tokens), and its tokens "
            raise EngineItemErrors(dict.fromkeys(suspects, f"{why}cannot be counted (SGLang's tokenizer); {CUT_HINT}"))
        with self._tokenizer_lock:  # a fast tokenizer must not be used from two threads at once
            ids = self._tokenizer([texts[i] for i in suspects])["input_ids"]
        refused = {
            i: too_long(len(tokens), self.max_tokens - 1, "this engine takes")
            for i, tokens in zip(suspects, ids, strict=True)
            if len(tokens) >= self.max_tokens
        }
        if refused:
            raise EngineItemErrors(refused)

    def healthy(self) -> bool:
        if self._dead or self._loop_thread is None or not self._loop_thread.is_alive():
            return False
        return all(child.is_alive() for child in self._children)

    def close(self) -> None:
        """Stop our loop first: SGLang's loop tasks kill the process if they fail while it runs."""
        global _hosted
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if _hosted is self:
            _hosted = None


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
