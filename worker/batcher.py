"""One thread that owns the engine and feeds it texts coalesced from many concurrent tasks.

Tasks run on Celery's thread pool and each hands its texts to ``Batcher.embed``,
which blocks until they are done. The batcher thread fills one engine call up
to a token budget or a short wait, sorts it by length so that padded batches
waste little, and isolates failures: a call that raises is bisected until the
offending texts fail alone and their batch-mates succeed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from worker.engines import Engine

log = logging.getLogger(__name__)

#: Rough characters per token, to budget engine calls without tokenising twice.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 2


@dataclass
class Job:
    """The texts of one task, filled in by the batcher thread."""

    texts: list[str]
    vectors: list[np.ndarray | None] = field(init=False)
    errors: dict[int, str] = field(default_factory=dict)
    remaining: int = field(init=False)
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

    @property
    def text(self) -> str:
        return self.job.texts[self.index]


class BatcherStopped(RuntimeError):
    """Raised to tasks that submit after the batcher has stopped."""


class Batcher:
    """Coalesces texts of concurrent tasks into engine calls."""

    def __init__(self, engine: Engine, *, max_tokens: int, max_texts: int, max_wait: float) -> None:
        self.engine = engine
        #: Estimated tokens per engine call.
        self.max_tokens = max_tokens
        #: Texts per engine call.
        self.max_texts = max_texts
        #: Seconds to wait for company before calling an idle engine.
        self.max_wait = max_wait
        self.calls = 0
        self.texts_done = 0
        self._queue: deque[Item] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="embq-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def embed(self, texts: list[str]) -> Job:
        """Embed ``texts`` (already formatted for the engine); blocks until every one is done or failed."""
        job = Job(texts)
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the worker is shutting down")
            for index, text in enumerate(texts):
                item = Item(job, index, estimate_tokens(text), now)
                self._queue.append(item)
                self._queued_tokens += item.tokens
            self._cond.notify_all()
        job.done.wait()
        return job

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch.sort(key=lambda item: len(item.text))
            self.calls += 1
            self._encode(batch)

    def _next_batch(self) -> list[Item] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_wait
            while not self._full() and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Item] = []
            tokens = 0
            while self._queue and len(batch) < self.max_texts:
                item = self._queue[0]
                if batch and tokens + item.tokens > self.max_tokens:
                    break
                self._queue.popleft()
                self._queued_tokens -= item.tokens
                tokens += item.tokens
                batch.append(item)
            return batch

    def _full(self) -> bool:
        return len(self._queue) >= self.max_texts or self._queued_tokens >= self.max_tokens

    def _encode(self, batch: list[Item]) -> None:
        """Encode ``batch``; on failure bisect so only the items that raise fail."""
        try:
            vectors = self.engine.encode([item.text for item in batch])
            if vectors.shape != (len(batch), self.engine.dim) or not np.isfinite(vectors).all():
                raise ValueError(f"engine returned shape {vectors.shape} or non-finite values for {len(batch)} texts")
        except Exception as e:
            if len(batch) == 1:
                log.warning("text failed in the engine: %s: %s", type(e).__name__, e)
                self._finish(batch[0], None, f"{type(e).__name__}: {e}")
                return
            half = len(batch) // 2
            log.info("engine call of %d texts raised %s; bisecting", len(batch), type(e).__name__)
            self._encode(batch[:half])
            self._encode(batch[half:])
            return
        for item, vector in zip(batch, vectors, strict=False):
            self._finish(item, vector, None)

    def _finish(self, item: Item, vector: np.ndarray | None, error: str | None) -> None:
        job = item.job
        if vector is None:
            job.errors[item.index] = error or "failed"
        else:
            job.vectors[item.index] = vector
            self.texts_done += 1
        job.remaining -= 1
        if job.remaining == 0:
            job.done.set()
