"""Which models the gateway serves: those named at start, and those with a worker online.

Workers announce themselves in the cache Redis (``embq:workers`` indexes their
heartbeat hashes, see ``embq.producer.keys``), so a look costs one ZRANGE and one
HGET per worker, never a SCAN of the vectors. A request for a model seen
online in the last look is served without any look; a model not seen triggers
a fresh look (concurrent misses share one; at most ten a second), then a look
for the model's signature (served before, its workers all down: its requests
wait), before the 404.
A model is served from the moment ``GET /v1/models`` lists it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from embq.producer import keys

log = logging.getLogger(__name__)

#: Seconds a look at the workers is reused for a model not found in it: a flood of
#: requests for unknown models costs Redis at most 1 / MISS_RECHECK looks a second.
MISS_RECHECK = 0.1


@dataclass(frozen=True)
class ModelInfo:
    id: str
    #: Unix time its oldest online worker started, or the gateway started for a named model without one.
    created: int
    workers: int


class ModelCatalog:
    def __init__(
        self,
        cache: Any,
        named: tuple[str, ...],
        started: float | None = None,
        namespace: str = keys.DEFAULT_NAMESPACE,
        cache_url: str = "",
        cache_options: dict[str, Any] | None = None,
    ) -> None:
        """``cache``: an asyncio Redis client of the cache Redis; ``cache_url`` and ``cache_options``: how to
        reach the whole cluster if that Redis is a node of one. Only workers of ``namespace`` count: one of
        another cache namespace consumes another queue."""
        self.cache = cache
        #: Replaced by a client of the whole cluster when the cache turns out to be a Redis Cluster node.
        self.cluster: RedisCluster | None = None
        self.cache_url, self.cache_options = cache_url, cache_options or {}
        self._looked_at_cache = not cache_url
        self.namespace = namespace
        self.named = tuple(dict.fromkeys(named))
        self.started = int(started if started is not None else time.time())
        self._online: dict[str, ModelInfo] = {}
        self._looked = float("-inf")
        self._lock = asyncio.Lock()

    async def look(self, max_age: float = 0.0) -> dict[str, ModelInfo]:
        """Models with a worker online, from a look at most ``max_age`` seconds old.

        Raises redis' errors when the cache is unreachable."""
        async with self._lock:  # concurrent callers share one look
            if time.monotonic() - self._looked < max_age:
                return self._online
            await self._look_at_cache()
            names = [n.decode() if isinstance(n, bytes) else n for n in await self.cache.zrange(keys.WORKERS, 0, -1)]
            pipe = self.cache.pipeline(transaction=False)
            for name in names:
                pipe.hmget(keys.worker_key(name), "model", "started", "namespace")
            online: dict[str, ModelInfo] = {}
            for model, started, namespace in await pipe.execute() if names else []:
                if model is None:  # its hash expired: the worker is gone
                    continue
                if (namespace.decode() if namespace else keys.DEFAULT_NAMESPACE) != self.namespace:
                    continue
                model = model.decode()
                since = int(float(started or time.time()))
                seen = online.get(model)
                online[model] = ModelInfo(
                    model, min(since, seen.created) if seen else since, (seen.workers if seen else 0) + 1
                )
            self._online, self._looked = online, time.monotonic()
            return online

    async def listed(self) -> list[ModelInfo]:
        """What ``GET /v1/models`` shows: named models first, then the others online, by name."""
        online = await self.look()
        models = [online.get(m, ModelInfo(m, self.started, 0)) for m in self.named]
        return models + [online[m] for m in sorted(online) if m not in self.named]

    async def serves(self, model: str) -> bool:
        """Named, online, or served before (its workers' signature is in the cache): a model whose workers
        are all down is still served, its requests wait for one as a client's calls do; only a model no
        worker has ever served is refused (``embq.producer.errors.ModelNotServedError``)."""
        if model in self.named or model in self._online:
            return True
        if model in await self.look(MISS_RECHECK):
            return True
        await self._look_at_cache()
        return bool(await self.cache.exists(keys.signature_key(self.namespace, model)))

    async def _look_at_cache(self) -> None:
        """On a Redis Cluster the workers' keys live on several nodes: read them through the cluster."""
        if self._looked_at_cache:
            return
        if (await self.cache.info("cluster")).get("cluster_enabled"):
            self.cluster = RedisCluster.from_url(self.cache_url, **self.cache_options)
            self.cache = self.cluster
        self._looked_at_cache = True

    async def aclose(self) -> None:
        if self.cluster is not None:
            await self.cluster.aclose()
