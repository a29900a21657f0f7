"""The worker's Celery app: one engine per process, loaded before the first task is taken.

Tasks run on Celery's thread pool inside the one process that holds the
engine; a prefork pool would fork a copy of the model per child (and SGLang
cannot start inside a daemonic child at all), so it is refused.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery, bootsteps, signals
from celery.exceptions import Reject
from celery.worker import state as worker_state
from kombu import Exchange, Queue

from embq.producer import keys
from embq.producer.backend import (
    connect,
    connect_once,
    nothing_listens,
    redact,
    redis_reason,
    start_hint,
    will_not_heal,
)
from embq.producer.cluster import CacheClient, cluster_enabled, connect_cache, connect_cache_once, is_cluster, pipeline
from embq.producer.contract import (
    TASK_EMBED,
    EmbedPayload,
    make_celery,
    payload_lane,
    payload_queue,
    root_task_id,
    split_task_id,
)
from embq.producer.errors import BackendUnavailableError, ConfigurationError, EmbqError
from embq.worker import kombu_fixes, metrics
from embq.worker.batcher import Batcher, BatcherStopped, Call
from embq.worker.engines import Engine, create_engine
from embq.worker.heartbeat import Heartbeat, worker_name
from embq.worker.holdings import Holdings
from embq.worker.lanes import BulkSlots
from embq.worker.memory import freeze_what_is_loaded, keep_task_buffers_in_heap
from embq.worker.settings import WorkerSettings
from embq.worker.signature import SignatureGuard, signature_of
from embq.worker.store import ResultStore, refusal
from embq.worker.tasks import run_embed

log = logging.getLogger(__name__)

#: Exit status of a worker whose engine or settings keep it from starting.
EXIT_START_FAILED = 3
#: Exit status of a worker whose engine died while serving (its tasks went back to the queue).
EXIT_ENGINE_DEAD = 4
#: Exit status of a worker Celery stopped on an error it could not recover from (its tasks return to the
#: queue after the visibility timeout): its supervisor restarts it.
EXIT_WORKER_FAILED = 5
#: Exit status of a worker stopped by Ctrl-C (SIGINT) after a warm shutdown, as shells report an interrupt.
EXIT_INTERRUPTED = 130
#: Seconds a heartbeat, signature or shutdown command may wait for the cache Redis: they are tiny,
#: and a shutdown must not wait long for a Redis that hangs.
CONTROL_TIMEOUT = 2.0
#: Field of a task's attempts hash marking one of its passes in the engine (``Runtime.on_pass``).
PASS_MARK = "in:"
#: Seconds of engine time between two heartbeats below which the worker's rate is not measured again.
SPEED_MIN_BUSY = 0.5
#: Eviction policies that may drop queue keys when broker and cache share a Redis.
UNSAFE_EVICTION = {"allkeys-lru", "allkeys-lfu", "allkeys-random"}


class Runtime:
    """What one worker process holds: its engine, its batcher and its cache connection."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        # A single Redis until the cache answers, which says whether it is a cluster (``_open_cache``).
        self.cache: CacheClient = connect(settings.shared.cache)
        self.store = ResultStore(self.cache, settings.shared.model, settings.shared.cache_ttl, worker_name())
        #: For the heartbeat, the signature and shutdown: never retries, so a lost Redis delays nothing.
        self.control: CacheClient = connect_once(settings.shared.cache, timeout=CONTROL_TIMEOUT)
        self.signature = SignatureGuard(self.control, settings.shared)
        #: The port /metrics is served on (0: none), which may differ from the one asked for.
        self.metrics_port = 0
        #: Why the engine died, once it has; the worker then stops and exits.
        self.dead: str | None = None
        #: The status the worker process must exit with, when not 0.
        self.exit_code: int | None = None
        #: The batcher's counters at the last heartbeat: ``(time, texts, tokens, padded, busy seconds)``.
        self._last_beat: tuple[float, ...] | None = None
        #: Writes the marks of ``on_pass`` off the runners' path, reading ``control`` when it writes.
        self.marks = PassMarks(lambda: self.control)
        self.heartbeat: Heartbeat | None = None
        #: What this worker holds in the broker, under a lease: a dead worker's tasks back in seconds.
        self.holdings: Holdings | None = None
        self.bulk_slots = BulkSlots(settings.shared.queues[1], settings.bulk_task_limit)
        #: Texts per second of engine time, as last measured (0 before any): the ``speed`` of the heartbeat.
        self._speed = 0.0
        #: True while the main thread starts the worker (``engine_step``): a signal then interrupts the start.
        self.starting = False

    def start(self) -> None:
        """Load the engine once; idempotent, so a second ``worker_init`` is harmless."""
        if self.engine is not None:
            return
        s = self.settings
        if s.truncate:
            log.warning(
                "EMBQ_TRUNCATE / --truncate no longer changes a worker: every worker cuts the texts of calls "
                'that ask for it (truncate=True, embq embed --truncate, the request field "truncate") and fails '
                "the others' over-long texts; a gateway's default for requests without the field is embq serve "
                "--truncate (EMBQ_TRUNCATE where it runs)"
            )
        # A ready file left by a killed predecessor (a restarted container keeps /tmp)
        # must not pass the probes before this engine is loaded.
        self.set_ready(False)
        wait_for_redis("broker", s.shared.broker, s.redis_wait, s.shared.origin("broker"))
        if s.shared.cache != s.shared.broker:
            wait_for_redis("cache", s.shared.cache, s.redis_wait, s.shared.origin("cache"))
        check_eviction_policy(s)
        self._open_cache()
        self.holdings = Holdings(s.shared.broker, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        self.holdings.start()
        keep_task_buffers_in_heap()
        # Online while loading (not ready): producers then know the model is being served, and wait.
        fields = {"model": s.shared.model, "namespace": s.shared.cache_namespace, "engine": s.engine}
        self.heartbeat = Heartbeat(self.control, fields, self.progress, also=self.renew_signature)
        self.heartbeat.start()
        engine = create_engine(s.engine, s.shared.model, **s.engine_options())
        # Before gigabytes are loaded: a worker whose vectors cannot match the cached ones stops here.
        self.signature.check(signature_of(engine))
        log.info("loading engine %s for model %s", s.engine, s.shared.model)
        self.engine = engine  # closed by stop() whatever happens next
        engine.load()
        freeze_what_is_loaded()
        self.signature.claim(signature_of(engine))
        pass_tokens, pass_texts = s.batch_tokens or engine.pass_tokens, s.batch_max_texts or engine.pass_texts
        log.info(
            "engine passes of up to %d %s tokens and %d texts%s, %d in flight",
            pass_tokens,
            "padded" if engine.pads else "real",
            pass_texts,
            "" if s.batch_tokens or s.batch_max_texts else " (the engine's choice for its device)",
            max(1, int(getattr(engine, "concurrent_calls", 1))),
        )
        self.batcher = Batcher(
            engine,
            max_tokens=pass_tokens,
            max_texts=pass_texts,
            max_wait=s.batch_wait_ms / 1000,
            on_dead=self.on_engine_dead,
            on_pass=self.on_pass,
            on_depth=self.bulk_slots.refresh,
            backlog_seconds=s.backlog_seconds,
        )
        self.bulk_slots.deep = self.batcher.bulk_deep
        metrics.PASS_BUDGET_TOKENS.set(pass_tokens)
        self.marks.start()
        self.batcher.start()
        metrics.ENGINE_LOADED.set(1)
        self.metrics_port = metrics.serve(s.metrics_port, s.shared.model, s.engine)
        self.heartbeat.fields["metrics_port"] = str(self.metrics_port)
        # The passes the engine runs, and why not packed ones if they were asked for (``embq status``).
        self.heartbeat.fields["passes"] = str(getattr(engine, "passes_note", ""))
        log.info(
            "engine ready: dim=%d, consuming queues %s (bulk tasks hold at most %d of %d slots)",
            engine.dim,
            " then ".join(s.shared.queues),
            s.bulk_task_limit,
            s.concurrency,
        )

    def renew_signature(self) -> None:
        """At every heartbeat: a worker of another kind that took the model's signature (after
        ``embq cache clear`` removed ours) makes this one stop rather than mix vectors."""
        conflict = self.signature.renew()
        if conflict is not None and self.exit_code is None:
            self.exit_code = EXIT_START_FAILED
            self.set_ready(False)
            log.critical("stopping: %s", conflict)
            os.kill(os.getpid(), signal.SIGTERM)

    def progress(self) -> dict[str, str]:
        """For the heartbeat: totals, and the rates since the last beat (``embq status`` shows them)."""
        batcher = self.batcher
        if batcher is None:
            return {}
        now = (time.monotonic(), batcher.texts_done, batcher.tokens_done, batcher.padded_done, batcher.busy_time())
        last, self._last_beat = self._last_beat or now, now
        seconds = max(now[0] - last[0], 1e-9)
        texts, tokens, padded, busy = (now[i] - last[i] for i in range(1, 5))
        if busy >= SPEED_MIN_BUSY:  # an idle spell keeps the last rate: producers size tasks by it
            self._speed = texts / busy
        return {
            "texts": str(batcher.texts_done),
            "waiting": str(batcher.waiting()),
            "calls": str(batcher.calls),
            "texts_per_s": f"{texts / seconds:.1f}",
            "tokens_per_s": f"{tokens / seconds:.0f}",
            "busy": f"{busy / seconds:.3f}",
            "padding": f"{padded / tokens:.3f}" if tokens else "",
            "speed": f"{self._speed:.1f}" if self._speed else "",
            "pass_tokens": str(batcher.max_tokens),
            "pass_budget": batcher.lowered,
        }

    def set_ready(self, ready: bool) -> None:
        metrics.READY.set(int(ready))
        if self.heartbeat is not None:
            self.heartbeat.set_ready(ready)
        if not self.settings.ready_file:
            return
        if ready:
            Path(self.settings.ready_file).write_text(f"{os.getpid()}\n")
        else:
            Path(self.settings.ready_file).unlink(missing_ok=True)

    def on_pass(self, call: Call, entering: bool) -> None:
        """Mark in each task's attempts hash which of its rows a pass takes into the engine, as it enters; the
        mark goes once the pass leaves alive. A worker killed with a pass inside (SIGKILL, OOM, a crash of the
        engine) leaves the marks of those rows only: a task delivered again suspects them, not every text the
        worker held (``deliveries``). The runner only queues the marks (``PassMarks`` writes them): it never
        waits for Redis before a pass enters the engine."""
        name = f"{PASS_MARK}{id(call)}"
        tasks: dict[str, list[int]] = {}
        for job, row in zip(call.jobs, call.rows, strict=True):
            if job.task:
                tasks.setdefault(job.task, []).append(job.origin[row] if job.origin else row)
        if entering:
            self.marks.enter(name, tasks)
        else:
            self.marks.leave(name, tasks)

    def on_engine_dead(self, reason: str) -> None:
        """Never a worker that takes tasks it cannot serve: unready, warm shutdown, exit."""
        self.dead = reason
        self.exit_code = EXIT_ENGINE_DEAD
        self.set_ready(False)
        metrics.ENGINE_LOADED.set(0)
        log.critical("engine died (%s): stopping; its tasks return to the queue", reason)
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: stop consuming, finish, requeue

    def _open_cache(self) -> None:
        """On a Redis Cluster, clients of the whole cluster in place of the single node's."""
        if is_cluster(self.cache) or not cluster_enabled(self.control):  # type: ignore[arg-type]
            return
        url, shared = self.settings.shared.cache, self.settings.shared
        self.cache.close()
        self.control.close()
        self.cache = connect_cache(url)
        self.control = connect_cache_once(url, timeout=CONTROL_TIMEOUT)
        self.store = ResultStore(self.cache, shared.model, shared.cache_ttl, worker_name())
        self.signature = SignatureGuard(self.control, shared)
        log.info("the cache is a Redis Cluster of %d masters", len(self.cache.get_primaries()))  # type: ignore[union-attr]

    def stop(self) -> None:
        self.set_ready(False)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.holdings is not None:
            self.holdings.stop()
        if self.batcher is not None:
            self.batcher.stop(timeout=60)
        self.marks.stop(timeout=CONTROL_TIMEOUT + 1)  # the marks of passes that died inside, written before exit
        if self.engine is not None:
            self.engine.close()
            metrics.ENGINE_LOADED.set(0)
        self.cache.close()
        self.control.close()

    def embed(self, payload: Any, task_id: str, split: Callable[[EmbedPayload, int], None]) -> dict[str, int]:
        if self.engine is None or self.batcher is None:
            raise RuntimeError("engine not loaded: the worker took a task before its engine")
        if self.batcher.dead:
            # Taken between the engine's death and the consumer's stop (a task this worker
            # has just requeued comes straight back): return it untouched and uncounted.
            raise Reject(f"engine dead: {self.batcher.dead}", requeue=True)
        bulk = payload_lane(payload) == keys.BULK
        if bulk:
            self.bulk_slots.enter()
        try:
            starts, deaths, suspects = self.deliveries(task_id)
            result = run_embed(
                payload,
                self.settings,
                self.engine,
                self.batcher,
                self.store,
                engine_deaths=deaths,
                suspects=suspects,
                # A part split from a task that came back is a redelivery too: rows of it may be stored already.
                redelivered=starts > 1 or task_id != root_task_id(task_id),
                split=split,
                task=task_id,
            )
            self.cache.delete(keys.attempts_key(task_id))
            return result
        finally:
            if bulk:
                self.bulk_slots.leave()

    def deliveries(self, task_id: str) -> tuple[int, int, list[int]]:
        """``(starts, deaths, suspects)`` of a task: how often it was started, at how many of those starts an
        engine died with some of its rows inside a pass, and which rows were inside at the last death (the
        marks ``on_pass`` left). Rows that were only waiting are not suspected."""
        key = keys.attempts_key(task_id)
        pipe = pipeline(self.cache, atomic=True)
        pipe.hincrby(key, "starts", 1)
        pipe.hgetall(key)
        pipe.expire(key, keys.ATTEMPTS_TTL)
        starts, fields, _ = pipe.execute()
        marks = [name for name in fields if name.startswith(PASS_MARK.encode())]
        suspects = sorted({int(row) for name in marks for row in np.frombuffer(fields[name], dtype="<u4")})
        deaths = int(fields.get(b"deaths", 0)) + (1 if marks else 0)
        if marks:
            pipe = pipeline(self.cache, atomic=True)
            pipe.hdel(key, *marks)
            pipe.hset(key, "deaths", deaths)
            pipe.execute()
        return int(starts), deaths, suspects


class PassMarks:
    """The marks of ``Runtime.on_pass``, written to the cache Redis by a thread of their own, in the order the
    runners made them: a pass enters the engine at once, not after a Redis round trip.

    Marks stay good crash evidence. An entering pass's mark is queued before its forward starts and written
    within a round trip (a millisecond on a local network), while a pass that kills the engine (a CUDA fault,
    the OOM killer, a segfault) takes at least its forward's time to do so, and an engine death found by the
    worker stops it only after these marks are written (``stop``). A mark not written yet when the worker
    dies means only that this death is not counted against the pass's texts: they run normally once more,
    and a text that kills the engine again is suspected then. Marks of passes that left alive ride with the
    next entering pass's write, as one round trip."""

    def __init__(self, client: Callable[[], CacheClient]) -> None:
        self._client = client
        #: ``(task, field, rows)`` in the order made; rows None removes the field (a pass that left alive).
        self._queue: list[tuple[str, str, bytes | None]] = []
        self._wake = False
        self._stopping = False
        self._failing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="embq-pass-marks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enter(self, name: str, tasks: dict[str, list[int]]) -> None:
        """Queue the marks of a pass entering the engine: each task's rows in it, under the field ``name``."""
        with self._cond:
            self._queue += [(task, name, np.asarray(rows, dtype="<u4").tobytes()) for task, rows in tasks.items()]
            self._wake = True
            self._cond.notify()

    def leave(self, name: str, tasks: dict[str, list[int]]) -> None:
        """Queue the removal of a pass's marks once it left the engine alive (written with the next marks)."""
        with self._cond:
            self._queue += [(task, name, None) for task in tasks]

    def stop(self, timeout: float) -> None:
        """Write what is queued, then end the thread."""
        with self._cond:
            self._stopping = self._wake = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wake:
                    self._cond.wait()
                batch, self._queue, self._wake = self._queue, [], False
                stopping = self._stopping
            if batch:
                self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[tuple[str, str, bytes | None]]) -> None:
        pipe = self._client().pipeline(transaction=False)  # no retries: a Redis gone costs marks, not passes
        for task, field, rows in batch:
            key = keys.attempts_key(task)
            if rows is None:
                pipe.hdel(key, field)
            else:
                pipe.hset(key, field, rows)
                pipe.expire(key, keys.ATTEMPTS_TTL)
        try:
            pipe.execute()
        except Exception as e:  # a mark is evidence for later, never a reason to stop marking
            if not self._failing:  # said without the commands: they would show keys and rows
                reason = refusal(e) if isinstance(e, redis.exceptions.RedisError) else type(e).__name__
                log.warning("cannot mark passes in the engine (%s); passes go on without marks", reason)
            self._failing = True
            return
        if self._failing:
            log.info("passes in the engine are marked again")
            self._failing = False


