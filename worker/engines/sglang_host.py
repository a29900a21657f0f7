"""The worker's SGLang engine: ``sglang.Engine`` hosted in a process of its own, beside the worker's.

SGLang's front end, its tokenizer manager, runs in the process that creates the
engine and spends ~180 µs of Python per text there: a request state, an asyncio
task and an event per text, and the tokenizer (a small part of it). Hosted in
the worker's process, that shares one interpreter with the queue (Celery, the
batcher, Redis) and caps one GPU worker near 4,000 texts/s. Here the worker's
process only sends each pass's texts down a pipe and reads its vectors back
(a few µs per text, ``bench/sglang_tokenizer.py``), and SGLang's front end has a
core of its own. The host runs ``embq.worker.engines.sglang.SGLangEngine`` unchanged:
SGLang's children (scheduler, detokenizer) are the host's, and so is the
SIGQUIT they send when they fail.

SGLang's front end is one interpreter too. With ``tokenizer_worker_num`` above 1
(SGLang's own option, through ``EMBQ_SGLANG_ARGS``) the host starts that many
fronts: itself and processes that join its engine as SGLang tokenizer workers
(``Engine.attach_tokenizer_worker``), each answering the worker on a pipe of
its own; the worker sends each pass to the front with the fewest in flight.

The host lives as long as its worker: it ignores the terminal's Ctrl-C (the
worker decides when to stop and finishes the pass in flight first), exits when
its pipe closes, and is killed with its worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embq.producer.errors import EngineError
from embq.worker import metrics
from embq.worker.engines import EngineDead, EngineItemErrors, Prepared, TextsAsTheyAre, prepare_by_estimate
from embq.worker.engines.sglang import QWEN3_INSTRUCTION, WARMUP_TIMEOUT, SGLangEngine

log = logging.getLogger(__name__)

#: Seconds the worker waits for an answer beyond the engine's own call timeout, which the host enforces.
ANSWER_MARGIN = 30.0
#: Seconds ``close`` waits for the host to shut SGLang down before it kills the host.
CLOSE_TIMEOUT = 60.0
#: Seconds the host waits for each of SGLang's children to be gone after SGLang's shutdown killed them.
CHILD_EXIT_TIMEOUT = 10.0
#: ``prctl`` option that signals a process when its parent dies (Linux).
PR_SET_PDEATHSIG = 1
#: Most seconds the host's main thread blocks on its pipe: a signal the kernel hands to another of its
#: threads (SGLang's SIGQUIT, any of them may take it) runs its Python handler only once the main thread
#: runs Python again, and after the last call of a worker that waits for its answers, none would come.
SIGNAL_LOOK = 0.5
LOG_FORMAT = "[%(asctime)s: %(levelname)s/sglang-host] %(name)s: %(message)s"


class HostedCallFailed(Exception):
    """An engine call failed in the host with an exception that is not the engine's verdict on texts:
    the batcher bisects the call, as it would in process. Carries the original type's name."""


@dataclass
class Front:
    """One of the host's fronts, as the worker sees it: its pipe, and the calls it has in flight."""

    connection: multiprocessing.connection.Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    calls: dict[int, concurrent.futures.Future[Any]] = field(default_factory=dict)


