"""The threads that own the engine and feed it texts coalesced from many concurrent tasks.

Tasks run on Celery's thread pool and each hands its texts to ``Batcher.embed``,
which blocks until they are done. A runner thread fills one engine call up to a
token budget or a short wait, sorts it by length so that padded batches waste
little, and isolates failures:

- texts the engine refuses (``EngineItemErrors``) fail alone, the rest go again;
- out of memory splits the call in halves, and a lone text is retried with backoff;
- any other exception bisects the call until the texts that cause it fail alone;
- a dead engine (``EngineDead``, or ``healthy()`` false after an error) aborts
  every waiting task so that its message goes back to the queue, and tells the
  worker to stop taking work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from worker import metrics
from worker.engines import Engine, EngineDead, EngineItemErrors, is_out_of_memory

log = logging.getLogger(__name__)

#: Rough characters per token, to budget engine calls without tokenising twice.
CHARS_PER_TOKEN = 4
#: Retries of a lone text that ran out of memory, and the first backoff in seconds (doubling).
OOM_RETRIES = 3
OOM_BACKOFF = 0.5


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 2


class BatcherStopped(RuntimeError):
    """Raised to a task whose texts were not embedded because the worker stops or its engine died.

    ``in_engine`` tells whether its texts were inside the engine call that died
    (they may be the cause) or only waiting for one (they are not).
    """

    def __init__(self, message: str, in_engine: bool = False) -> None:
        super().__init__(message)
        self.in_engine = in_engine


@dataclass
class Job:
    """The texts of one task, filled in by the runner threads."""

    texts: list[str]
    vectors: list[np.ndarray | None] = field(init=False)
    errors: dict[int, str] = field(default_factory=dict)
    remaining: int = field(init=False)
    aborted: str | None = None
    aborted_in_engine: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.texts)
        self.remaining = len(self.texts)
        if not self.texts:
            self.done.set()


@dataclass
class Item:
    job: Job
    index: int
    tokens: int
    arrived: float
    alone: bool = False

    @property
    def text(self) -> str:
        return self.job.texts[self.index]


class Batcher:
    """Coalesces texts of concurrent tasks into engine calls."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_tokens: int,
        max_texts: int,
        max_wait: float,
        on_dead: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        #: Estimated tokens per engine call.
        self.max_tokens = max_tokens
        #: Texts per engine call.
        self.max_texts = max_texts
        #: Seconds to wait for company before calling an idle engine.
        self.max_wait = max_wait
        self.on_dead = on_dead
        self.calls = 0
        self.texts_done = 0
        self.dead: str | None = None
        self._queue: deque[Item] = deque()
        self._inflight: dict[int, list[Item]] = {}  # the batches runner threads are encoding
        self._exclusive = False  # a lone suspect text is in the engine: no other call may run
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        runners = max(1, int(getattr(engine, "concurrent_calls", 1)))
        self._threads = [
            threading.Thread(target=self._run, name=f"embq-batcher-{n}", daemon=True) for n in range(runners)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the runner threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def embed(self, texts: list[str], alone: bool = False) -> Job:
        """Embed ``texts`` (formatted for the engine); blocks until every one is done or failed.

        ``alone`` gives each text an engine call of its own (texts suspected of
        killing an engine must not take others down with them). Raises
        ``BatcherStopped`` when the texts were not embedded and the task should
        be requeued.
        """
        job = Job(texts)
        now = time.monotonic()
        with self._cond:
            if self._stopping or self.dead:
                raise BatcherStopped(self.dead or "the worker is shutting down")
            for index, text in enumerate(texts):
                item = Item(job, index, estimate_tokens(text), now, alone)
                self._queue.append(item)
                self._queued_tokens += item.tokens
            self._cond.notify_all()
        job.done.wait()
        if job.aborted:
            raise BatcherStopped(job.aborted, job.aborted_in_engine)
        return job

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch.sort(key=lambda item: len(item.text))
            with self._cond:
                self.calls += 1
            try:
                self._encode(batch)
            except EngineDead as e:
                self._die(str(e) or "engine died")
            except Exception as e:  # a bug here must not strand the waiting tasks
                log.exception("batcher failed")
                self._die(f"batcher failed: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    del self._inflight[id(batch)]
                    if batch[0].alone:
                        self._exclusive = False
                    self._cond.notify_all()

    def _next_batch(self) -> list[Item] | None:
        with self._cond:
            while True:
                while not self._queue or self._exclusive:
                    if self.dead or (self._stopping and not self._queue):
                        return None
                    self._cond.wait()
                if self._queue[0].alone:
                    if self._inflight:  # a suspect text runs with no other call beside it
                        self._cond.wait()
                        continue
                    self._exclusive = True
                    return self._take(1)
                deadline = self._queue[0].arrived + self.max_wait
                while self._queue and not self._full() and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._queue and not self._exclusive:  # another runner may have taken it all meanwhile
                    return self._take(self.max_texts)

    def _take(self, most: int) -> list[Item]:
        """Pop the next call's items (lock held): FIFO, within the budgets, never past a lone item."""
        batch: list[Item] = []
        tokens = 0
        while self._queue and len(batch) < most:
            item = self._queue[0]
            if batch and (item.alone or tokens + item.tokens > self.max_tokens):
                break
            self._queue.popleft()
            self._queued_tokens -= item.tokens
            tokens += item.tokens
            batch.append(item)
        self._inflight[id(batch)] = batch
        return batch

    def _full(self) -> bool:
        return len(self._queue) >= self.max_texts or self._queued_tokens >= self.max_tokens

    def _encode(self, batch: list[Item], oom_attempt: int = 0) -> None:
        """Encode ``batch``, isolating the texts that fail; raises ``EngineDead``."""
        if not batch:
            return
        metrics.ENGINE_BATCH_TEXTS.observe(len(batch))
        started = time.monotonic()
        try:
            vectors = self.engine.encode([item.text for item in batch])
            metrics.ENGINE_SECONDS.observe(time.monotonic() - started)
            if vectors.shape != (len(batch), self.engine.dim) or not np.isfinite(vectors).all():
                raise ValueError(f"engine returned shape {vectors.shape} or non-finite values for {len(batch)} texts")
        except EngineItemErrors as e:
            refused = {i: msg for i, msg in e.errors.items() if 0 <= i < len(batch)}
            if not refused:
                raise EngineDead(f"engine refused texts it did not name: {e}") from e
            for i, msg in refused.items():
                self._finish(batch[i], None, msg)
            rest = [item for i, item in enumerate(batch) if i not in refused]
            if rest:
                self._encode(rest)
            return
        except EngineDead:
            raise
        except Exception as e:
            if not self.engine.healthy():
                raise EngineDead(f"engine unhealthy after {type(e).__name__}: {e}") from e
            if is_out_of_memory(e):
                self._on_out_of_memory(batch, oom_attempt, e)
            elif len(batch) == 1:
                log.warning("text failed in the engine: %s: %s", type(e).__name__, e)
                self._finish(batch[0], None, f"{type(e).__name__}: {e}")
            else:
                log.info("engine call of %d texts raised %s; bisecting", len(batch), type(e).__name__)
                half = len(batch) // 2
                self._encode(batch[:half])
                self._encode(batch[half:])
            return
        if not self.engine.counts_tokens:
            metrics.TOKENS_EMBEDDED.inc(sum(estimate_tokens(item.text) for item in batch))
        for item, vector in zip(batch, vectors, strict=True):
            self._finish(item, vector, None)

    def _on_out_of_memory(self, batch: list[Item], attempt: int, error: Exception) -> None:
        metrics.ERRORS.labels(metrics.OUT_OF_MEMORY).inc()
        if len(batch) > 1:
            half = len(batch) // 2
            log.warning(
                "engine out of memory on %d texts; splitting into %d and %d", len(batch), half, len(batch) - half
            )
            self._encode(batch[:half])
            self._encode(batch[half:])
        elif attempt < OOM_RETRIES:
            delay = OOM_BACKOFF * 2**attempt
            log.warning("engine out of memory on a single text; retrying in %.1fs", delay)
            time.sleep(delay)
            self._encode(batch, attempt + 1)
        else:
            self._finish(batch[0], None, f"out of memory even alone, after {OOM_RETRIES} retries: {error}")

    def _finish(self, item: Item, vector: np.ndarray | None, error: str | None) -> None:
        with self._cond:
            job = item.job
            if job.aborted:
                return
            if vector is None:
                job.errors[item.index] = error or "failed"
            else:
                job.vectors[item.index] = vector
                self.texts_done += 1
                metrics.TEXTS_EMBEDDED.inc()
            job.remaining -= 1
            if job.remaining == 0:
                job.done.set()

    def _die(self, reason: str) -> None:
        """Abort every waiting task, in any runner's call or queued (their messages go back
        to the queue), and tell the worker."""
        log.critical("engine dead, aborting waiting tasks: %s", reason)
        with self._cond:
            first = self.dead is None
            self.dead = self.dead or reason
            in_engine = {id(item.job) for batch in self._inflight.values() for item in batch}
            items = [item for batch in self._inflight.values() for item in batch] + list(self._queue)
            jobs = {id(item.job): item.job for item in items}
            self._queue.clear()
            self._queued_tokens = 0
            for key, job in jobs.items():
                if not job.done.is_set():
                    job.aborted = f"engine dead: {reason}"
                    job.aborted_in_engine = key in in_engine
                    job.done.set()
            self._cond.notify_all()
        if first:
            metrics.ERRORS.labels(metrics.ENGINE_DEAD).inc()
        if first and self.on_dead is not None:
            self.on_dead(reason)
