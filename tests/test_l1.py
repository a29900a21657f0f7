"""The in-process L1: hot texts answered with no Redis command, never stale, never over its bound."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from embq.producer import AsyncEmbeddingClient, EmbeddingClient, InvalidInputError, Settings, keys
from embq.producer.codec import pack
from embq.producer.l1 import ENTRY_OVERHEAD, FRESH_SECONDS, STALE_SECONDS, L1Cache
from embq.worker.cache_admin import clear_keys
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalGateway, LocalRedis, LocalWorker
from embq.worker.status import render_status
from tests.conftest import HASH_MODEL

Client = Callable[..., EmbeddingClient]
ROOT = Path(__file__).resolve().parent.parent
#: What an L1 hit may cost Redis: the dispatcher's look at the epoch (signature, generation) at most
#: once a second, with the hits it reports; never a vector's read.
EPOCH_COMMANDS = {"get", "hincrby", "expire"}


def expected(texts: list[str], dim: int = 384) -> np.ndarray:
    return np.stack([hash_vector(t, dim) for t in texts])


def commands(r: redis.Redis) -> dict[str, int]:
    """Calls per command since Redis started, INFO itself left out."""
    stats: dict[str, Any] = r.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: calls - before.get(name, 0) for name, calls in after.items() if calls > before.get(name, 0)}


@pytest.fixture
def quiet_cache(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A cache Redis of its own, where no worker beats and no Celery consumer polls: every command
    counted there is the client's. Vectors are put there as a hash worker would have."""
    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()


def cache_as_a_worker_would(cache: redis.Redis, texts: list[str]) -> None:
    """The hash engine's vectors and its signature, as its workers leave them in the cache."""
    signature = {"engine": "hash", "dim": 384, "checkpoint": "", "template": "{instruction}{text}"}
    cache.set(keys.signature_key(keys.DEFAULT_NAMESPACE, HASH_MODEL), json.dumps(signature), ex=3600)
    digests = keys.text_digests(HASH_MODEL, keys.DEFAULT_NAMESPACE, "", texts)
    cache.mset({keys.vector_key(d): pack(v) for d, v in zip(digests, expected(texts), strict=True)})


def cache_url(cache: redis.Redis) -> str:
    kwargs = cache.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def test_hot_texts_cost_no_redis_command(quiet_cache: redis.Redis, make_client: Client) -> None:
    """2,000 one-text calls over 1,000 hot cached texts: the L1 answers every one without Redis."""
    hot = [f"hot text {i}" for i in range(1000)]
    cache_as_a_worker_would(quiet_cache, hot)
    client = make_client(cache_url=cache_url(quiet_cache))
    np.testing.assert_array_equal(client.embed(hot, timeout=60), expected(hot))  # from Redis, into the L1
    before, started, stats = commands(quiet_cache), time.monotonic(), client.l1_stats()
    for i in range(2000):
        text = hot[(i * 7) % len(hot)]
        out = client.embed([text])
        assert out.shape == (1, 384)
    elapsed = time.monotonic() - started
    used = spent(before, commands(quiet_cache))
    assert not set(used) - EPOCH_COMMANDS, used  # no MGET, no script, no stream read: no vector from Redis
    assert used.get("get", 0) <= 2 * (elapsed / FRESH_SECONDS + 1), used  # the epoch, at most once a second
    assert client.l1_stats().hits - stats.hits == 2000
    np.testing.assert_array_equal(client.embed(hot[:5]), expected(hot[:5]))
    wrote = client.embed(hot[:5])
    wrote[:] = 0  # the caller's array is its own: the L1 keeps its vectors
    np.testing.assert_array_equal(client.embed(hot[:5]), expected(hot[:5]))


def test_l1_answers_equal_redis_answers_at_any_dim(hash_worker: LocalWorker, make_client: Client) -> None:
    texts = ["a prefix", "of each vector", "re-normalised", "a prefix"]
    through_redis = make_client(l1_bytes=0)
    held = make_client()
    held.embed(texts, timeout=60)
    for dim in (None, 384, 128, 7):
        np.testing.assert_array_equal(held.embed(texts, dim=dim), through_redis.embed(texts, dim=dim))
    assert held.l1_stats().hits >= 16 and through_redis.l1_stats().hits == 0
    with pytest.raises(InvalidInputError, match="exceeds the model's dimension 384"):
        held.embed(texts, dim=385)


def test_a_call_partly_held_reads_only_the_rest_from_redis(
    hash_worker: LocalWorker, make_client: Client, r: redis.Redis
) -> None:
    client = make_client()
    known = [f"known {i}" for i in range(50)]
    client.embed(known, timeout=60)
    stats = client.l1_stats()
    mixed = [*known, *(f"new {i}" for i in range(10))]
    np.testing.assert_array_equal(client.embed(mixed, timeout=60), expected(mixed))
    after = client.l1_stats()
    assert (after.hits - stats.hits, after.misses - stats.misses) == (50, 10)
    assert int(r.hget(keys.stats_key(HASH_MODEL), "l1_hits") or 0) >= 50  # reported for `embq status`
    shown = render_status(client.settings)
    assert re.search(r"hash/test: [\d,]+ of [\d,]+ hits answered from producers' own memory \(L1\)", shown), shown


def test_the_bound_holds_with_ten_times_its_size(hash_worker: LocalWorker, make_client: Client) -> None:
    per_vector = 384 * 4 + ENTRY_OVERHEAD
    client = make_client(l1_bytes=100 * per_vector)
    texts = [f"filling {i}" for i in range(1000)]
    for start in range(0, len(texts), 100):
        client.embed(texts[start : start + 100], timeout=60)
        assert client.l1_stats().bytes <= client.l1_stats().max_bytes
    stats = client.l1_stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (100, 100 * per_vector, 900)
    client.embed(texts[-100:])  # the most recent stay ...
    assert client.l1_stats().hits - stats.hits == 100
    client.embed(texts[:100], timeout=60)  # ... the least recently used went first
    assert client.l1_stats().misses - stats.misses == 100
    assert client.l1_stats().bytes <= client.l1_stats().max_bytes


def test_zero_bytes_turns_it_off(hash_worker: LocalWorker, make_client: Client, r: redis.Redis) -> None:
    assert Settings.from_env({"EMBQ_L1_BYTES": "0"}).l1_bytes == 0
    assert Settings.from_env({}).l1_bytes == 64 << 20
    client = make_client(l1_bytes=0)
    client.embed(["not held"], timeout=60)
    before = commands(r)
    client.embed(["not held"])
    assert spent(before, commands(r)).get("mget", 0) == 1
    assert client.l1_stats().entries == 0 and client.l1_stats().max_bytes == 0


def test_a_new_signature_under_the_same_model_replaces_the_vectors_at_once(
    make_client: Client, start_worker: Callable[..., LocalWorker], r: redis.Redis
) -> None:
    """The cache emptied (without ``embq cache clear``: no new generation) and a 256-dim worker started under
    the model id of a 384-dim one: the same client serves 256 dims, and never 384 after the first 256."""
    model = "hash/l1-swap"
    old = start_worker(model, env={"EMBQ_HASH_DIM": "384"})
    client = make_client(model=model)
    hot = [f"swapped {i}" for i in range(20)]
    client.embed(hot, timeout=60)
    np.testing.assert_array_equal(client.embed(hot), expected(hot))
    assert client.l1_stats().hits >= 20
    old.stop()
    for pattern in keys.CACHE_PATTERNS:
        for key in r.scan_iter(match=pattern):
            r.delete(key)
    swapped = time.monotonic()
    start_worker(model, env={"EMBQ_HASH_DIM": "256"}, wait=False)
    widths: list[int] = []
    first_new: float | None = None
    while len(widths) < 400 and time.monotonic() - swapped < 90:
        out = client.embed(hot, timeout=60)
        widths.append(out.shape[1])
        if out.shape[1] == 256:
            first_new = first_new or time.monotonic()
            np.testing.assert_array_equal(out, expected(hot, 256))
        else:
            np.testing.assert_array_equal(out, expected(hot))
    assert first_new is not None, "no 256-dim vector came"
    assert 384 not in widths[widths.index(256) :], widths
    assert widths[-1] == 256 and len(widths) == 400
    assert client.l1_stats().invalidations >= 1
    assert first_new - swapped < 60  # the worker's start, mostly


def test_cache_clear_is_honoured_by_a_running_client(
    hash_worker: LocalWorker, make_client: Client, r: redis.Redis, redis_url: str
) -> None:
    """Same model, same worker, same signature: only ``embq cache clear``'s new generation tells."""
    client = make_client()
    texts = ["cleared while held", "cleared too"]
    client.embed(texts, timeout=60)
    client.embed(texts)
    assert client.l1_stats().hits == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBQ_")} | {"EMBQ_REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "embq", "cache", "clear"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    cleared = time.monotonic()
    digest = keys.vector_key(keys.text_digest(HASH_MODEL, "v1", "", texts[0]))
    assert not r.exists(digest)
    while not r.exists(digest):  # held until the client sees the new generation, then computed again
        np.testing.assert_array_equal(client.embed(texts, timeout=60), expected(texts))
        assert time.monotonic() - cleared < STALE_SECONDS + 3
    assert client.l1_stats().invalidations == 1


