"""The threads that own the engine and feed it texts coalesced from many concurrent tasks.

Tasks run on Celery's thread pool and each hands its texts to ``Batcher.embed``,
which blocks until they are done. The engine prepares them there, on the task's
thread (a tokenizer runs while the device works on earlier passes), and they
join the backlog of every text the worker holds (``embq.worker.backlog``). A runner
thread forms each engine call, one pass, from the oldest waiting text and the
texts nearest it in length across all tasks, up to a budget of real tokens
(padded: the longest times the texts, for engines that pad), after a short wait
for company (after a long call, a small share of that call). Interactive texts
(queries) form the next pass first, taking at most ``INTERACTIVE_SHARE`` of it
while bulk texts wait; bulk texts fill the rest, for a padded engine the densest
run of lengths in the backlog (``Backlog.densest_pass``) unless the oldest bulk
text is overdue (``DEADLINE_BACKLOGS``). The bulk backlog is kept deep: the worker
takes bulk tasks while it holds less than ``PASSES_AHEAD`` passes' worth of
texts, and never more than ``backlog_seconds`` of the engine's work
(``bulk_deep``, which ``embq.worker.lanes`` asks). A task's texts that nobody
waits for any more, or that another task has meanwhile cached, are withdrawn
before they enter a pass (``unwanted``). It
isolates failures:

- texts the engine refuses (``EngineItemErrors``) fail alone, the rest go again;
- out of memory splits the call in halves, and a lone text is retried with backoff; the pass
  budget then drops to half the pass that failed (``lowered``), so later passes fit, and the
  engine's allocator gives its cached blocks back (``release_memory``);
- any other exception bisects the call until the texts that cause it fail alone;
- a dead engine (``EngineDead``, or ``healthy()`` false after an error) aborts
  every waiting task so that its message goes back to the queue, and tells the
  worker to stop taking work.

Results go back to a task's matrix once per pass: one numpy copy and one lock
per task in the pass, no object per text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embq.producer.keys import BULK, INTERACTIVE
from embq.worker import metrics
from embq.worker.backlog import Backlog, Shares
from embq.worker.engines import Engine, EngineDead, EngineItemErrors, Prepared, is_out_of_memory

log = logging.getLogger(__name__)

#: Retries of a lone text that ran out of memory, and the first backoff in seconds (doubling).
OOM_RETRIES = 3
OOM_BACKOFF = 0.5
#: The least share of its starting budget an out-of-memory error may lower a pass to.
OOM_FLOOR = 1 / 64
#: Most of a pass interactive texts take while bulk texts wait: bulk keeps the rest of every pass
#: under any load of queries, and queries still go in the very next pass.
INTERACTIVE_SHARE = 0.5
#: Passes of the engine a producer's bulk texts may fall behind another producer's before its texts go
#: first in the next pass (``Shares``): small enough that a small job is served within a few passes of
#: another's backfill, large enough that passes keep forming over every producer's texts, as dense.
FAIR_LAG_PASSES = 2.0
#: Seconds between a waiting task's looks at whether its texts are still wanted (``Batcher.embed``).
WANTED_RECHECK = 1.0
#: Seconds a task waits before it hands over the rows done so far, and between two hand-overs: passes are
#: formed across every task a worker holds (a deep backlog, by length), so a task may finish tens of
#: seconds after its first rows; until then they would be lost with the worker, and unseen by its caller.
HAND_OVER_EVERY = 2.0
#: After an engine call, the share of its duration (at most ``LINGER_MAX`` seconds) that the next call
#: waits for company: the callers the last call answered come back within moments, and without the wait
#: a steady load splits into two halves that alternate in half-full calls.
LINGER_SHARE = 0.05
LINGER_MAX = 0.05
#: The bulk backlog the worker keeps: passes' worth of tokens, but at most this many seconds of the engine's
#: work at its measured rate, so that a worker does not hoard what a newly started one could take, nor lose
#: much when it dies. Forming near-equal passes needs many passes' worth to choose from.
PASSES_AHEAD = 32
#: Passes' worth held before the first pass has measured the engine's rate.
START_PASSES = 8
BACKLOG_SECONDS = 20.0  # the worker's ``backlog_seconds`` (EMBQ_BACKLOG_SECONDS)
#: The oldest bulk text anchors the next pass, whatever its length (its task waits for it), once it has waited
#: this many times ``backlog_seconds``: longer than a full backlog takes, so only a text whose length stays
#: rare waits that long.
DEADLINE_BACKLOGS = 2.0
#: What a pass costs whatever its size, as a share of the pass budget: a tiny dense pass is no bargain.
PASS_OVERHEAD_SHARE = 1 / 64


class BatcherStopped(RuntimeError):
    """Raised to a task whose texts were not embedded because the worker stops or its engine died.

    Which of its texts were inside the engine when it died is told by the marks of ``on_pass``.
    """


@dataclass(eq=False)
class Job:
    """The texts of one task; the runners fill ``matrix`` (rows where ``ok``) and ``errors``."""

    texts: list[str]
    #: Each text in an engine call of its own, with no other call beside it.
    alone: bool = False
    #: The Celery task it serves and each text's row in it, for the marks of passes in the engine
    #: (``Batcher.on_pass``); no ``origin``: row i is the task's row i.
    task: str = ""
    origin: list[int] | None = None
    #: ``keys.INTERACTIVE`` texts go in the next pass, ahead of ``keys.BULK`` ones.
    lane: str = INTERACTIVE
    #: The producer that sent the task: bulk passes go to each producer in turn (``Shares``).
    owner: str = ""
    matrix: np.ndarray | None = None
    ok: np.ndarray = field(init=False)
    errors: dict[int, str] = field(default_factory=dict)
    #: Rows withdrawn before they entered a pass: nobody waited for them any more.
    dropped: list[int] = field(default_factory=list)
    remaining: int = field(init=False)
    aborted: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    #: Each text's tokens, and the engine's input for it (``Engine.prepare``).
    tokens: list[int] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    #: Rows not yet in a pass, and the first row that may be one of them.
    waiting: np.ndarray = field(init=False)
    #: Rows done and handed over before the task ended (``Batcher.embed``'s ``hand_over``).
    handed: np.ndarray = field(init=False)
    untaken: int = 0
    first: int = 0

    def __post_init__(self) -> None:
        self.ok = np.zeros(len(self.texts), dtype=bool)
        self.waiting = np.zeros(len(self.texts), dtype=bool)
        self.handed = np.zeros(len(self.texts), dtype=bool)
        self.remaining = len(self.texts)
        if not self.texts:
            self.done.set()

    def vector(self, index: int) -> np.ndarray | None:
        return self.matrix[index] if self.matrix is not None and self.ok[index] else None

    def oldest_waiting(self) -> int:
        while not self.waiting[self.first]:
            self.first += 1
        return self.first


@dataclass
class Call:
    """One engine call (one pass): its inputs, and for each the task and row it came from."""

    inputs: list[Any]
    jobs: list[Job]
    rows: list[int]
    alone: bool
    tokens: list[int]

    def part(self, positions: list[int]) -> Call:
        return Call(
            [self.inputs[p] for p in positions], [self.jobs[p] for p in positions], [self.rows[p] for p in positions],
            self.alone, [self.tokens[p] for p in positions],
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
        on_pass: Callable[[Call, bool], None] | None = None,
        on_depth: Callable[[], None] | None = None,
        backlog_seconds: float = BACKLOG_SECONDS,
    ) -> None:
        self.engine = engine
        #: Tokens per pass: padded (longest x texts) for engines that pad, else summed. Lowered after the
        #: engine runs out of memory; ``lowered`` then says why, for the heartbeat.
        self.max_tokens = max_tokens
        self.start_tokens = max_tokens
        self.lowered = ""
        #: Texts per pass.
        self.max_texts = max_texts
        self.padded = bool(getattr(engine, "pads", False))
        #: Seconds to wait for company before calling an idle engine.
        self.max_wait = max_wait
        self.on_dead = on_dead
        #: Told ``(call, True)`` before a pass enters the engine and ``(call, False)`` once it left it alive:
        #: a worker killed meanwhile leaves the mark of the texts that were inside (``embq.worker.app``).
        self.on_pass = on_pass
        #: Told when the bulk backlog becomes deep enough or stops being so (``bulk_deep``).
        self.on_depth = on_depth
        self.backlog_seconds = backlog_seconds
        self._deep = False
        self._marks_failing = False
        self.calls = 0
        self.texts_done = 0
        #: Real and padded tokens of the passes so far, and seconds with at least one pass in the engine.
        self.tokens_done = 0
        self.padded_done = 0
        self.busy_seconds = 0.0
        self._busy_mark = 0.0  # busy time is counted up to here
        self.dead: str | None = None
        self._jobs: deque[Job] = deque()  # jobs with texts not yet in a pass, oldest first
        # Their texts by lane, by length (not those of lone suspects).
        self._backlogs: dict[str, Backlog | Shares] = {INTERACTIVE: Backlog(), BULK: Shares()}
        self._inflight: dict[int, Call] = {}  # the calls runner threads are encoding
        self._exclusive = False  # a lone suspect text is in the engine: no other call may run
        self._queued_texts = 0
        self._queued_tokens = 0
        #: Texts that took the vector of a copy computed in another task (``_fill_twins``).
        self.twins_filled = 0
        #: The last pass gave bulk less than its share: the next one is bulk's (``_take_pass``).
        self._bulk_owed = False
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

    def embed(
        self,
        texts: list[str],
        alone: bool = False,
        task: str = "",
        origin: list[int] | None = None,
        lane: str = INTERACTIVE,
        unwanted: Callable[[list[int]], list[int]] | None = None,
        owner: str = "",
        truncate: bool = False,
        hand_over: Callable[[list[int], np.ndarray], None] | None = None,
    ) -> Job:
        """Embed ``texts`` (formatted for the engine); blocks until every one is done or failed.

        ``alone`` gives each text an engine call of its own (texts suspected of
        killing an engine must not take others down with them). Raises
        ``BatcherStopped`` when the texts were not embedded and the task should
        be requeued. While they wait, ``unwanted(rows)`` is asked every ``WANTED_RECHECK`` seconds which
        of the rows not yet in a pass nobody waits for any more, or are cached already: those are withdrawn
        (``Job.dropped``). ``owner``: the producer that sent them; bulk passes serve producers in turn.
        ``truncate`` has the engine cut texts over its context (in ``Engine.prepare``) rather than refuse them.
        ``hand_over(rows, vectors)`` takes the rows done while the task still waits, every ``HAND_OVER_EVERY``
        seconds, on this thread (they are marked in ``Job.handed``); one that fails leaves them to the end.
        """
        job = Job(texts, alone, task=task, origin=origin, lane=lane, owner=owner)
        with self._cond:
            if self._stopping or self.dead:
                raise BatcherStopped(self.dead or "the worker is shutting down")
        if texts:
            self._prepare(job, truncate)
        with self._cond:
            if self._stopping or self.dead:
                raise BatcherStopped(self.dead or "the worker is shutting down")
            for row in job.errors:
                job.waiting[row] = False
                self._settle(job, 1)
            job.untaken = int(job.waiting.sum())
            if job.untaken:
                self._jobs.append(job)
                rows = np.flatnonzero(job.waiting).tolist()
                if not alone:
                    self._backlogs[job.lane].add(job, rows)
                self._queued_texts += job.untaken
                self._queued_tokens += sum(job.tokens[r] for r in rows)
                self._cond.notify_all()
                self._check_depth()
        look = WANTED_RECHECK if unwanted is not None or hand_over is not None else None
        handed_at = job.arrived
        while not job.done.wait(look):
            if unwanted is not None:
                self._withdraw_unwanted(job, unwanted)
            if hand_over is not None and time.monotonic() - handed_at >= HAND_OVER_EVERY:
                handed_at = time.monotonic()
                self._hand_over(job, hand_over)
        if job.aborted:
            raise BatcherStopped(job.aborted)
        return job

    def shed(self, lane: str = BULK) -> int:
        """At a warm shutdown: the tasks of ``lane`` none of whose texts has entered a pass go back to the
        queue at once (their ``embed`` raises ``BatcherStopped``), for other workers, rather than hold the
        shutdown for a deep backlog; the others finish. Returns the number of tasks given back."""
        with self._cond:
            shed = [j for j in self._jobs if j.lane == lane and not j.alone and j.untaken == j.remaining]
            for job in shed:
                rows = np.flatnonzero(job.waiting).tolist()
                self._backlogs[lane].discard(job, rows)
                self._queued_texts -= len(rows)
                self._queued_tokens -= sum(job.tokens[r] for r in rows)
                job.waiting[:] = False
                job.untaken = 0
                job.aborted = "the worker is shutting down"
                job.done.set()
            if shed:
                self._jobs = deque(j for j in self._jobs if j.untaken)
                self._check_depth()
        return len(shed)

    def _hand_over(self, job: Job, hand_over: Callable[[list[int], np.ndarray], None]) -> None:
        with self._cond:
            rows = np.flatnonzero(job.ok & ~job.handed)
            if not len(rows) or job.matrix is None:
                return
            vectors = job.matrix[rows]  # a copy: the runners go on filling the matrix
            job.handed[rows] = True
        try:
            hand_over(rows.tolist(), vectors)
        except Exception as e:  # Redis away a moment: the rows go with the task's end
            log.debug("could not hand over %d rows done so far: %s", len(rows), e)
            with self._cond:
                job.handed[rows] = False

    def _withdraw_unwanted(self, job: Job, unwanted: Callable[[list[int]], list[int]]) -> None:
        with self._cond:
            rows = np.flatnonzero(job.waiting).tolist()
        if not rows:
            return
        try:
            gone = unwanted(rows)
        except Exception as e:  # a look that fails (Redis away) withdraws nothing: the texts are embedded
            log.debug("could not look whether %d texts are still wanted: %s", len(rows), e)
            return
        with self._cond:
            for row in gone:
                if not job.waiting[row]:  # entered a pass meanwhile
                    continue
                job.waiting[row] = False
                job.untaken -= 1
                if not job.alone:
                    self._backlogs[job.lane].remove(job, row)
                self._queued_texts -= 1
                self._queued_tokens -= job.tokens[row]
                job.dropped.append(row)
                self._settle(job, 1)
            if job.untaken == 0:
                self._jobs = deque(j for j in self._jobs if j.untaken)
            self._check_depth()

    def bulk_target(self) -> int:
        """Tokens of bulk texts the worker wants waiting: ``PASSES_AHEAD`` passes, at most ``backlog_seconds``
        of the engine's work at the rate measured so far (``START_PASSES`` passes before any)."""
        if not self.busy_seconds or not self.tokens_done:
            return START_PASSES * self.max_tokens
        rate = self.tokens_done / self.busy_seconds
        return max(self.max_tokens, min(PASSES_AHEAD * self.max_tokens, int(self.backlog_seconds * rate)))

    def waiting(self) -> int:
        """Texts taken from tasks and not yet in a pass, every lane (a heartbeat's read: no lock)."""
        return sum(backlog.texts for backlog in self._backlogs.values())

    def bulk_deep(self) -> bool:
        """True while the bulk texts waiting are enough: the worker need not take more bulk tasks."""
        return self._backlogs[BULK].tokens >= self.bulk_target()

    def _check_depth(self) -> None:
        """Tell ``on_depth`` when ``bulk_deep`` changed (lock held); the backlog's gauges."""
        for lane, backlog in self._backlogs.items():
            metrics.BACKLOG_TEXTS.labels(lane).set(backlog.texts)
            metrics.BACKLOG_TOKENS.labels(lane).set(backlog.tokens)
        target = self.bulk_target()
        metrics.BACKLOG_TARGET_TOKENS.set(target)
        deep = self._backlogs[BULK].tokens >= target
        if deep != self._deep:
            self._deep = deep
            if self.on_depth is not None:
                self.on_depth()

    def _prepare(self, job: Job, truncate: bool = False) -> None:
        """The engine's tokens and inputs for the job's texts, on the caller's thread; texts it refuses
        fail alone, and a failure of the whole preparation fails every text with its reason."""
        try:
            prepared = self.engine.prepare(job.texts, truncate)
        except Exception as e:
            log.warning("could not prepare %d texts: %s: %s", len(job.texts), type(e).__name__, e)
            prepared = Prepared(
                [1] * len(job.texts),
                [None] * len(job.texts),
                dict.fromkeys(range(len(job.texts)), f"{type(e).__name__}: {e}"),
            )
        job.tokens, job.inputs = [max(1, t) for t in prepared.tokens], prepared.inputs
        job.waiting[:] = True
        job.errors.update(prepared.errors)

    def _run(self) -> None:
        while True:
            call = self._next_call()
            if call is None:
                return
            started = time.monotonic()
            with self._cond:
                self.calls += 1
                if len(self._inflight) == 1:  # the device was idle until now
                    self._busy_mark = started
            died = False
            try:
                self._mark(call, True)
                self._encode(call)
            except EngineDead as e:
                died = True  # its texts keep their mark: they were inside when the engine died
                self._die(str(e) or "engine died")
            except Exception as e:  # a bug here must not strand the waiting tasks
                log.exception("batcher failed")
                self._die(f"batcher failed: {type(e).__name__}: {e}")
            finally:
                if not died:
                    self._mark(call, False)
                with self._cond:
                    self._last_call_ended = time.monotonic()
                    self._last_call_seconds = self._last_call_ended - started
                    del self._inflight[id(call)]
                    busy = self._last_call_ended - self._busy_mark  # counted at each pass, not only when idle
                    self._busy_mark = self._last_call_ended
                    self.busy_seconds += busy
                    metrics.ENGINE_BUSY_SECONDS.inc(busy)
                    if call.alone:
                        self._exclusive = False
                    self._cond.notify_all()

    def busy_time(self) -> float:
        """Seconds with at least one pass in the engine so far, the pass running now included."""
        with self._cond:
            return self.busy_seconds + (time.monotonic() - self._busy_mark if self._inflight else 0.0)

    def _mark(self, call: Call, entering: bool) -> None:
        if self.on_pass is None:
            return
        try:
            self.on_pass(call, entering)
        except Exception as e:  # a mark is evidence for later, never a reason to fail a pass
            if not self._marks_failing:
                log.warning("cannot mark passes in the engine (%s); passes go on without marks", e)
            self._marks_failing = True
            return
        if self._marks_failing and entering:  # leaving is only noted: entering is what reaches Redis
            log.info("passes in the engine are marked again")
            self._marks_failing = False

    def _next_call(self) -> Call | None:
        with self._cond:
            while True:
                while not self._jobs or self._exclusive:
                    if self.dead or (self._stopping and not self._jobs):
                        return None
                    self._cond.wait()
                if self._jobs[0].alone:
                    if self._inflight:  # a suspect text runs with no other call beside it
                        self._cond.wait()
                        continue
                    self._exclusive = True
                    return self._take_alone()
                linger = min(LINGER_SHARE * self._last_call_seconds, LINGER_MAX)
                deadline = max(self._jobs[0].arrived + self.max_wait, self._last_call_ended + linger)
                while self._jobs and not self._full() and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._jobs and not self._exclusive:  # another runner may have taken it all meanwhile
                    if self._jobs[0].alone:  # a suspect came first meanwhile: it runs alone (see above)
                        continue
                    return self._take_pass()

    def _take_alone(self) -> Call:
        """The next text of the oldest job, a suspect, in a call of its own (lock held)."""
        job = self._jobs[0]
        return self._call([(job, job.oldest_waiting())], alone=True)

    def _take_pass(self) -> Call:
        """The oldest waiting interactive text and those nearest it in length, within ``INTERACTIVE_SHARE`` of
        the budgets while bulk texts wait; then the oldest bulk text and those nearest it, in what is left
        (lock held). Bulk keeps the rest of the engine on every engine: a pass whose bulk texts took less than
        that (on a padded engine, 32 short queries and one long text already cost more than a pass) makes the
        next one bulk's, queries joining only as far as they fit."""
        quick = next((j for j in self._jobs if not j.alone and j.lane == INTERACTIVE), None)
        bulk = next((j for j in self._jobs if not j.alone and j.lane == BULK), None)
        picks: list[tuple[Job, int]] = []
        if quick is not None and bulk is not None and self._bulk_owed:
            self._bulk_owed = False
            picks = self._bulk_pass((bulk, bulk.oldest_waiting()), self.max_tokens, self.max_texts)
            budget, most = self.max_tokens, max(1, int(self.max_texts * INTERACTIVE_SHARE))
            around = (quick, quick.oldest_waiting())
            queries = self._backlogs[INTERACTIVE].pass_around(around, budget, most, self.padded)
            picks += self._fitting(picks, queries, self.max_tokens, self.max_texts)
        else:
            if quick is not None:
                share = INTERACTIVE_SHARE if bulk is not None else 1.0
                budget, most = max(1, int(self.max_tokens * share)), max(1, int(self.max_texts * share))
                picks = self._backlogs[INTERACTIVE].pass_around(
                    (quick, quick.oldest_waiting()), budget, most, self.padded
                )
            bulk_picks: list[tuple[Job, int]] = []
            if bulk is not None and len(picks) < self.max_texts:
                anchor = (bulk, bulk.oldest_waiting())
                used = self._cost(picks)
                if not picks or self._cost([*picks, anchor]) <= self.max_tokens:
                    bulk_picks = self._bulk_pass(anchor, self.max_tokens - used, self.max_texts - len(picks))
                    picks += bulk_picks
            if quick is not None and bulk is not None:
                share = max(self._cost(bulk_picks) / self.max_tokens, len(bulk_picks) / self.max_texts)
                self._bulk_owed = share < 1.0 - INTERACTIVE_SHARE and self._backlogs[BULK].texts > len(bulk_picks)
        picks = once_each(picks)  # the copies stay waiting: they take the vector of the one computed
        for pick_job, row in picks:
            self._backlogs[pick_job.lane].remove(pick_job, row)
        self._check_depth()
        picks.sort(key=lambda pick: pick[0].tokens[pick[1]])  # for engines that cut a call into batches
        return self._call(picks, alone=False)

    def _bulk_pass(self, anchor: tuple[Job, int], budget: int, most: int) -> list[tuple[Job, int]]:
        """Bulk texts for a pass, from all producers' (``Shares``), or first from one that fell behind. From a
        backlog: around the oldest text once it is due, else (padded) the densest run of lengths."""
        shares = self._backlogs[BULK]
        assert isinstance(shares, Shares)
        behind = shares.behind(FAIR_LAG_PASSES)
        if behind is None:
            picks = self._from(shares.all, anchor, budget, most)
        else:
            owner, backlog = behind
            first = next(j for j in self._jobs if j.lane == BULK and not j.alone and j.owner == owner)
            picks = self._from(backlog, (first, first.oldest_waiting()), budget, most)
            if len(picks) < most:  # the rest of the pass: the others' texts that fit
                taken = {(id(job), row) for job, row in picks}
                more = [e for e in self._from(shares.all, anchor, budget, most) if (id(e[0]), e[1]) not in taken]
                picks += self._fitting(picks, more, budget, most)
        for job, row in picks:
            shares.charge(job.owner, max(job.tokens[row] / self.max_tokens, 1 / self.max_texts))
        return picks

    def _from(self, backlog: Backlog, anchor: tuple[Job, int], budget: int, most: int) -> list[tuple[Job, int]]:
        if self.padded and time.monotonic() - anchor[0].arrived < DEADLINE_BACKLOGS * self.backlog_seconds:
            return backlog.densest_pass(budget, most, overhead=int(self.max_tokens * PASS_OVERHEAD_SHARE))
        return backlog.pass_around(anchor, budget, most, self.padded)

    def _fitting(
        self, picks: list[tuple[Job, int]], more: list[tuple[Job, int]], budget: int, most: int
    ) -> list[tuple[Job, int]]:
        """Those of ``more`` that a pass of ``picks`` can take within ``budget`` and ``most`` texts."""
        sizes = [job.tokens[row] for job, row in picks]
        count, longest, total = len(sizes), max(sizes, default=0), sum(sizes)
        kept: list[tuple[Job, int]] = []
        for entry in more:
            if count >= most:
                break
            size = entry[0].tokens[entry[1]]
            cost = max(longest, size) * (count + 1) if self.padded else total + size
            if cost > budget:
                continue
            kept.append(entry)
            count, longest, total = count + 1, max(longest, size), total + size
        return kept

    def _call(self, picks: list[tuple[Job, int]], alone: bool) -> Call:
        """Take ``picks`` out of the waiting texts as one call (lock held)."""
        emptied = False
        tokens: list[int] = []
        for job, row in picks:
            job.waiting[row] = False
            job.untaken -= 1
            emptied |= job.untaken == 0
            tokens.append(job.tokens[row])
        if emptied:
            self._jobs = deque(j for j in self._jobs if j.untaken)
        self._queued_texts -= len(picks)
        self._queued_tokens -= sum(tokens)
        call = Call(
            [job.inputs[row] for job, row in picks], [job for job, _ in picks], [row for _, row in picks], alone, tokens
        )
        self._inflight[id(call)] = call
        return call

    def _cost(self, picks: list[tuple[Job, int]]) -> int:
        """Tokens of a pass of ``picks``: padded (longest x texts) or summed."""
        sizes = [job.tokens[row] for job, row in picks]
        return self._cost_of(sizes) if sizes else 0

    def _full(self) -> bool:
        return self._queued_texts >= self.max_texts or self._queued_tokens >= self.max_tokens

    def _encode(self, call: Call, oom_attempt: int = 0) -> None:
        """Encode ``call``, isolating the texts that fail; raises ``EngineDead``."""
        if not call.inputs:
            return
        metrics.ENGINE_BATCH_TEXTS.observe(len(call.inputs))
        started = time.monotonic()
        try:
            vectors = self.engine.encode_prepared(call.inputs)
            metrics.ENGINE_SECONDS.observe(time.monotonic() - started)
            if vectors.shape != (len(call.inputs), self.engine.dim) or not np.isfinite(vectors).all():
                n = len(call.inputs)
                raise ValueError(f"engine returned shape {vectors.shape} or non-finite values for {n} texts")
        except EngineItemErrors as e:
            refused = {i: msg for i, msg in e.errors.items() if 0 <= i < len(call.inputs)}
            if not refused:
                raise EngineDead(f"engine refused texts it did not name: {e}") from e
            for i, msg in refused.items():
                self._fail(call.jobs[i], call.rows[i], msg)
            self._encode(call.part([i for i in range(len(call.inputs)) if i not in refused]))
            return
        except EngineDead:
            raise
        except Exception as e:
            if not self.engine.healthy():
                raise EngineDead(f"engine unhealthy after {type(e).__name__}: {e}") from e
            if is_out_of_memory(e):
                self._on_out_of_memory(call, oom_attempt, e)
            elif len(call.inputs) == 1:
                log.warning("text failed in the engine: %s: %s", type(e).__name__, e)
                self._fail(call.jobs[0], call.rows[0], f"{type(e).__name__}: {e}")
            else:
                log.info("engine call of %d texts raised %s; bisecting", len(call.inputs), type(e).__name__)
                self._bisect(call)
            return
        real = sum(call.tokens)
        padded = self._cost_of(call.tokens)
        if not self.engine.counts_tokens:
            metrics.TOKENS_EMBEDDED.inc(real)
        metrics.PASS_TOKENS.inc(real)
        metrics.PASS_PADDED_TOKENS.inc(padded)
        log.debug(
            "pass of %d texts, longest %d tokens: %.2f real/padded", len(call.tokens), max(call.tokens), real / padded
        )
        with self._cond:
            self.tokens_done += real
            self.padded_done += padded
        self._place(call, vectors)

    def _bisect(self, call: Call) -> None:
        half = len(call.inputs) // 2
        self._encode(call.part(list(range(half))))
        self._encode(call.part(list(range(half, len(call.inputs)))))

    def _on_out_of_memory(self, call: Call, attempt: int, error: Exception) -> None:
        metrics.ERRORS.labels(metrics.OUT_OF_MEMORY).inc()
        release = getattr(self.engine, "release_memory", None)
        if release is not None:
            release()
        self._lower_budget(self._cost_of(call.tokens))
        if len(call.inputs) > 1:
            half = len(call.inputs) // 2
            log.warning("engine out of memory on %d texts; splitting into %d and %d", len(call.inputs), half, half)
            self._bisect(call)
        elif attempt < OOM_RETRIES:
            delay = OOM_BACKOFF * 2**attempt
            log.warning("engine out of memory on a single text; retrying in %.1fs", delay)
            time.sleep(delay)
            self._encode(call, attempt + 1)
        else:
            self._fail(call.jobs[0], call.rows[0], f"out of memory even alone, after {OOM_RETRIES} retries: {error}")

    def _lower_budget(self, failed: int) -> None:
        """Passes of ``failed`` tokens ran out of memory: later ones take at most half that, so that they fit
        rather than each failing and splitting again."""
        with self._cond:
            budget = max(int(self.start_tokens * OOM_FLOOR), failed // 2, 1)
            if budget >= self.max_tokens:
                return
            was, self.max_tokens = self.max_tokens, budget
            self.lowered = f"lowered from {self.start_tokens} after out of memory on a pass of {failed} tokens"
        metrics.PASS_BUDGET_TOKENS.set(budget)
        log.warning(
            "engine out of memory on a pass of %d tokens: passes now take at most %d tokens (were %d). "
            "Set EMBQ_BATCH_TOKENS to choose; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lessens "
            "fragmentation",
            failed,
            budget,
            was,
        )

    def _cost_of(self, tokens: list[int]) -> int:
        return max(tokens) * len(tokens) if self.padded else sum(tokens)

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
            if not call.alone:
                self._fill_twins(call, vectors)
        metrics.TEXTS_EMBEDDED.inc(len(call.inputs))

    def _fill_twins(self, call: Call, vectors: np.ndarray) -> None:
        """Copies of the texts just computed that still wait, in other tasks, take their vectors and leave
        the backlog (lock held): a text two tasks carry is computed once."""
        filled: dict[Job, list[tuple[int, int]]] = {}
        for position, (job, row) in enumerate(zip(call.jobs, call.rows, strict=True)):
            text = job.texts[row]
            for backlog in self._backlogs.values():
                for twin, twin_row in backlog.twins(text):
                    backlog.remove(twin, twin_row)
                    filled.setdefault(twin, []).append((twin_row, position))
        for job, pairs in filled.items():
            if job.aborted:
                continue
            rows = [row for row, _ in pairs]
            if job.matrix is None:
                job.matrix = np.empty((len(job.texts), vectors.shape[1]), dtype=np.float32)
            job.matrix[rows] = vectors[[position for _, position in pairs]]
            job.ok[rows] = True
            job.waiting[rows] = False
            job.untaken -= len(rows)
            self._queued_texts -= len(rows)
            self._queued_tokens -= sum(job.tokens[row] for row in rows)
            self.texts_done += len(rows)
            self.twins_filled += len(rows)
            self._settle(job, len(rows))
        if filled:
            if any(job.untaken == 0 for job in filled):
                self._jobs = deque(j for j in self._jobs if j.untaken)
            self._check_depth()

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
            jobs = {id(job): job for call in self._inflight.values() for job in call.jobs}
            jobs.update({id(job): job for job in self._jobs})
            self._jobs.clear()
            for backlog in self._backlogs.values():
                backlog.clear()
            self._queued_texts = self._queued_tokens = 0
            for job in jobs.values():
                if not job.done.is_set():
                    job.aborted = f"engine dead: {reason}"
                    job.done.set()
            self._cond.notify_all()
        if first:
            metrics.ERRORS.labels(metrics.ENGINE_DEAD).inc()
        if first and self.on_dead is not None:
            self.on_dead(reason)


def once_each(picks: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
    """``picks`` without the repeats of a text already among them."""
    seen: set[str] = set()
    kept = []
    for job, row in picks:
        text = job.texts[row]
        if text not in seen:
            seen.add(text)
            kept.append((job, row))
    return kept
