"""The broker behind Redis Sentinel (a master, a replica, three sentinels), the cache on the session's Redis."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis

from producer import EmbeddingClient, Settings, keys
from producer.contract import PUBLISH_RETRY, celery_config
from producer.errors import ConfigurationError
from tests.failover import embed_while_killing, expected, worries
from tests.topology import LocalSentinel
from worker.local import LocalRedis, LocalWorker
from worker.status import render_status

MODEL = "hash/sentinel"


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalSentinel]:
    with LocalSentinel() as started:
        yield started


@pytest.fixture
def cache(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def settings(broker: LocalSentinel, cache_url: str) -> Settings:
    return Settings(broker_url=broker.url, cache_url=cache_url, model=MODEL)


def worker(broker: LocalSentinel, cache_url: str, **env: str) -> LocalWorker:
    urls = {"EMBQ_BROKER_URL": broker.url, "EMBQ_CACHE_URL": cache_url}
    return LocalWorker(cache_url, engine="hash", model=MODEL, env={**urls, **env})


def computed(cache: redis.Redis) -> int:
    return int(cache.hget(keys.stats_key(MODEL), "texts") or 0)


def test_a_sentinel_url_must_name_its_master_and_serves_only_the_broker(redis_server: LocalRedis) -> None:
    with pytest.raises(ConfigurationError, match="master_name"):
        Settings(broker_url="sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380")
    with pytest.raises(ConfigurationError, match="only the broker"):
        Settings(cache_url="sentinel://127.0.0.1:26379?master_name=embq")
    two = Settings(broker_url="sentinel://h1:26379;sentinel://h2:26379?master_name=embq")
    config = celery_config(two)
    assert config["broker_url"] == "sentinel://h1:26379;sentinel://h2:26379"
    assert config["broker_transport_options"]["master_name"] == "embq"
    # Kombu counts a publishing retry per sentinel: a failover is ridden out as long as with one Redis.
    assert config["task_publish_retry_policy"]["max_retries"] == 2 * PUBLISH_RETRY["max_retries"]


def test_embedding_status_and_queues_through_sentinel(
    broker: LocalSentinel, redis_url: str, cache: redis.Redis
) -> None:
    texts = [f"through sentinel {i}" for i in range(800)]
    with worker(broker, redis_url), EmbeddingClient(settings=settings(broker, redis_url)) as client:
        np.testing.assert_array_equal(client.embed(texts, timeout=60), expected(texts))
    assert computed(cache) == 800
    # A queued task shows in status: nobody serves this model now.
    host, port = broker.master_address()
    master = redis.Redis(host=host, port=port)
    master.lpush(keys.queue_name(MODEL), b"{}")
    try:
        screen = render_status(settings(broker, redis_url))
    finally:
        master.delete(keys.queue_name(MODEL))
    line = next(row for row in screen.splitlines() if row.startswith(MODEL))
    assert line.split()[1] == "1", screen


def test_a_broker_failover_costs_neither_vectors_nor_calls(
    broker: LocalSentinel, redis_url: str, cache: redis.Redis
) -> None:
    """Four producers, 100,000 texts with 30% repeats; the broker's master dies while they run and a
    sentinel promotes its replica: every call returns with the right vectors, and what the dead master
    had not passed on (tasks, acknowledgements) is sent again rather than lost."""
    rng = np.random.default_rng(11)
    calls = [[f"row {i}" for i in rng.integers(0, 70_000, 25_000)] for _ in range(4)]
    wanted = len(set().union(*calls))
    with worker(broker, redis_url, EMBQ_HASH_SECONDS_PER_TEXT="0.0001") as running:
        clients = [EmbeddingClient(settings=settings(broker, redis_url)) for _ in calls]
        results, took, failover = embed_while_killing(clients, calls, broker.kill_master)
        assert running.process is not None and running.process.poll() is None, worries(running)
    for texts, result in zip(calls, results, strict=True):
        assert isinstance(result, np.ndarray), result
        np.testing.assert_array_equal(result, expected(texts))
    done = computed(cache)
    print(f"broker failover {failover:.1f}s, calls {took:.1f}s, computed {done} of {wanted} distinct")
    assert wanted <= done <= wanted * 1.1