def test_the_asyncio_client_answers_hot_texts_from_its_l1(quiet_cache: redis.Redis, redis_url: str) -> None:
    hot = [f"async hot {i}" for i in range(100)]
    cache_as_a_worker_would(quiet_cache, hot)
    head = expected(hot)[:, :64]
    head /= np.linalg.norm(head, axis=1, keepdims=True)
    settings = Settings(redis_url=redis_url, cache_url=cache_url(quiet_cache), model=HASH_MODEL)

    async def run() -> None:
        async with AsyncEmbeddingClient(settings=settings) as client:
            np.testing.assert_array_equal(await client.embed(hot, timeout=60), expected(hot))
            before = commands(quiet_cache)
            for i in range(500):
                out = await client.embed([hot[i % 100]], dim=64)
                np.testing.assert_allclose(out, head[i % 100 : i % 100 + 1], rtol=1e-6)
            assert not set(spent(before, commands(quiet_cache))) - EPOCH_COMMANDS
            assert client.l1_stats().hits == 500
            clear_keys(quiet_cache)  # a new generation ...
            cache_as_a_worker_would(quiet_cache, hot)  # ... and the same vectors and signature as before
            cleared = time.monotonic()
            before = commands(quiet_cache)
            while not spent(before, commands(quiet_cache)).get("mget"):  # read from Redis again
                np.testing.assert_array_equal(await client.embed(hot[:1], timeout=60), expected(hot[:1]))
                assert time.monotonic() - cleared < STALE_SECONDS + 3
                await asyncio.sleep(0.01)
            assert client.l1_stats().invalidations == 1

    asyncio.run(run())


def test_the_gateway_answers_hot_texts_from_its_l1(quiet_cache: redis.Redis, redis_url: str) -> None:
    texts = ["gateway hot", "gateway hotter"]
    cache_as_a_worker_would(quiet_cache, texts)
    env = {"EMBQ_CACHE_URL": cache_url(quiet_cache)}
    with LocalGateway(redis_url, models=(HASH_MODEL,), env=env) as gateway:
        body = {"model": HASH_MODEL, "input": texts}
        first = httpx.post(gateway.url + "/v1/embeddings", json=body, timeout=60).json()  # from Redis
        before = commands(quiet_cache)
        for _ in range(20):
            again = httpx.post(gateway.url + "/v1/embeddings", json=body, timeout=60).json()
            assert again["data"] == first["data"]
        used = spent(before, commands(quiet_cache))
        assert not {"mget", "evalsha", "xread", "xadd"} & set(used), used
        metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    label = (("model", HASH_MODEL),)
    assert samples[("embq_client_l1_hits_total", label)] == 40
    assert samples[("embq_client_cache_hits_total", label)] == 42  # L1 hits are cache hits
    assert samples[("embq_client_l1_entries", label)] == 2
    assert 0 < samples[("embq_client_l1_bytes", label)] <= 64 << 20
    assert ("embq_client_l1_evictions_total", label) in samples and ("embq_client_l1_misses_total", label) in samples
    np.testing.assert_allclose(np.array([d["embedding"] for d in first["data"]]), expected(texts), rtol=1e-6)


def test_entries_expire_and_a_stale_epoch_serves_nothing() -> None:
    """The L1 alone, on a clock of its own: the TTL a vector came with, and the staleness bound."""
    now = [100.0]
    l1 = L1Cache("hash/clock", 1 << 20, ttl=60, clock=lambda: now[0])
    vectors = expected(["one", "two"])
    l1.confirm(("signature", "generation"), now[0])
    l1.put(["d1", "d2"], vectors)
    np.testing.assert_array_equal(l1.answer(["d1", "d2"], None), vectors)  # type: ignore[arg-type]
    now[0] += FRESH_SECONDS  # still served, but the dispatcher is asked to look again
    asked: list[bool] = []
    l1.on_check = lambda: asked.append(True)
    assert l1.answer(["d1"], None) is not None and asked == [True] and l1.check_due(busy=False)
    now[0] += STALE_SECONDS  # nobody looked: nothing is served
    assert l1.answer(["d1"], None) is None and l1.take(["d1"], 384) == [None]
    l1.confirm(("signature", "generation"), now[0])  # the same epoch: kept
    assert l1.answer(["d1"], None) is not None
    now[0] += 61  # past its TTL
    l1.confirm(("signature", "generation"), now[0])
    assert l1.answer(["d1"], None) is None and l1.take(["d1", "d2"], 384) == [None, None]
    assert l1.stats().expired == 2 and l1.stats().entries == 0 and l1.stats().bytes == 0
    l1.put(["d3"], vectors[:1])
    assert not l1.confirm(("signature", "generation"), now[0]) and l1.stats().entries == 1
    assert l1.confirm(("another signature", "generation"), now[0])  # a new epoch empties it
    assert l1.stats().entries == 0 and l1.stats().invalidations == 1
