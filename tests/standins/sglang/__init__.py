"""A stand-in for ``sglang`` 0.5.23's offline ``Engine`` in embedding mode, for tests without a GPU.

It mirrors ``srt/entrypoints/engine.py`` and ``srt/managers/tokenizer_manager.py``
of sglang 0.5.23 where embq depends on them:

- ``Engine(**kwargs)``: only keywords; each must be a ``ServerArgs`` field
  (``server_args_fields.txt``, the 546 names of 0.5.23), else
  ``TypeError("Unexpected keyword argument 'x'")``; ``model_path`` is required
  (``TypeError("Missing required argument 'model_path'")``); ``log_level``
  defaults to ``"error"``. It forces the ``spawn`` start method, starts a
  scheduler child process, installs the launch-phase SIGQUIT handler on the
  main thread (kill this process and its children), and watches the child like
  ``SubprocessWatchdog``: a dead child SIGQUITs this process.
- ``tokenizer_manager.tokenizer`` (the model directory's Hugging Face tokenizer)
  and ``tokenizer_manager.context_len`` (``context_length`` or the model config's
  ``max_position_embeddings``); ``loop``, the event loop created by the
  constructing thread.
- ``encode``/``async_encode`` with the real parameters; a str gives one dict,
  a list a list of dicts in order: ``{"embedding": [...], "meta_info": {"id",
  "finish_reason": {"type": "length", "length": 0}, "prompt_tokens",
  "weight_version", "num_retractions", "e2e_latency",
  "response_sent_to_client_ts"}}``. A prompt of ``context_len`` tokens or more
  raises the real ``ValueError`` unless ``allow_auto_truncate`` (then it is cut
  to ``context_len`` tokens); ``dimensions`` without ``is_matryoshka`` raises
  the real ``ValueError``; ``is_embedding=False`` raises on encode.
- ``shutdown()`` SIGKILLs every child of the calling process
  (``kill_process_tree(os.getpid(), include_parent=False)``).

Vectors are deterministic: last-token-pooling is imitated by a unit vector
seeded from the token ids, of the config's ``hidden_size``, so truncation
changes the vector as it would on a real model.

Faults for tests, read from the environment at each call:
``EMBQ_STANDIN_DELAY`` (seconds per call), ``EMBQ_STANDIN_POISON`` (a
substring whose call makes the scheduler fail: SIGQUIT to this process, as
SGLang's scheduler does on any exception), ``EMBQ_STANDIN_OOM_ABOVE`` (calls
with more prompts fail the same way, as a CUDA OOM in the scheduler does),
``EMBQ_STANDIN_HANG`` (a substring that makes the call never return),
``EMBQ_STANDIN_DIE`` (a substring that kills the scheduler process; the
watchdog then SIGQUITs this process).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

__version__ = "0.5.23"

FIELDS = frozenset(
    line.strip()
    for line in (Path(__file__).parent / "server_args_fields.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


def kill_process_tree(parent_pid: int, include_parent: bool = True) -> None:
    import psutil

    itself = psutil.Process(parent_pid)
    children = itself.children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=60)
    if include_parent:
        itself.kill()
        sys.exit(0)


def _scheduler(ready: Any) -> None:
    # Like SGLang's kill_itself_when_parent_died(): never outlive the engine's process.
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    ready.send("ready")
    while True:
        time.sleep(3600)


def standin_embedding(token_ids: list[int], dim: int) -> np.ndarray:
    """The vector this stand-in returns for a prompt with these token ids."""
    seed = int.from_bytes(
        hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=8).digest(), "little"
    )
    vector = np.random.default_rng(seed).standard_normal(dim)
    return vector / np.linalg.norm(vector)


class _TokenizerManager:
    def __init__(self, server_args: SimpleNamespace) -> None:
        from transformers import AutoTokenizer

        path = server_args.tokenizer_path or server_args.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = json.loads((Path(server_args.model_path) / "config.json").read_text())
        overrides = json.loads(server_args.json_model_override_args or "{}")
        config.update(overrides)
        self.model_config = SimpleNamespace(
            hidden_size=int(config["hidden_size"]),
            is_matryoshka=bool(config.get("is_matryoshka") or config.get("matryoshka_dimensions")),
        )
        self.context_len = int(server_args.context_length or config.get("max_position_embeddings", 512))


class Engine:
    def __init__(self, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in FIELDS:
                raise TypeError(f"Unexpected keyword argument '{name}'")
        if "model_path" not in kwargs:
            raise TypeError("Missing required argument 'model_path'")
        kwargs.setdefault("log_level", "error")
        defaults = {
            "tokenizer_path": None,
            "is_embedding": False,
            "context_length": None,
            "allow_auto_truncate": False,
            "json_model_override_args": "{}",
        }
        self.server_args = SimpleNamespace(**{**defaults, **kwargs})
        self.tokenizer_manager: _TokenizerManager | None = None
        atexit.register(self.shutdown)
        mp.set_start_method("spawn", force=True)
        if threading.current_thread() is threading.main_thread():
            handler = kwargs.get("custom_sigquit_handler") or self._launch_phase_sigquit_handler
            signal.signal(signal.SIGQUIT, handler)
        receive, send = mp.Pipe(duplex=False)
        self._scheduler = mp.Process(target=_scheduler, args=(send,))
        self._scheduler.start()
        receive.recv()
        self._stop_watchdog = threading.Event()
        threading.Thread(target=self._watch_children, name="SubprocessWatchdog", daemon=True).start()
        self.tokenizer_manager = _TokenizerManager(self.server_args)
        self.loop = self._ensure_event_loop()

    @staticmethod
    def _launch_phase_sigquit_handler(signum: int, frame: Any) -> None:
        print("Received sigquit from a child process. It usually means the child failed.", file=sys.stderr)
        kill_process_tree(os.getpid())

    def _watch_children(self) -> None:
        while not self._stop_watchdog.wait(0.2):
            if not self._scheduler.is_alive():
                os.kill(os.getpid(), signal.SIGQUIT)
                return

    @staticmethod
    def _ensure_event_loop() -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop

    def encode(
        self,
        prompt: Any,
        image_data: Any = None,
        audio_data: Any = None,
        video_data: Any = None,
        dimensions: int | None = None,
        lora_path: Any = None,
        embed_override_token_id: int | None = None,
        embed_overrides: Any = None,
        external_trace_header: dict | None = None,
        rid: Any = None,
    ) -> Any:
        coroutine = self.async_encode(
            prompt,
            image_data,
            audio_data,
            video_data,
            dimensions,
            lora_path,
            embed_override_token_id,
            embed_overrides,
            external_trace_header,
            rid,
        )
        return self.loop.run_until_complete(coroutine)

    async def async_encode(
        self,
        prompt: Any,
        image_data: Any = None,
        audio_data: Any = None,
        video_data: Any = None,
        dimensions: int | None = None,
        lora_path: Any = None,
        embed_override_token_id: int | None = None,
        embed_overrides: Any = None,
        external_trace_header: dict | None = None,
        rid: Any = None,
    ) -> Any:
        args = self.server_args
        manager = self.tokenizer_manager
        assert manager is not None
        if prompt is None:
            raise ValueError("At least one of text, input_ids, image, video, or audio should be provided")
        if not args.is_embedding:
            raise ValueError(
                "This model does not appear to be an embedding model by default. "
                "Please add `--is-embedding` when launching the server or try another model."
            )
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            return []
        if dimensions is not None and not manager.model_config.is_matryoshka:
            raise ValueError(
                f"Model '{args.model_path}' does not support matryoshka representation, "
                "changing output dimensions will lead to poor results."
            )
        await self._faults(prompts)
        start = time.time()
        results = []
        for text in prompts:
            ids = manager.tokenizer(text)["input_ids"]
            if len(ids) >= manager.context_len:
                if not args.allow_auto_truncate:
                    raise ValueError(
                        f"The input ({len(ids)} tokens) is longer than the "
                        f"model's context length ({manager.context_len} tokens)."
                    )
                del ids[manager.context_len :]
            vector = standin_embedding(ids, manager.model_config.hidden_size)
            if dimensions is not None:
                vector = vector[:dimensions] / np.linalg.norm(vector[:dimensions])
            now = time.time()
            results.append(
                {
                    "embedding": vector.tolist(),
                    "meta_info": {
                        "id": uuid.uuid4().hex,
                        "finish_reason": {"type": "length", "length": 0},
                        "prompt_tokens": len(ids),
                        "weight_version": "default",
                        "num_retractions": 0,
                        "e2e_latency": now - start,
                        "response_sent_to_client_ts": now,
                    },
                }
            )
        return results[0] if single else results

    async def _faults(self, prompts: list[str]) -> None:
        env = os.environ
        if env.get("EMBQ_STANDIN_DIE") and any(env["EMBQ_STANDIN_DIE"] in p for p in prompts):
            self._scheduler.kill()
            await asyncio.Event().wait()  # the watchdog's SIGQUIT ends this process
        if env.get("EMBQ_STANDIN_HANG") and any(env["EMBQ_STANDIN_HANG"] in p for p in prompts):
            await asyncio.Event().wait()
        poisoned = env.get("EMBQ_STANDIN_POISON") and any(env["EMBQ_STANDIN_POISON"] in p for p in prompts)
        too_big = env.get("EMBQ_STANDIN_OOM_ABOVE") and len(prompts) > int(env["EMBQ_STANDIN_OOM_ABOVE"])
        if poisoned or too_big:
            # SGLang's scheduler catches the CUDA error or OOM, logs "Scheduler hit an
            # exception" and SIGQUITs its parent; the request itself never answers.
            print("Scheduler hit an exception: CUDA error (stand-in)", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGQUIT)
            await asyncio.Event().wait()
        if env.get("EMBQ_STANDIN_DELAY"):
            await asyncio.sleep(float(env["EMBQ_STANDIN_DELAY"]))

    def shutdown(self) -> None:
        if getattr(self, "_stop_watchdog", None) is not None:
            self._stop_watchdog.set()
        kill_process_tree(os.getpid(), include_parent=False)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.shutdown()
        return False
