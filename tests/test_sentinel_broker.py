"""The broker behind Redis Sentinel (a master, a replica, three sentinels), the cache on the session's Redis."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from embq.producer import EmbeddingClient, Settings, keys, sentinel
from embq.producer.backend import aconnect, connect, connect_once, redact
from embq.producer.contract import PUBLISH_RETRY, celery_config
from embq.producer.errors import ConfigurationError
from embq.worker.local import (
    LocalRedis,
    LocalWorker,
    child_options,
    free_port,
    redis_server_binary,
    stop_process,
    wait_until,
)
from embq.worker.status import render_status
from tests.failover import embed_while_killing, expected, worries
from tests.topology import LocalSentinel

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


def test_a_sentinel_url_takes_its_database_first_and_hides_every_password() -> None:
    url = "sentinel://u:master-pw@h1:26379/2;sentinel://h2?master_name=embq&sentinel_password=sentinel-pw"
    found = sentinel.parse(url)
    assert found.sentinels == [("h1", 26379), ("h2", 26379)]
    assert (found.master, found.username, found.password, found.db) == ("embq", "u", "master-pw", 2)
    assert found.sentinel_password == "sentinel-pw"
    options = celery_config(Settings(broker_url=url))
    # Kombu reads the master's password and database from the first part; the rest are transport options.
    assert options["broker_url"] == "sentinel://u:master-pw@h1:26379/2;sentinel://h2"
    assert options["broker_transport_options"]["sentinel_kwargs"]["password"] == "sentinel-pw"
    with pytest.raises(ConfigurationError, match="only the broker") as refused:
        Settings(cache_url=url)
    for shown in (redact(url), str(refused.value)):
        assert "master-pw" not in shown and "sentinel-pw" not in shown, shown
    # A database on a later part is one Kombu would ignore: refused, not silently dropped.
    with pytest.raises(ConfigurationError, match="on the first"):
        Settings(broker_url="sentinel://h1:26379;sentinel://h2:26379/3?master_name=embq")
    assert Settings(broker_url="sentinel://h1:26379;sentinel://h2:26379/0?master_name=embq").broker
    with pytest.raises(ConfigurationError, match="TLS"):
        Settings(broker_url="sentinel://h1:26379?master_name=embq&ssl_cert_reqs=required")


@pytest.fixture(scope="module")
def locked() -> Iterator[tuple[str, str]]:
    """A master and one sentinel, each with its own password: ``(url without the sentinel's password, with it)``."""
    master = LocalRedis(password="master-pw", private=True).start()
    home = Path(tempfile.mkdtemp(prefix="embq-sentinel-auth-"))
    port = free_port()
    (home / "sentinel.conf").write_text(
        f"port {port}\nbind 127.0.0.1\ndir {home}\nrequirepass sentinel-pw\n"
        f"sentinel monitor locked 127.0.0.1 {master.port} 1\nsentinel auth-pass locked master-pw\n"
    )
    process = subprocess.Popen(
        [redis_server_binary(), str(home / "sentinel.conf"), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **child_options(True, signal.SIGKILL),
    )
    url = f"sentinel://:master-pw@127.0.0.1:{port}/0?master_name=locked"
    try:
        probe = redis.Redis(port=port, password="sentinel-pw", socket_timeout=2)
        wait_until(lambda: probe.sentinel_get_master_addr_by_name("locked"), 10, "the sentinel to see its master")
        yield url, url + "&sentinel_password=sentinel-pw"
    finally:
        stop_process(process, grace=5)
        master.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_sentinels_with_a_password_serve_celery_and_embqs_own_connections(
    locked: tuple[str, str], redis_url: str, cache: redis.Redis
) -> None:
    refused, url = locked
    with pytest.raises(redis.exceptions.ConnectionError, match=r"[Aa]uth") as no_password:
        connect_once(refused, timeout=2).ping()
    # Each sentinel is named by its address, not by its client's repr of a kilobyte.
    assert "sentinel 127.0.0.1:" in str(no_password.value) and "ConnectionPool" not in str(no_password.value)
    assert connect(url).ping() and connect_once(url).ping()

    async def aping() -> bool:
        client = aconnect(url)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(aping())
    texts = [f"locked {i}" for i in range(200)]
    urls = {"EMBQ_BROKER_URL": url, "EMBQ_CACHE_URL": redis_url}
    with (
        LocalWorker(redis_url, engine="hash", model=MODEL, env=urls),
        EmbeddingClient(settings=Settings(broker_url=url, cache_url=redis_url, model=MODEL)) as client,
    ):
        np.testing.assert_array_equal(client.embed(texts, timeout=60), expected(texts))
    assert computed(cache) == 200
