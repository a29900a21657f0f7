"""The vector cache on a real Redis Cluster (3 masters, 3 replicas), the broker on the session's Redis."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from redis.cluster import RedisCluster

from embq.producer import AsyncEmbeddingClient, EmbeddingClient, Settings, keys, protocol
from embq.producer.cluster import claim, connect_cache, look, release
from embq.worker.cache_admin import clear_keys
from embq.worker.local import LocalGateway, LocalRedis, LocalWorker
from embq.worker.status import render_status
from tests.failover import embed_concurrently, embed_while_killing, expected, worries
from tests.topology import LocalCluster

MODEL = "hash/cluster"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as started:
        yield started


@pytest.fixture
def cache(cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url)
    client.flushall()
    yield client
    client.close()


def settings(broker: str, cache_url: str, model: str = MODEL) -> Settings:
    return Settings(broker_url=broker, cache_url=cache_url, model=model)


def worker(broker: LocalRedis, cache_url: str, model: str = MODEL, **env: str) -> LocalWorker:
    return LocalWorker(
        broker.url, engine="hash", model=model, env={"EMBQ_BROKER_URL": broker.url, "EMBQ_CACHE_URL": cache_url, **env}
    )


def computed(cache: RedisCluster, model: str = MODEL) -> int:
    return int(cache.hget(keys.stats_key(model), "texts") or 0)


def test_the_cache_is_found_to_be_a_cluster_and_spreads_over_every_master(
    cluster: LocalCluster, cache: RedisCluster, redis_server: LocalRedis
) -> None:
    assert isinstance(connect_cache(cluster.url), RedisCluster)
    assert not isinstance(connect_cache(redis_server.url), RedisCluster)
    texts = [f"spread {i}" for i in range(3000)]
    with (
        worker(redis_server, cluster.url),
        EmbeddingClient(settings=settings(redis_server.url, cluster.url)) as client,
    ):
        np.testing.assert_array_equal(client.embed(texts, timeout=60), expected(texts))
        again = client.embed([*texts[:100], "one new"], timeout=60)
    np.testing.assert_array_equal(again, expected([*texts[:100], "one new"]))
    assert computed(cache) == 3001
    spread = cluster.keys_per_master()
    assert len(spread) == 3 and all(count > 500 for count in spread.values()), spread


def test_concurrent_producers_compute_each_text_once_across_nodes(
    cluster: LocalCluster, cache: RedisCluster, redis_server: LocalRedis
) -> None:
    """Four producers want overlapping texts at once: most texts are claimed by one and watched by
    others, whose liveness keys live on other nodes than the claims."""
    shared = [f"shared {i}" for i in range(4000)]
    calls = [shared[i * 500 :] + shared[: i * 500] + [f"own {i} {j}" for j in range(500)] for i in range(4)]
    with worker(redis_server, cluster.url, EMBQ_HASH_SECONDS_PER_TEXT="0.0002"):
        clients = [EmbeddingClient(settings=settings(redis_server.url, cluster.url)) for _ in calls]
        try:
            results = embed_concurrently(clients, calls, timeout=120)
        finally:
            for client in clients:
                client.close()
    for texts, result in zip(calls, results, strict=True):
        assert isinstance(result, np.ndarray), result
        np.testing.assert_array_equal(result, expected(texts))
    assert computed(cache) == 4000 + 4 * 500


def test_claims_on_a_cluster_watch_live_owners_and_take_over_dead_ones(cache: RedisCluster) -> None:
    digests = keys.text_digests(MODEL, keys.DEFAULT_NAMESPACE, "", [f"owned {i}" for i in range(60)])
    live, dead = digests[:30], digests[30:]
    cache.set(keys.alive_key("alive-owner"), 1, px=60_000)
    for digest in live:
        cache.set(keys.vector_key(digest), protocol.claim_value("alive-owner"), px=60_000)
    for digest in dead:
        cache.set(keys.vector_key(digest), protocol.claim_value("gone-owner"), px=60_000)
    reply = keys.reply_key("me")
    out = claim(cache, ["me", 60_000, reply, 60_000, keys.stats_key(MODEL)], digests)
    assert out == [protocol.WATCHING] * 30 + [protocol.CLAIMED] * 30
    values = look(cache, digests)
    assert all(v == protocol.claim_value("alive-owner", watched=True) for v in values[:30])
    assert all(v == protocol.claim_value("me") for v in values[30:])
    assert all(cache.smembers(keys.watch_key(d)) == {reply.encode()} for d in live)
    # The live owner gives up: its watchers are named, per text, whichever node holds it.
    released = release(cache, "alive-owner", digests)
    assert protocol.watchers_of(released, digests) == {reply.encode(): live}
    assert look(cache, live) == [None] * 30
    assert cache.hgetall(keys.stats_key(MODEL)) == {b"hits": b"0", b"misses": b"60"}


def test_a_master_killed_mid_run_costs_neither_vectors_nor_calls(
    cluster: LocalCluster, cache: RedisCluster, redis_server: LocalRedis
) -> None:
    """Four producers, 100,000 texts with 30% repeats; a master dies while they run and its replica
    takes over: every call returns, every vector is right, each text is computed once (give or take
    what the dead master had not yet passed to its replica)."""
    rng = np.random.default_rng(7)
    calls = [[f"doc {i}" for i in rng.integers(0, 70_000, 25_000)] for _ in range(4)]
    wanted = len(set().union(*calls))
    with worker(redis_server, cluster.url, EMBQ_HASH_SECONDS_PER_TEXT="0.0001") as running:
        clients = [EmbeddingClient(settings=settings(redis_server.url, cluster.url)) for _ in calls]
        results, took, failover = embed_while_killing(
            clients, calls, lambda: cluster.kill_master(cluster.masters()[1][0])
        )
        assert running.process is not None and running.process.poll() is None, worries(running)
    for texts, result in zip(calls, results, strict=True):
        assert isinstance(result, np.ndarray), result
        np.testing.assert_array_equal(result, expected(texts))
    assert len(cluster.masters()) == 3
    done = computed(cache)
    print(f"failover {failover:.1f}s, calls {took:.1f}s, computed {done} of {wanted} distinct")
    assert wanted <= done <= wanted * 1.05


def test_status_and_cache_clear_see_the_whole_cluster(
    cluster: LocalCluster, cache: RedisCluster, redis_server: LocalRedis
) -> None:
    texts = [f"cleared {i}" for i in range(600)]
    with (
        worker(redis_server, cluster.url),
        EmbeddingClient(settings=settings(redis_server.url, cluster.url)) as client,
    ):
        client.embed(texts, timeout=60)
        screen = render_status(settings(redis_server.url, cluster.url))
    assert MODEL in screen and f"over {len(cluster.masters())} masters" in screen
    assert re.search(r" 600 texts  up", screen), "the worker's count moves with the model's, on a cluster too"
    assert clear_keys(connect_cache(cluster.url)) >= 600
    assert look(cache, keys.text_digests(MODEL, keys.DEFAULT_NAMESPACE, "", texts)) == [None] * 600


async def test_the_asyncio_client_and_the_gateway_use_the_whole_cluster(
    cluster: LocalCluster, cache: RedisCluster, redis_server: LocalRedis
) -> None:
    texts = [f"async {i}" for i in range(1500)]
    urls = {"EMBQ_BROKER_URL": redis_server.url, "EMBQ_CACHE_URL": cluster.url}
    with worker(redis_server, cluster.url), LocalGateway(redis_server.url, env=urls) as gateway:
        async with AsyncEmbeddingClient(settings=settings(redis_server.url, cluster.url)) as client:
            np.testing.assert_array_equal(await client.embed(texts, timeout=60), expected(texts))
        body = {"model": MODEL, "input": [*texts[:3], "through the gateway"]}
        async with httpx.AsyncClient(timeout=60) as http:
            listed = await http.get(gateway.url + "/v1/models")
            answer = await http.post(gateway.url + "/v1/embeddings", json=body)
    assert MODEL in [m["id"] for m in listed.json()["data"]], listed.text
    assert answer.status_code == 200, answer.text
    got = np.array([d["embedding"] for d in answer.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected(list(body["input"])))
    assert computed(cache) == 1501