def wait_for_redis(role: str, url: str, wait: float, origin: str = "") -> None:
    """Return once the Redis at ``url`` answers; raise ``BackendUnavailableError`` after ``wait`` seconds.

    A worker that cannot reach its Redis at start says so in one line and exits
    (status 3) for its orchestrator to restart, rather than retrying unseen;
    SIGTERM during the wait stops it at once."""
    client = connect_once(url, timeout=min(5.0, wait))
    deadline = time.monotonic() + wait
    variable = {"broker": "EMBQ_BROKER_URL", "cache": "EMBQ_CACHE_URL"}[role]
    where = f" (from {origin})" if origin else ""
    warned = False
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.RedisError as e:
                reason = redis_reason(e)
                if will_not_heal(e):
                    raise BackendUnavailableError(
                        f"{role} Redis at {redact(url)} refused this worker: {reason}"
                    ) from None
                if time.monotonic() >= deadline:
                    start = start_hint(url) if nothing_listens(e) else "start it"
                    raise BackendUnavailableError(
                        f"{role} Redis at {redact(url)}{where} did not answer within {wait:.0f}s ({reason}): "
                        f"{start}, or set --redis-url, EMBQ_REDIS_URL (or {variable}) to one that runs"
                    ) from None
                if not warned:
                    log.warning(
                        "%s Redis at %s%s does not answer (%s); waiting up to %.0fs (EMBQ_REDIS_WAIT)",
                        role,
                        redact(url),
                        where,
                        reason,
                        wait,
                    )
                    warned = True
            worker_state.maybe_shutdown()  # SIGTERM while waiting: Celery's warm shutdown, now
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    finally:
        client.close()


