"""``AsyncEmbeddingClient``: ``EmbeddingClient``'s contract for asyncio services.

The protocol is the same ``Dispatcher``; only its driver differs: a task on the
caller's event loop with redis-py's asyncio client, where the synchronous
client runs a thread. Celery's publishing is synchronous, so tasks are sent from
the loop's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
import redis
import redis.asyncio
from celery import Celery
from redis.cluster import RedisCluster

from embq.producer import keys
from embq.producer.backend import aconnect, backend_errors
from embq.producer.call import Call, before_sending, choose_lane
from embq.producer.client import on_cache, send_tasks
from embq.producer.cluster import connect_cluster, read_stream
from embq.producer.contract import make_celery, signature_dimension
from embq.producer.dispatcher import NOTICES_PER_READ, Dispatcher, Look, Op, PerText, Read, Redis, Send, Wait
from embq.producer.errors import EmbqError
from embq.producer.settings import Settings
from embq.producer.validation import validate_options, validate_texts

log = logging.getLogger(__name__)


class AsyncEmbeddingClient:
    """Same arguments, errors and guarantees as ``EmbeddingClient``; ``embed`` is awaitable.

    A client belongs to the event loop of its first call (its connections do);
    concurrent calls on that loop share round trips and tasks.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        model: str | None = None,
        broker_url: str | None = None,
        cache_url: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = Settings.for_client(
            redis_url, model=model, broker_url=broker_url, cache_url=cache_url, settings=settings
        )
        self.model = self.settings.model
        self.queue = self.settings.queue
        self._driver: AsyncDriver | None = None
        self._dimension: int | None = None

    async def embed(
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

        The arguments mean what they mean for ``EmbeddingClient.embed``."""
        items = validate_texts(texts, self.settings.max_text_bytes)
        validate_options(instruction, dim, timeout, self.settings.max_text_bytes, truncate)
        lane = choose_lane(priority, len(items), self.settings)
        if not items or dim is not None:
            settled = before_sending(items, dim, await self.dimension())
            if settled is not None:
                return settled
        deadline = None if timeout is None else time.monotonic() + timeout
        call = Call(items, instruction, dim=dim, deadline=deadline, lane=lane, truncate=truncate)
        driver = self._get_driver()
        await driver.submit(call)
        await driver.wait(call)
        call.count(self.model)
        return call.result(self.settings)

    async def dimension(self) -> int | None:
        """The model's full dimension, as its workers state it (None before any worker of it ran)."""
        if self._dimension is None:
            with backend_errors("cache", self.settings.cache, self.settings.origin("cache")):
                raw = await self._get_driver().cache.get(keys.signature_key(self.settings.cache_namespace, self.model))
            self._dimension = signature_dimension(raw)
        return self._dimension

    def _get_driver(self) -> AsyncDriver:
        loop = asyncio.get_running_loop()
        if self._driver is None or self._driver.loop is not loop:
            if self._driver is not None:
                raise EmbqError("an AsyncEmbeddingClient is bound to the event loop of its first call")
            self._driver = AsyncDriver(self.settings, loop)
        return self._driver

    async def aclose(self) -> None:
        """Stop the dispatcher and release connections; texts still queued keep their claims."""
        driver, self._driver = self._driver, None
        if driver is not None:
            await driver.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncDriver:
    """Runs a ``Dispatcher`` as a task on ``loop`` with redis-py's asyncio client."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.core = Dispatcher(settings)
        self.cache = aconnect(settings.cache)
        self.broker = aconnect(settings.broker)
        #: On a Redis Cluster (found out at the first use), the cache's work runs in threads with
        #: redis-py's cluster client, whose per-node scripts (``embq.producer.cluster``) have no asyncio twin.
        self.cluster: RedisCluster | None = None
        self.looked_at_cache = False
        self.arrived = asyncio.Event()
        self.woken = False
        self.pokes: set[asyncio.Task[None]] = set()
        self._celery: Celery | None = None
        self.task = loop.create_task(self._run(), name="embq-dispatcher")

    async def submit(self, call: Call) -> None:
        future: asyncio.Future[None] = self.loop.create_future()

        def finish() -> None:
            if not future.done():
                future.set_result(None)

        call.on_finish = finish
        call.signal = future
        self.core.inbox.append(call)
        await self.poke()

    async def poke(self) -> None:
        """Wake the dispatcher for a new or cancelled call, from its wait or its blocking read."""
        self.arrived.set()
        if self.core.reading and not self.woken:  # the dispatcher blocks on its stream
            self.woken = True
            await self._wake()

    async def wait(self, call: Call) -> None:
        """Until ``call`` finishes; a cancelled caller gives it up (its claims are released)."""
        try:
            done, _ = await asyncio.wait({call.signal, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if call.signal not in done:
                raise EmbqError("embq's dispatcher task stopped; see the log for why")
        except asyncio.CancelledError:
            call.cancel()
            poke = self.loop.create_task(self.poke())  # this task is being cancelled: wake from another
            self.pokes.add(poke)
            poke.add_done_callback(self.pokes.discard)
            raise

    async def close(self) -> None:
        self.core.closing = True
        self.arrived.set()
        await self._wake()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        await self.cache.aclose()
        await self.broker.aclose()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.close)
        if self._celery is not None:
            self._celery.close()

    async def _wake(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.xadd, self.core.reply, {"w": b""}, nomkstream=True)
            elif self.looked_at_cache:
                await self.cache.xadd(self.core.reply, {"w": b""}, nomkstream=True)

    async def _look_at_cache(self) -> None:
        """Whether the cache is a cluster, asked once, at the first use."""
        if self.looked_at_cache:
            return
        try:
            clustered = (await self.cache.info("cluster")).get("cluster_enabled")
        except redis.exceptions.ResponseError:  # INFO refused (an ACL): a single Redis, as in producer.cluster
            clustered = False
        if clustered:
            self.cluster = await asyncio.to_thread(connect_cluster, self.settings.cache)
        self.looked_at_cache = True

    async def _run(self) -> None:
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
                result = await self.execute(op)
            except Exception as e:
                error = e

    async def execute(self, op: Op) -> Any:
        if isinstance(op, PerText | Look | Read) or (isinstance(op, Redis) and op.target == "cache"):
            await self._look_at_cache()
            if self.cluster is not None and not isinstance(op, Read):
                return await asyncio.to_thread(on_cache, self.cluster, op)
        if isinstance(op, PerText | Look):
            replies = await self._redis(op.on_one_redis())
            return replies[0] if replies else []
        if isinstance(op, Redis):
            return await self._redis(op)
        if isinstance(op, Read):
            return await self._read(op)
        if isinstance(op, Send):
            return await self.loop.run_in_executor(None, send_tasks, self._app(), op)
        if isinstance(op, Wait):
            self.arrived.clear()
            if not self.core.inbox and not self.core.closing:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), op.timeout)
            return None
        await asyncio.sleep(max(0.0, op.seconds))
        return None

    async def _redis(self, op: Redis) -> list[Any]:
        client = self.cache if op.target == "cache" else self.broker
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            for command in op.commands:
                pipe.execute_command(*command)
            try:
                return await pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for source in op.scripts.values():  # a restarted Redis forgot them
                    await client.script_load(source)
        raise AssertionError("unreachable")

    async def _read(self, op: Read) -> Any:
        block = 0.0 if self.core.inbox or self.core.closing else op.block
        self.core.reading = block > 0
        try:
            wait_ms = max(1, int(block * 1000)) if block else None
            if self.cluster is not None:  # in a thread: a new call wakes it with an entry, as on one Redis
                return await asyncio.to_thread(
                    read_stream, self.cluster, self.core.reply, op.last_id, NOTICES_PER_READ, wait_ms
                )
            return await self.cache.xread({self.core.reply: op.last_id}, count=NOTICES_PER_READ, block=wait_ms)
        finally:
            self.core.reading = self.woken = False

    def _app(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery
