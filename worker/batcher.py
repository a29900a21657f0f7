"""The threads that own the engine and feed it texts coalesced from many concurrent tasks.

Tasks run on Celery's thread pool and each hands its texts to ``Batcher.embed``,
which blocks until they are done. A runner thread fills one engine call up to a
token budget or a short wait (after a long call, a small share of that call),
sorts it by length so that padded batches waste little, and isolates failures:

- texts the engine refuses (``EngineItemErrors``) fail alone, the rest go again;
- out of memory splits the call in halves, and a lone text is retried with backoff;
- any other exception bisects the call until the texts that cause it fail alone;
- a dead engine (``EngineDead``, or ``healthy()`` false after an error) aborts
  every waiting task so that its message goes back to the queue, and tells the
  worker to stop taking work.

A call is made of slices of tasks, and results go back to a task's matrix a
slice at a time: no object per text, one lock per slice.
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
#: After an engine call, the share of its duration (at most ``LINGER_MAX`` seconds) that the next call
#: waits for company: the callers the last call answered come back within moments, and without the wait
#: a steady load splits into two halves that alternate in half-full calls.
LINGER_SHARE = 0.05
LINGER_MAX = 0.05


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


@dataclass(eq=False)
class Job:
    """The texts of one task; the runners fill ``matrix`` (rows where ``ok``) and ``errors``."""

    texts: list[str]
    #: Each text in an engine call of its own, with no other call beside it.
    alone: bool = False
    matrix: np.ndarray | None = None
    ok: np.ndarray = field(init=False)
    errors: dict[int, str] = field(default_factory=dict)
    remaining: int = field(init=False)
    aborted: str | None = None
    aborted_in_engine: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(init=False)
    #: Texts handed to runners so far.
    taken: int = 0

    def __post_init__(self) -> None:
        self.ok = np.zeros(len(self.texts), dtype=bool)
        self.remaining = len(self.texts)
        self.tokens = [estimate_tokens(t) for t in self.texts]
        if not self.texts:
            self.done.set()

    def vector(self, index: int) -> np.ndarray | None:
        return self.matrix[index] if self.matrix is not None and self.ok[index] else None


@dataclass
class Call:
    """One engine call: its texts sorted by length, and for each the task and row it came from."""

    texts: list[str]
    jobs: list[Job]
    rows: list[int]
    alone: bool

    def part(self, positions: list[int]) -> Call:
        return Call(
            [self.texts[p] for p in positions], [self.jobs[p] for p in positions], [self.rows[p] for p in positions],
            self.alone,
        )  # fmt: skip


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
        self._queue: deque[Job] = deque()  # jobs with texts not yet handed to a runner
        self._inflight: dict[int, Call] = {}  # the calls runner threads are encoding
        self._exclusive = False  # a lone suspect text is in the engine: no other call may run
        self._queued_texts = 0
        self._queued_tokens = 0
        self._last_call_ended = 0.0
        self._last_call_seconds = 0.0
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
        job = Job(texts, alone)
        with self._cond:
            if self._stopping or self.dead:
                raise BatcherStopped(self.dead or "the worker is shutting down")
            if texts:
                self._queue.append(job)
                self._queued_texts += len(texts)
                self._queued_tokens += sum(job.tokens)
                self._cond.notify_all()
        job.done.wait()
        if job.aborted:
            raise BatcherStopped(job.aborted, job.aborted_in_engine)
        return job

    def _run(self) -> None:
        while True:
            call = self._next_call()
            if call is None:
                return
            with self._cond:
                self.calls += 1
            started = time.monotonic()
            try:
                self._encode(call)
            except EngineDead as e:
                self._die(str(e) or "engine died")
            except Exception as e:  # a bug here must not strand the waiting tasks
                log.exception("batcher failed")
                self._die(f"batcher failed: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._last_call_ended = time.monotonic()
                    self._last_call_seconds = self._last_call_ended - started
                    del self._inflight[id(call)]
                    if call.alone:
                        self._exclusive = False
                    self._cond.notify_all()

    def _next_call(self) -> Call | None:
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
                linger = min(LINGER_SHARE * self._last_call_seconds, LINGER_MAX)
                deadline = max(self._queue[0].arrived + self.max_wait, self._last_call_ended + linger)
                while self._queue and not self._full() and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._queue and not self._exclusive:  # another runner may have taken it all meanwhile
                    if self._queue[0].alone:  # a suspect came first meanwhile: it runs alone (see above)
                        continue
                    return self._take(self.max_texts)

    def _take(self, most: int) -> Call:
        """Slice the next call off the queue (lock held): FIFO, within the budgets, never past a lone text."""
        slices: list[tuple[Job, int, int]] = []
        count = tokens = 0
        while self._queue and count < most:
            job = self._queue[0]
            if slices and job.alone:
                break
            start = end = job.taken
            limit = min(len(job.texts), start + most - count, start + 1 if job.alone else len(job.texts))
            while end < limit and (not (slices or end > start) or tokens + job.tokens[end] <= self.max_tokens):
                tokens += job.tokens[end]
                end += 1
            if end == start:
                break
            slices.append((job, start, end))
            count += end - start
            job.taken = end
            if end == len(job.texts):
                self._queue.popleft()
            if job.alone or end < len(job.texts):
                break
        self._queued_texts -= count
        self._queued_tokens -= tokens
        jobs: list[Job] = []
        rows: list[int] = []
        texts: list[str] = []
        for job, start, end in slices:
            jobs += [job] * (end - start)
            rows += range(start, end)
            texts += job.texts[start:end]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # padded batches waste little
        call = Call([texts[i] for i in order], [jobs[i] for i in order], [rows[i] for i in order], slices[0][0].alone)
        self._inflight[id(call)] = call
        return call

    def _full(self) -> bool:
        return self._queued_texts >= self.max_texts or self._queued_tokens >= self.max_tokens

    def _encode(self, call: Call, oom_attempt: int = 0) -> None:
        """Encode ``call``, isolating the texts that fail; raises ``EngineDead``."""
        if not call.texts:
            return
        metrics.ENGINE_BATCH_TEXTS.observe(len(call.texts))
        started = time.monotonic()
        try:
            vectors = self.engine.encode(call.texts)
            metrics.ENGINE_SECONDS.observe(time.monotonic() - started)
            if vectors.shape != (len(call.texts), self.engine.dim) or not np.isfinite(vectors).all():
                n = len(call.texts)
                raise ValueError(f"engine returned shape {vectors.shape} or non-finite values for {n} texts")
        except EngineItemErrors as e:
            refused = {i: msg for i, msg in e.errors.items() if 0 <= i < len(call.texts)}
            if not refused:
                raise EngineDead(f"engine refused texts it did not name: {e}") from e
            for i, msg in refused.items():
                self._fail(call.jobs[i], call.rows[i], msg)
            self._encode(call.part([i for i in range(len(call.texts)) if i not in refused]))
            return
        except EngineDead:
            raise
        except Exception as e:
            if not self.engine.healthy():
                raise EngineDead(f"engine unhealthy after {type(e).__name__}: {e}") from e
            if is_out_of_memory(e):
                self._on_out_of_memory(call, oom_attempt, e)
            elif len(call.texts) == 1:
                log.warning("text failed in the engine: %s: %s", type(e).__name__, e)
                self._fail(call.jobs[0], call.rows[0], f"{type(e).__name__}: {e}")
            else:
                log.info("engine call of %d texts raised %s; bisecting", len(call.texts), type(e).__name__)
                self._bisect(call)
            return
        if not self.engine.counts_tokens:
            metrics.TOKENS_EMBEDDED.inc(sum(estimate_tokens(text) for text in call.texts))
        self._place(call, vectors)

    def _bisect(self, call: Call) -> None:
        half = len(call.texts) // 2
        self._encode(call.part(list(range(half))))
        self._encode(call.part(list(range(half, len(call.texts)))))

    def _on_out_of_memory(self, call: Call, attempt: int, error: Exception) -> None:
        metrics.ERRORS.labels(metrics.OUT_OF_MEMORY).inc()
        if len(call.texts) > 1:
            half = len(call.texts) // 2
            log.warning("engine out of memory on %d texts; splitting into %d and %d", len(call.texts), half, half)
            self._bisect(call)
        elif attempt < OOM_RETRIES:
            delay = OOM_BACKOFF * 2**attempt
            log.warning("engine out of memory on a single text; retrying in %.1fs", delay)
            time.sleep(delay)
            self._encode(call, attempt + 1)
        else:
            self._fail(call.jobs[0], call.rows[0], f"out of memory even alone, after {OOM_RETRIES} retries: {error}")

    def _place(self, call: Call, vectors: np.ndarray) -> None:
        """Hand each task its rows: one numpy copy and one lock per task, not per text."""
        picks: dict[Job, tuple[list[int], list[int]]] = {}
        for position, (job, row) in enumerate(zip(call.jobs, call.rows, strict=True)):
            positions, rows = picks.setdefault(job, ([], []))
            positions.append(position)
            rows.append(row)
        with self._cond:
            for job, (positions, rows) in picks.items():
                if job.aborted:
                    continue
                if job.matrix is None:
                    job.matrix = np.empty((len(job.texts), vectors.shape[1]), dtype=np.float32)
                job.matrix[rows] = vectors[positions]
                job.ok[rows] = True
                self.texts_done += len(rows)
                self._settle(job, len(rows))
        metrics.TEXTS_EMBEDDED.inc(len(call.texts))

    def _fail(self, job: Job, row: int, error: str) -> None:
        with self._cond:
            if not job.aborted:
                job.errors[row] = error
                self._settle(job, 1)

    def _settle(self, job: Job, count: int) -> None:
        """``count`` more texts of ``job`` are done or failed (lock held)."""
        job.remaining -= count
        if job.remaining == 0:
            job.done.set()

    def _die(self, reason: str) -> None:
        """Abort every waiting task, in any runner's call or queued (their messages go back
        to the queue), and tell the worker."""
        log.critical("engine dead, aborting waiting tasks: %s", reason)
        with self._cond:
            first = self.dead is None
            self.dead = self.dead or reason
            in_engine = {id(job) for call in self._inflight.values() for job in call.jobs}
            jobs = {id(job): job for call in self._inflight.values() for job in call.jobs}
            jobs.update({id(job): job for job in self._queue})
            self._queue.clear()
            self._queued_texts = self._queued_tokens = 0
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