def check_eviction_policy(settings: WorkerSettings) -> None:
    """Warn when the broker's Redis may evict queued tasks.

    The broker must never evict. When it is also the cache (same URL, or two
    URLs that reach the same server), an LRU policy that covers all keys can
    drop queued tasks to make room for vectors.
    """
    shared = settings.shared
    broker = connect_once(shared.broker)
    cache = connect_once(shared.cache)
    try:
        policy = broker.config_get("maxmemory-policy").get("maxmemory-policy")
        shared_server = shared.broker == shared.cache or same_server(broker, cache)
    except redis.exceptions.RedisError as e:
        log.warning(
            "could not read maxmemory-policy of the broker %s (%s): make sure it is noeviction",
            redact(shared.broker),
            redis_reason(e),
        )
        return
    finally:
        broker.close()
        cache.close()
    if policy in UNSAFE_EVICTION:
        log.warning(
            "the broker Redis %s has maxmemory-policy %s: it can evict queued tasks%s. "
            "Use noeviction for the broker and give the cache its own Redis (EMBQ_CACHE_URL).",
            redact(shared.broker),
            policy,
            " to make room for cached vectors" if shared_server else "",
        )


def same_server(a: redis.Redis, b: redis.Redis) -> bool:
    """Two connections to one Redis server (another database number or host alias)."""
    return bool(a.info("server").get("run_id") == b.info("server").get("run_id"))


class StoppedWhileStarting(BaseException):
    """Raised in the main thread by SIGTERM or Ctrl-C while the worker starts (waits for Redis, loads its
    engine): a start that takes minutes on a GPU must not hold a shutdown. A ``BaseException``, so that
    no ``except Exception`` on the way swallows it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def engine_step(runtime: Runtime) -> type[bootsteps.StartStopStep]:
    """A worker bootstep that loads the engine after logging is set up and before the consumer starts."""

    class EngineStep(bootsteps.StartStopStep):
        requires = ("celery.worker.components:Pool",)

        def start(self, worker: Any) -> None:
            runtime.starting = True
            try:
                runtime.start()
            except StoppedWhileStarting as e:
                runtime.exit_code = EXIT_INTERRUPTED if e.signal_name == "SIGINT" else 0
                log.warning("%s while starting: stopped before the engine was ready", e.signal_name)
                raise SystemExit(runtime.exit_code) from None
            except EmbqError as e:  # says what to do: no traceback
                log.critical("worker cannot start: %s", e)
                runtime.exit_code = EXIT_START_FAILED
                raise SystemExit(EXIT_START_FAILED) from None
            except redis.exceptions.RedisError as e:
                shared = runtime.settings.shared
                log.critical(
                    "worker cannot start: the cache Redis at %s (from %s) failed: %s",
                    redact(shared.cache),
                    shared.origin("cache"),
                    refusal(e),
                )
                runtime.exit_code = EXIT_START_FAILED
                raise SystemExit(EXIT_START_FAILED) from None
            except Exception:
                log.critical("worker cannot start: its engine did not load", exc_info=True)
                runtime.exit_code = EXIT_START_FAILED
                raise SystemExit(EXIT_START_FAILED) from None
            finally:
                runtime.starting = False

    return EngineStep


def lane_step(runtime: Runtime) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that hands the consumer to ``BulkSlots`` (again after each reconnection)."""

    class LaneStep(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, consumer: Any) -> None:
            runtime.bulk_slots.attach(consumer)

    return LaneStep


