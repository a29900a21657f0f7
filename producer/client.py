"""``EmbeddingClient``: texts in, vectors out, through the cache first and the queue second."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import redis
from celery import Celery
from redis.cluster import RedisCluster

from embq.producer import keys, metrics
from embq.producer.backend import backend_errors, connect, probe
from embq.producer.call import Call, before_sending, choose_lane
from embq.producer.cluster import CacheClient, claim, connect_cache, look, read_stream, release
from embq.producer.contract import TASK_EMBED, describe_task, make_celery, payload_queue, signature_dimension
from embq.producer.dispatcher import NOTICES_PER_READ, Dispatcher, Look, Op, PerText, Read, Redis, Send, Wait
from embq.producer.errors import EmbqError
from embq.producer.l1 import L1Cache, L1Stats, empty_stats
from embq.producer.settings import Settings
from embq.producer.stream import DEFAULT_BATCH, DEFAULT_WINDOW, EmbedStream, Failures
from embq.producer.validation import validate_options, validate_texts

log = logging.getLogger(__name__)

#: Seconds between the caller's checks that the dispatcher thread is still alive.
CALLER_POLL = 1.0
#: Seconds a program's exit waits for its dispatcher to release its claims.
AT_EXIT_TIMEOUT = 3.0


class EmbeddingClient:
    """Embeds texts with one model through embq's cache and workers; safe to share across threads.

    ``redis_url`` serves as broker and cache unless ``broker_url``/``cache_url``
    say otherwise; when it is None, the ``EMBQ_*`` environment decides. The
    client's calls share one dispatcher thread (started at the first call), so
    concurrent calls from many threads share round trips and tasks.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        model: str | None = None,
        broker_url: str | None = None,
        cache_url: str | None = None,
        settings: Settings | None = None,
        before_first_task: Callable[[], None] | None = None,
    ) -> None:
        """``before_first_task`` runs once, on a thread of its own, when this client first sends a task
        (``embq embed`` starts its private worker there, so that a fully cached input loads no model); the
        dispatcher goes on meanwhile (the cached rows of the next texts are found while the model loads), and
        an ``EmbqError`` it raises fails the calls that wait."""
        self.settings = Settings.for_client(
            redis_url, model=model, broker_url=broker_url, cache_url=cache_url, settings=settings
        )
        self.model = self.settings.model
        self.queue = self.settings.queue
        self.before_first_task = before_first_task
        self._lock = threading.Lock()
        self._driver: ThreadDriver | None = None
        self._dimension: int | None = None
        #: ``embq_client_cache_hits_total`` of this model: L1 hits are cache hits too.
        self._hits = metrics.CACHE_HITS.labels(self.model)

    def embed(
        self,
        texts: Any,
        *,
        dim: int | None = None,
        instruction: str = "",
        timeout: float | None = None,
        truncate: bool = False,
        priority: str | None = None,
    ) -> np.ndarray:
        """Vectors for ``texts``: float32, shape ``(len(texts), d)``, row i for text i.

        ``dim`` serves a Matryoshka prefix of the stored full vector, re-normalised.
        ``instruction`` is the model's query instruction; it is part of the cache key.
        ``timeout`` (seconds) bounds the wait for workers; None waits as long as
        the work is alive (lost tasks are sent again, dead producers' texts taken over).
        ``truncate``: a text over the model's context is cut there (the vector of its beginning, cached
        under a key of its own) instead of failing alone with ``ItemFailedError``.
        ``priority`` is the call's lane: ``"interactive"`` goes ahead of ``"bulk"`` work on the same
        workers; None decides by size (at most ``EMBQ_INTERACTIVE_MAX_TEXTS`` texts: interactive). A call of
        more than ``EMBQ_INTERACTIVE_CAP_TEXTS`` texts is bulk whatever its ``priority``.
        An empty list gives shape ``(0, dim)``, else ``(0, d)`` with the model's dimension once a
        worker of it has run, else ``(0, 0)``.
        """
        items = validate_texts(texts, self.settings.max_text_bytes)
        validate_options(instruction, dim, timeout, self.settings.max_text_bytes, truncate)
        lane = choose_lane(priority, len(items), self.settings)
        held = self._from_l1(items, instruction, dim, truncate)
        if held is not None:
            return held
        if not items or dim is not None:
            settled = before_sending(items, dim, self.dimension())
            if settled is not None:
                return settled
        deadline = None if timeout is None else time.monotonic() + timeout
        call = Call(items, instruction, dim=dim, deadline=deadline, lane=lane, truncate=truncate)
        driver = self.driver()
        driver.submit(call)
        driver.wait(call)
        call.count(self.model)
        return call.result(self.settings)

    def embed_iter(
        self,
        texts: Iterable[str],
        *,
        batch: int = DEFAULT_BATCH,
        window: int = DEFAULT_WINDOW,
        dim: int | None = None,
        instruction: str = "",
        timeout: float | None = None,
        truncate: bool = False,
        failures: Failures = "raise",
        on_progress: Callable[[int], None] | None = None,
        priority: str | None = None,
        on_rows: Callable[[str, int], None] | None = None,
    ) -> EmbedStream:
        """Stream any number of texts: yields ``(start, vectors)`` chunks of ``batch`` rows, in input order,
        with at most ``window`` chunks in flight. See ``EmbedStream`` for failures and counters;
        ``on_progress(n)`` is called (from the dispatcher thread) as texts are resolved, and ``on_rows(how, n)``
        with how they were: ``cached`` (as soon as a window finds them), ``computed``, ``waited`` (computed
        for another producer) or ``failed``. A stream is bulk
        work (``priority="bulk"``) unless ``priority`` says otherwise."""
        return EmbedStream(
            self,
            texts,
            batch=batch,
            window=window,
            dim=dim,
            instruction=instruction,
            timeout=timeout,
            truncate=truncate,
            failures=failures,
            on_progress=on_progress,
            priority=priority,
            on_rows=on_rows,
        )

    def _from_l1(self, items: list[str], instruction: str, dim: int | None, truncate: bool) -> np.ndarray | None:
        """The hot path: every text in this process's L1 (``embq.producer.l1``), answered on the caller's
        thread with no Redis command and no word to the dispatcher; else None."""
        driver = self._driver
        if not items or driver is None or driver.l1 is None or driver.pid != os.getpid():
            return None
        digests = keys.text_digests(self.model, self.settings.cache_namespace, instruction, items, truncate=truncate)
        held = driver.l1.answer(digests, dim)
        if held is not None:
            self._hits.inc(len(set(digests)))
        return held

    def l1_stats(self) -> L1Stats:
        """What this client's in-process cache holds and did (``EMBQ_L1_BYTES``; all zero when it is off)."""
        driver = self._driver
        if driver is None or driver.l1 is None or driver.pid != os.getpid():
            return empty_stats(self.settings.l1_bytes)
        return driver.l1.stats()

    def dimension(self) -> int | None:
        """The model's full dimension, as its workers state it (None before any worker of it ran)."""
        driver = self._driver
        if driver is not None and driver.core.dim is not None:  # kept current by the dispatcher
            return driver.core.dim
        if self._dimension is None:
            with backend_errors("cache", self.settings.cache, self.settings.origin("cache")):
                raw = self.driver().cache.get(keys.signature_key(self.settings.cache_namespace, self.model))
            self._dimension = signature_dimension(raw)  # type: ignore[arg-type]
        return self._dimension

    def connect(self) -> None:
        """Reach Redis now rather than at the first call: one that is not there fails here, with what to do
        about it (``BackendUnavailableError``)."""
        with backend_errors("cache", self.settings.cache, self.settings.origin("cache")):
            self.driver().cache  # noqa: B018 (the property connects)

    def driver(self) -> ThreadDriver:
        """This process's dispatcher; a forked child gets its own (threads and sockets do not survive fork)."""
        with self._lock:
            if self._driver is None or self._driver.pid != os.getpid():
                self._driver = ThreadDriver(self.settings, self.before_first_task)
            return self._driver

    def close(self) -> None:
        """Stop the dispatcher and release connections. Calls still waiting fail, and their claims are
        released: workers skip their queued texts. The client must not be used afterwards."""
        with self._lock:
            driver, self._driver = self._driver, None
        if driver is not None and driver.pid == os.getpid():
            driver.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadDriver:
    """Runs a ``Dispatcher`` in a daemon thread with redis-py and Celery."""

    def __init__(self, settings: Settings, before_first_task: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.before_first_task = before_first_task
        self.pid = os.getpid()
        #: This process's L1 (a forked child's driver starts its own, empty).
        self.l1 = L1Cache(settings.model, settings.l1_bytes, settings.cache_ttl) if settings.l1_bytes > 0 else None
        self.core = Dispatcher(settings, check_served=before_first_task is None, l1=self.l1)
        if self.l1 is not None:
            self.l1.on_check = self.poke
        #: Connected at the first use, when the cache says whether it is a cluster (``embq.producer.cluster``).
        self._cache: CacheClient | None = None
        self._connecting = threading.Lock()
        self.broker = connect(settings.broker)
        self.cond = threading.Condition()
        self.woken = False
        #: What ``before_first_task`` raised, for the dispatcher to raise at its next step.
        self._hook_failed: EmbqError | None = None
        self._celery: Celery | None = None
        self.thread = threading.Thread(target=self._run, name="embq-dispatcher", daemon=True)
        self.thread.start()
        # A program that ends (Ctrl-C included) without closing its client still releases what it claimed,
        # so that workers skip its queued texts rather than compute them for nobody.
        atexit.register(self._at_exit)

    # -- the callers' side ------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        done = threading.Event()
        call.on_finish = done.set
        call.signal = done
        with self.cond:
            self.core.inbox.append(call)
        self.poke()

    def wait(self, call: Call) -> None:
        """Block until ``call`` finishes; Ctrl-C gives it up (its claims are released)."""
        done: threading.Event = call.signal
        try:
            while not done.wait(CALLER_POLL):
                if not self.thread.is_alive():
                    raise EmbqError("embq's dispatcher thread stopped; see the log for why")
        except BaseException:
            call.cancel()
            self.poke()
            raise

    def poke(self) -> None:
        """Wake the dispatcher for a new or cancelled call, from its wait or its blocking read."""
        with self.cond:
            wake = self.core.reading and not self.woken
            self.woken = self.woken or wake
            self.cond.notify()
        if wake:  # the dispatcher blocks on its stream: a wake entry ends the read at once
            self._wake()

    def close(self, timeout: float = 10.0) -> None:
        atexit.unregister(self._at_exit)
        with self.cond:
            self.core.closing = True
            self.cond.notify()
        self._wake()
        self.thread.join(timeout=timeout)
        if self.l1 is not None:
            self.l1.close()
        if self._cache is not None:
            self._cache.close()
        self.broker.close()
        if self._celery is not None:
            self._celery.close()

    def _at_exit(self) -> None:
        if self.pid == os.getpid() and self.thread.is_alive():
            self.close(timeout=AT_EXIT_TIMEOUT)

    @property
    def cache(self) -> CacheClient:
        with self._connecting:
            if self._cache is None:
                settings = self.settings
                probe("cache", settings.cache, settings.origin("cache"))  # fail at once when nothing listens
                if settings.broker != settings.cache:
                    probe("broker", settings.broker, settings.origin("broker"))
                self._cache = connect_cache(settings.cache)
            return self._cache

    def _wake(self) -> None:
        if self._cache is None:
            return  # nothing was read yet
        try:
            self._cache.xadd(self.core.reply, {"w": b""}, nomkstream=True)
        except redis.exceptions.RedisError:
            pass  # the read ends within MAX_BLOCK anyway

    # -- the dispatcher's side --------------------------------------------------------------

    def _run(self) -> None:
        steps = self.core.run()
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = steps.throw(error) if error is not None else steps.send(result)
            except StopIteration:
                return
            result, error = None, None
            try:
                result = self.execute(op)
            except Exception as e:
                error = e

    def execute(self, op: Op) -> Any:
        failed, self._hook_failed = self._hook_failed, None
        if failed is not None:
            raise failed
        if isinstance(op, Redis):
            return self._redis(op)
        if isinstance(op, PerText | Look):
            return on_cache(self.cache, op)
        if isinstance(op, Read):
            return self._read(op)
        if isinstance(op, Send):
            if self.before_first_task is not None and op.tasks:
                hook, self.before_first_task = self.before_first_task, None
                threading.Thread(target=self._run_hook, args=(hook,), name="embq-first-task", daemon=True).start()
            return send_tasks(self._app(), op)
        if isinstance(op, Wait):
            with self.cond:
                if not self.core.inbox and not self.core.closing and not self._check_wanted():
                    self.cond.wait(op.timeout)
            return None
        time.sleep(max(0.0, op.seconds))
        return None

    def _redis(self, op: Redis) -> list[Any]:
        return run_commands(self.cache if op.target == "cache" else self.broker, op)

    def _run_hook(self, hook: Callable[[], None]) -> None:
        """``before_first_task``, off the dispatcher's thread; its failure wakes the dispatcher to raise it."""
        try:
            hook()
        except Exception as e:
            if not isinstance(e, EmbqError):
                log.exception("before the first task")
            self._hook_failed = e if isinstance(e, EmbqError) else EmbqError(f"before the first task: {e!r}")
            self.poke()

    def _check_wanted(self) -> bool:
        """A hit asked for a look at the L1's epoch (``L1Cache.check_wanted``), or ``before_first_task``
        failed: the dispatcher must not sleep."""
        return self._hook_failed is not None or (self.l1 is not None and self.l1.check_wanted)

    def _read(self, op: Read) -> Any:
        with self.cond:
            block = 0.0 if self.core.inbox or self.core.closing or self._check_wanted() else op.block
            self.core.reading = block > 0
        try:
            return read_stream(
                self.cache, self.core.reply, op.last_id, NOTICES_PER_READ, max(1, int(block * 1000)) if block else None
            )
        finally:
            with self.cond:
                self.core.reading = self.woken = False

    def _app(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery


def on_cache(client: CacheClient, op: Redis | PerText | Look) -> Any:
    """A cache op with redis-py's blocking client: one round trip on one Redis, one per node on a cluster."""
    if isinstance(op, Redis):
        return run_commands(client, op)
    if not isinstance(client, RedisCluster):
        replies = run_commands(client, op.on_one_redis())
        return replies[0] if replies else []
    if isinstance(op, Look):
        return look(client, op.digests)
    if op.name == "claim":
        return claim(client, op.args, op.digests)
    return release(client, op.args[0], op.digests)


def run_commands(client: CacheClient, op: Redis) -> list[Any]:
    """``op``'s commands in one pipeline (one round trip per node on a cluster); their replies."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for command in op.commands:
            pipe.execute_command(*command)
        try:
            return pipe.execute()  # type: ignore[no-any-return]
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            for source in op.scripts.values():  # a restarted Redis forgot them
                client.script_load(source)
    raise AssertionError("unreachable")


def send_tasks(app: Celery, op: Send) -> None:
    """Publish ``op``'s tasks through one producer connection."""
    if not op.tasks:
        return
    with app.producer_or_acquire() as producer:
        for task_id, payload in op.tasks:
            queue = payload_queue(payload)
            app.send_task(
                TASK_EMBED,
                args=[payload],
                # What Flower shows; the default repr of every text costs more than the send.
                argsrepr=describe_task(payload),
                task_id=task_id,
                queue=queue,
                # The default exchange routes by list name alone: no binding
                # key in Redis that a restart could lose.
                exchange="",
                routing_key=queue,
                producer=producer,
            )
    log.debug("sent %d tasks to %s", len(op.tasks), payload_queue(op.tasks[0][1]))