class SGLangHostEngine(TextsAsTheyAre):
    """The ``sglang`` engine of a worker; takes the options of ``SGLangEngine``."""

    name = "sglang"
    counts_tokens = True
    pads = False

    def __init__(self, model: str, **options: Any) -> None:
        #: Never loaded here: it answers what is known before the load (options, checkpoint of a local model).
        self.spec = SGLangEngine(model, **options)
        self.model = model
        self.options = options
        self.truncate = self.spec.truncate
        self.instruction_template = self.spec.instruction_template or QWEN3_INSTRUCTION
        self.call_timeout = self.spec.call_timeout
        self.pass_tokens = self.spec.pass_tokens
        self.pass_texts = self.spec.pass_texts
        self.fronts_wanted = max(1, int(self.spec.engine_kwargs().get("tokenizer_worker_num") or 1))
        #: Every front keeps the engine's calls in flight, so SGLang batches across fronts.
        self.concurrent_calls = self.spec.concurrent_calls * self.fronts_wanted
        self.dim = 0
        self.max_tokens = 0
        self.host_pid: int | None = None
        self._checkpoint: str | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._fronts: list[Front] = []
        self._lock = threading.Lock()
        self._last_call = 0
        self._dead: str | None = None

    def engine_kwargs(self) -> dict[str, Any]:
        return self.spec.engine_kwargs()

    def checkpoint(self) -> str | None:
        return self._checkpoint or self.spec.checkpoint()

    def load(self) -> None:
        context = multiprocessing.get_context("spawn")  # what SGLang forces anyway; CUDA cannot fork
        pipes = [context.Pipe(duplex=True) for _ in range(self.fronts_wanted)]
        level = logging.getLogger().getEffectiveLevel()
        process = context.Process(
            target=serve,
            args=([theirs for _, theirs in pipes], self.model, self.options, level, os.getpid()),
            name="embq-sglang-host",
            daemon=False,
        )
        process.start()
        for _, theirs in pipes:
            theirs.close()
        self._process, self.host_pid = process, process.pid
        self._fronts = [Front(ours) for ours, _ in pipes]
        log.info("SGLang host process: %d", process.pid)
        try:
            for front in self._fronts:
                self._wait_ready(front.connection, process)
        except BaseException:
            self.close()
            raise
        for number, front in enumerate(self._fronts):
            reader = threading.Thread(target=self._read_answers, args=(front,), name=f"sglang-front-{number}")
            reader.daemon = True
            reader.start()

    def _wait_ready(self, connection: multiprocessing.connection.Connection, process: Any) -> None:
        limit = WARMUP_TIMEOUT + self.call_timeout
        try:
            if not connection.poll(limit):
                raise EngineError(f"the SGLang host process did not start within {limit:.0f}s")
            kind, found = connection.recv()
        except (EOFError, OSError) as e:
            process.join(timeout=5)
            raise EngineError(f"the SGLang host process exited while starting (exit code {process.exitcode})") from e
        if kind != "ready":
            raise EngineError(found)
        self.dim, self.max_tokens = found["dim"], found["max_tokens"]
        self._checkpoint = self._checkpoint or found["checkpoint"]

    def prepare(self, texts: list[str], truncate: bool = False) -> Prepared:
        """Each input is ``(text, cut)``: the host cuts or refuses it there, since only it counts tokens."""
        prepared = prepare_by_estimate(texts)
        return prepared._replace(inputs=[(text, truncate) for text in texts])

    def encode_prepared(self, inputs: list[Any]) -> np.ndarray:
        return self._encode([text for text, _ in inputs], [cut for _, cut in inputs])

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, [self.truncate] * len(texts))

    def _encode(self, texts: list[str], cut: list[bool]) -> np.ndarray:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._dead or not self._fronts:
                raise EngineDead(self._dead or "SGLang host process is not running")
            self._last_call += 1
            call = self._last_call
            turn = call % len(self._fronts)  # ties go round
            front = min(self._fronts[turn:] + self._fronts[:turn], key=lambda f: len(f.calls))
            front.calls[call] = future
        try:
            with front.send_lock:
                front.connection.send(("encode", call, (texts, cut)))
            kind, *found = future.result(timeout=self.call_timeout + ANSWER_MARGIN)
        except (OSError, ValueError) as e:  # the pipe broke under the send
            self._mark_dead(f"SGLang host process unreachable: {e}")
            raise EngineDead(self._dead or "SGLang host process unreachable") from e
        except concurrent.futures.TimeoutError as e:
            self._mark_dead(f"the SGLang host process did not answer {len(texts)} texts in time")
            raise EngineDead(self._dead or "SGLang host process silent") from e
        finally:
            with self._lock:
                front.calls.pop(call, None)
        if kind == "done":
            vectors, tokens = found
            metrics.TOKENS_EMBEDDED.inc(tokens)
            return vectors  # type: ignore[no-any-return]
        if kind == "refused":
            raise EngineItemErrors(found[0])
        if kind == "dead":
            self._mark_dead(found[0])
            raise EngineDead(found[0])
        raise HostedCallFailed(found[0])

    def _read_answers(self, front: Front) -> None:
        """Hand each answer of ``front`` to its caller; a closed pipe is a dead engine."""
        while True:
            try:
                call, answer = front.connection.recv()
            except (EOFError, OSError):
                process = self._process
                if process is not None:
                    process.join(timeout=5)
                code = process.exitcode if process is not None else None
                self._mark_dead(f"the SGLang host process or one of its fronts exited (host exit code {code})")
                return
            with self._lock:
                future = front.calls.get(call)
            if future is not None and not future.done():
                future.set_result(answer)

    def _mark_dead(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            calls = [future for front in self._fronts for future in front.calls.values()]
        for future in calls:
            if not future.done():
                future.set_result(("dead", self._dead))

    def healthy(self) -> bool:
        return self._dead is None and self._process is not None and self._process.is_alive()

    def close(self) -> None:
        """Ask the fronts, then the host, to stop (the host shuts SGLang down), then make sure they are gone."""
        process = self._process
        if process is None:
            return
        for front in reversed(self._fronts):  # the host's own front, the first, last
            try:
                with front.send_lock:
                    front.connection.send(("close", None, None))
            except (OSError, ValueError):
                pass
        process.join(timeout=CLOSE_TIMEOUT)
        if process.is_alive():
            log.warning("the SGLang host process did not stop within %.0fs: killing it", CLOSE_TIMEOUT)
            process.kill()
            process.join(timeout=10)
        self._mark_dead("SGLang host process closed")
        for front in self._fronts:
            front.connection.close()


def serve(
    connections: list[multiprocessing.connection.Connection],
    model: str,
    options: dict[str, Any],
    level: int,
    worker: int,
) -> None:
    """The host process: load the engine, start the other fronts, answer on the first pipe until ``close``."""
    begin_process(worker, level)
    engine = SGLangEngine(model, **options)
    if not load_or_say(engine, connections[0]):
        return
    context = multiprocessing.get_context("spawn")
    host = os.getpid()
    fronts = [
        context.Process(target=serve_front, args=(pipe, model, options, level, host), name="embq-sglang-front")
        for pipe in connections[1:]
    ]
    for front, connection in zip(fronts, connections[1:], strict=True):
        front.start()
        connection.close()  # the front's own now: its death must close the worker's end
    if fronts:
        log.info("SGLang front processes: %s", [front.pid for front in fronts])
    try:
        answer_calls(engine, connections[0])
    finally:
        for front in fronts:  # told to close by the worker; SGLang's shutdown below kills what is left
            front.join(timeout=CHILD_EXIT_TIMEOUT)
        engine.close()
        for child in multiprocessing.active_children():  # killed by SGLang's shutdown: reaped here, not by init
            child.join(timeout=CHILD_EXIT_TIMEOUT)
        os._exit(0)  # SGLang's threads are not ours to join


def serve_front(
    connection: multiprocessing.connection.Connection, model: str, options: dict[str, Any], level: int, host: int
) -> None:
    """A front process: joins the host's engine as an SGLang tokenizer worker and answers on its pipe."""
    begin_process(host, level)
    engine = SGLangEngine(model, attach_to=host, **options)
    if not load_or_say(engine, connection):
        return
    try:
        answer_calls(engine, connection)
    finally:
        engine.close()
        os._exit(0)


def begin_process(parent: int, level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with(parent)
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def load_or_say(engine: SGLangEngine, connection: multiprocessing.connection.Connection) -> bool:
    """Load ``engine`` and say on ``connection`` whether it is ready (its dimension and limits) or why not."""
    try:
        engine.load()
    except Exception as e:
        connection.send(("failed", str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"))
        engine.close()
        return False
    connection.send(("ready", {"dim": engine.dim, "max_tokens": engine.max_tokens, "checkpoint": engine.checkpoint()}))
    return True


def answer_calls(engine: SGLangEngine, connection: multiprocessing.connection.Connection) -> None:
    """Answer ``encode`` calls from ``connection`` on threads, ``concurrent_calls`` at once, until ``close``
    or a closed pipe."""
    send_lock = threading.Lock()

    def answer(call: int, texts: list[str], cut: list[bool]) -> None:
        try:
            vectors, tokens = engine.encode_counted(texts, cut)
            reply: tuple[Any, ...] = ("done", vectors, tokens)
        except EngineItemErrors as e:
            reply = ("refused", e.errors)
        except EngineDead as e:
            reply = ("dead", str(e))
        except Exception as e:
            reply = ("failed", f"{type(e).__name__}: {e}")
        with send_lock:
            try:
                connection.send((call, reply))
            except (OSError, ValueError):
                pass  # the worker is gone; the closed pipe ends the loop below

    calls = concurrent.futures.ThreadPoolExecutor(max(1, engine.concurrent_calls), thread_name_prefix="sglang-call")
    try:
        while True:
            try:
                if not connection.poll(SIGNAL_LOOK):
                    continue  # back in Python: a pending SIGQUIT's handler runs now
                kind, call, inputs = connection.recv()
            except (EOFError, OSError):
                log.warning("the worker closed its pipe: stopping")
                break
            if kind == "close":
                break
            calls.submit(answer, call, *inputs)
    finally:
        calls.shutdown(wait=False, cancel_futures=True)


def die_with(parent: int) -> None:
    """SIGKILL when ``parent`` dies, however it dies; SGLang's own children follow their parent, the host."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call: nobody would signal us
        os._exit(1)