def check_pool(pool_cls: Any) -> None:
    pool = pool_cls if isinstance(pool_cls, str) else f"{pool_cls.__module__}.{pool_cls.__name__}"
    if not any(name in pool for name in ("thread", "solo")):
        raise ConfigurationError(
            f"embq workers host one engine per process and need --pool threads (got {pool}); "
            "run one worker per GPU instead of a prefork pool"
        )


def create_app(settings: WorkerSettings) -> Celery:
    """A Celery app that serves ``settings.shared.model`` with one engine in this process."""
    kombu_fixes.apply()
    app = make_celery(settings.shared, main="embq.worker")
    app.conf.update(
        # Both lanes, the interactive one first (a plain ``celery worker`` without -Q consumes these).
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in settings.shared.queues],
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        # A lost connection must not cancel tasks that late acks will redeliver anyway.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    runtime = Runtime(settings)
    app.embq_runtime = runtime  # type: ignore[attr-defined]

    @app.task(
        name=TASK_EMBED,
        bind=True,
        autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=10,
    )
    def embed(self: Any, payload: Any) -> dict[str, int]:
        try:
            try:
                return runtime.embed(
                    payload, self.request.id, lambda part, index: send_part(self.request.id, part, index)
                )
            except BatcherStopped as e:  # back to the queue; the marks of ``on_pass`` name its suspects
                raise Reject(str(e), requeue=True) from e
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            raise  # retried (autoretry_for)
        except redis.exceptions.RedisError as e:
            # Celery logs a failed task's exception and sends it to Flower; a pipeline's error names
            # its command with every argument, vectors included: only Redis's reason goes on.
            raise BackendUnavailableError(f"the cache Redis refused a command: {refusal(e)}") from None

    def send_part(task_id: str, part: EmbedPayload, index: int) -> None:
        part_id = split_task_id(task_id, index)
        queue = payload_queue(part)
        app.send_task(TASK_EMBED, args=[part], task_id=part_id, queue=queue, exchange="", routing_key=queue)

    def on_init(sender: Any, **_: Any) -> None:
        # Celery logs and swallows exceptions from signal handlers; a worker
        # that would fork copies of its engine must not start, so it exits.
        if sender.app is not app:
            return
        try:
            check_pool(sender.pool_cls)
        except ConfigurationError as e:
            log.critical("worker cannot start: %s", e)
            raise SystemExit(EXIT_START_FAILED) from None

    def on_ready(sender: Any, **_: Any) -> None:
        if sender.app is app:
            runtime.set_ready(True)
            note_interrupts()

    def note_interrupts() -> None:
        """Celery's Ctrl-C handler stops the worker with the exit code of a failure: tell it apart."""
        if threading.current_thread() is not threading.main_thread():
            return
        celerys = signal.getsignal(signal.SIGINT)
        if not callable(celerys):
            return

        def on_interrupt(signum: int, frame: Any) -> None:
            if runtime.exit_code is None:
                runtime.exit_code = EXIT_INTERRUPTED
            celerys(signum, frame)

        signal.signal(signal.SIGINT, on_interrupt)

    def on_received(sender: Any, request: Any = None, **_: Any) -> None:
        holdings = runtime.holdings
        if holdings is None or request is None or sender.app is not app:
            return
        tag = getattr(request.message, "delivery_tag", None)
        queue = (request.delivery_info or {}).get("routing_key")
        if tag and queue:
            holdings.took(request.id, str(tag), queue)

    def on_postrun(sender: Any = None, task_id: str = "", **_: Any) -> None:
        if runtime.holdings is not None and getattr(sender, "app", None) is app:
            runtime.holdings.left(task_id)

    def on_shutting_down(sig: str = "SIGTERM", **_: Any) -> None:
        if runtime.starting and threading.current_thread() is threading.main_thread():
            raise StoppedWhileStarting(sig)  # out of Celery's signal handler, into the start it interrupts
        # Warm shutdown: Celery waits for the running tasks. Bulk tasks still wholly in the backlog
        # (up to EMBQ_BACKLOG_SECONDS of engine work) go back to the queue now, for other workers.
        # On a thread of its own: this runs in the signal handler, which must never wait for a lock.
        threading.Thread(target=shed_bulk, name="embq-shed", daemon=True).start()

    def shed_bulk() -> None:
        if runtime.batcher is not None:
            shed = runtime.batcher.shed()
            if shed:
                log.info("shutting down: %d bulk tasks not started go back to the queue", shed)

    def on_shutdown(sender: Any, **_: Any) -> None:
        # Celery stops with exitcode 1 after an "Unrecoverable error" but its CLI exits 0: a supervisor
        # must see that this worker died, so the status is kept for ``embq worker`` to exit with.
        failed = getattr(sender, "exitcode", None)
        if failed and runtime.exit_code is None:
            runtime.exit_code = EXIT_WORKER_FAILED
        runtime.stop()

    app.steps["worker"].add(engine_step(runtime))
    app.steps["consumer"].add(lane_step(runtime))
    signals.worker_init.connect(on_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    signals.task_received.connect(on_received, weak=False)
    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    return app
