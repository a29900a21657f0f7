"""Embedded defaults: a private Redis and one worker, started for one ``embq embed`` and stopped after it.

The worker starts only when the first text is not cached: a rerun of a finished
job reads everything from the private cache and loads no model.

Data lives in ``EMBQ_HOME/<engine>/redis`` (vectors depend on the engine, so
each engine has its own): ``appendonly yes``, ``appendfsync everysec``, no RDB
snapshots. Redis writes every command to the append-only file before it
answers, so what a run finished survives a SIGKILL of the embed process or of
Redis itself (only a crash of the machine can lose the last second); RDB
snapshots alone would lose everything since the last one. A rerun, or the
next job on the same texts, finds those vectors cached.

Two runs on one directory take turns: the second waits, saying so, on a lock
that the first holds until its private Redis and worker have exited. The
broker (database 1) is emptied at start, and the cache database loses what
only a live job needs (liveness keys, reply streams, heartbeats): tasks
and claims of a killed run would only make the rerun wait a lease for texts
it sends again anyway; without its liveness key, the rerun takes its claims
over at once. Vectors, signatures and statistics stay.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis

from embq.producer import keys
from embq.producer.errors import EmbqError
from embq.worker.home import HomeLock
from embq.worker.local import LocalRedis, LocalWorker

#: Variables that point embq at a Redis of the user's; without any, embedded defaults start a private one.
REDIS_VARIABLES = ("EMBQ_REDIS_URL", "EMBQ_BROKER_URL", "EMBQ_CACHE_URL")
#: Database of the private broker; the cache is database 0.
BROKER_DB = 1
#: Seconds the private Redis may take to load its file, and the worker its model.
START_TIMEOUT = 600.0
#: Seconds an interrupted stop grants the worker, then Redis, before SIGKILL (the whole stop stays under 5 s).
FAST_GRACE = (1.0, 2.0)
#: The same after a finished job: an idle worker's warm shutdown takes about a second.
GRACE = (15.0, 15.0)
#: Cache-side keys a new private stack keeps; the rest belonged to live jobs that are gone.
KEPT = (keys.VECTOR, keys.SIGNATURE, keys.STATS)


def configured_redis(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in REDIS_VARIABLES)


def engine_dir(home: Path, engine: str) -> Path:
    return home / engine


class PrivateStack:
    """The private Redis and worker of one ``embq embed``; ``start`` returns the URLs for its client."""

    def __init__(self, home: Path, *, engine: str, model: str, say: Callable[[str], None]) -> None:
        self.dir = engine_dir(home, engine)
        self.engine = engine
        self.model = model
        self.say = say
        self.lock = HomeLock(self.dir)
        self.redis: LocalRedis | None = None
        self.worker: LocalWorker | None = None
        self.urls: dict[str, str] = {}
        #: Set by ``stop``: a worker must not start after it (``start_worker`` runs on another thread).
        self.stopped = False
        self._guard = threading.Lock()
        self._keeper_done = threading.Event()

    def start(self) -> dict[str, str]:
        """Start the private Redis; the worker starts with ``start_worker``, at the first text not cached."""
        self.lock.acquire(wait=True, on_busy=self._busy)
        assert self.lock.fd is not None
        shutil.rmtree(self.dir / "run", ignore_errors=True)  # what a killed run left; nobody else uses it now
        self.say("starting a private Redis…")
        self.redis = LocalRedis(
            password=secrets.token_hex(16), data_dir=self.dir / "redis", private=True, pass_fds=(self.lock.fd,)
        )
        self.redis.start(timeout=START_TIMEOUT)
        cache_url, broker_url = self.redis.url, self.redis.url_of(BROKER_DB)
        forget_dead_jobs(cache_url, broker_url)
        self.urls = {"redis_url": cache_url, "broker_url": broker_url, "cache_url": cache_url}
        return self.urls

    def start_worker(self) -> None:
        """Start the worker and wait until its model is loaded (``EmbqError`` if it cannot start); called
        once, before the first task is sent, so that a fully cached input costs no model load."""
        with self._guard:
            if self.stopped or self.redis is None:
                raise EmbqError("the private stack is stopping")
            assert self.lock.fd is not None
            env = {"EMBQ_BROKER_URL": self.urls["broker_url"], "EMBQ_CACHE_URL": self.urls["cache_url"]}
            self.say(f"starting a {self.engine} worker for the texts not cached (loading the model)…")
            started = time.monotonic()
            self.worker = LocalWorker(
                self.urls["cache_url"],
                engine=self.engine,
                model=self.model,
                env=env,
                run_dir=self.dir / "run" / f"worker-{os.getpid()}",
                private=True,
                pass_fds=(self.lock.fd,),
            )
            worker = self.worker
        self._launch(worker)
        worker.wait_ready(timeout=START_TIMEOUT)
        self.say(f"worker ready in {time.monotonic() - started:.1f}s")

    def _launch(self, worker: LocalWorker) -> None:
        """Start the worker process from a thread that lives until ``stop_worker``: the signal that kills
        a private child when its parent dies (``PR_SET_PDEATHSIG``) follows the thread that started it, and
        the caller's thread (the client's dispatcher) ends before the job does."""
        launched = threading.Event()
        failed: list[BaseException] = []

        def keep() -> None:
            try:
                worker.start(wait=False)
            except BaseException as e:
                failed.append(e)
            launched.set()
            self._keeper_done.wait()

        threading.Thread(target=keep, name="embq-private-worker", daemon=True).start()
        launched.wait()
        if failed:
            raise failed[0]

    def _busy(self, holder: int | None) -> None:
        who = f"the embq embed (pid {holder})" if holder else "another embq embed"
        self.say(f"waiting for {who} that uses {self.dir} to finish…")

    def stop_worker(self, fast: bool) -> None:
        """Stop the worker, if it runs or is loading, and start no other; Redis stays up."""
        with self._guard:
            self.stopped = True
            worker, self.worker = self.worker, None
        try:
            if worker is not None:
                worker.stop(grace=(FAST_GRACE if fast else GRACE)[0], hurried=fast)
        finally:
            self._keeper_done.set()

    def stop(self, fast: bool) -> None:
        """Worker first (it must not outlive its Redis), then Redis; ``fast`` after an interruption.

        Each step runs even when the one before failed or was interrupted."""
        redis_grace = (FAST_GRACE if fast else GRACE)[1]
        try:
            self.stop_worker(fast)
        finally:
            redis_server, self.redis = self.redis, None
            try:
                if redis_server is not None:
                    redis_server.stop(grace=redis_grace)
            finally:
                shutil.rmtree(self.dir / "run", ignore_errors=True)
                self.lock.release()


def forget_dead_jobs(cache_url: str, broker_url: str) -> None:
    """Empty the private broker and drop the cache-side keys of jobs that are gone (see the module doc)."""
    broker = redis.Redis.from_url(broker_url)
    cache = redis.Redis.from_url(cache_url)
    try:
        broker.flushdb()
        stale: list[bytes] = []
        for key in cache.scan_iter(match=f"{keys.PREFIX}:[^v]*", count=1000):  # Redis filters the vectors out
            if not key.decode().startswith(KEPT):
                stale.append(key)
            if len(stale) >= 1000:
                cache.unlink(*stale)
                stale = []
        if stale:
            cache.unlink(*stale)
    finally:
        broker.close()
        cache.close()
