"""What the batch protocol promises beyond a single call: shared round trips, bounded windows, release on
failure, asyncio, streams. Real Redis, real worker processes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from embq.producer import (
    AsyncEmbeddingClient,
    BackendUnavailableError,
    EmbeddingClient,
    EmbqTimeoutError,
    InvalidInputError,
    ItemFailedError,
    Settings,
    keys,
)
from embq.producer.codec import CLAIM_PREFIX
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalRedis, LocalWorker, wait_until
from tests.conftest import HASH_MODEL, embed_in_background

Client = Callable[..., EmbeddingClient]
Start = Callable[..., LocalWorker]


def expected(texts: list[str]) -> np.ndarray:
    return np.stack([hash_vector(t, 384) for t in texts])


def tasks_done(r: redis.Redis, model: str) -> int:
    return int(r.hget(keys.stats_key(model), "tasks") or 0)


def claims(r: redis.Redis) -> int:
    return sum(1 for key in r.scan_iter(match=keys.VECTOR + "*") if (r.get(key) or b"").startswith(CLAIM_PREFIX))


def test_concurrent_small_calls_of_one_client_share_tasks(
    make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/coalesce"
    start_worker(model)
    client = make_client(model=model)
    client.embed(["warm up"], timeout=30)
    before = tasks_done(r, model)
    texts = [f"one of 64 callers {i}" for i in range(64)]
    barrier = threading.Barrier(len(texts))
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        barrier.wait()
        results[i] = client.embed([texts[i]], timeout=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(np.vstack([results[i] for i in range(len(texts))]), expected(texts))
    assert tasks_done(r, model) - before <= 8  # a few tasks for 64 calls, not 64


def test_a_call_larger_than_the_window_holds_only_a_window_of_claims(
    make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/window"
    texts = [f"windowed {i}" for i in range(3000)]
    client = make_client(model=model, inflight_texts=300, unknown_model_grace=0)  # its worker comes later
    join = embed_in_background(client, texts, timeout=120)
    queue = keys.queue_name(model, lane=keys.BULK)
    wait_until(lambda: r.llen(queue) > 0, 30, "the first tasks to be queued")
    assert claims(r) == 300  # the rest waits in the producer, unclaimed
    start_worker(model)
    np.testing.assert_array_equal(join(), expected(texts))
    assert claims(r) == 0


def test_a_failing_call_releases_its_claims_and_a_retry_does_not_wait() -> None:
    """A cache Redis at maxmemory (noeviction) fails the call; its claims go at once, so the retry
    after the operator freed memory does not wait for the 30 s lease, and no error carries a vector."""
    with LocalRedis() as broker, LocalRedis("--maxmemory", "3mb") as cache:
        settings = Settings(broker_url=broker.url, cache_url=cache.url, model="hash/full-cache")
        env = {"EMBQ_BROKER_URL": broker.url, "EMBQ_CACHE_URL": cache.url}
        with LocalWorker(broker.url, engine="hash", model=settings.model, env=env) as worker:
            client = EmbeddingClient(settings=settings)
            texts = [f"filling the cache {i} " + "x" * 40 for i in range(4000)]
            # The worker's failure notice needs memory too: when it cannot be written either, the producer
            # resends the texts and gives up after its attempts instead of naming Redis's refusal.
            with pytest.raises(
                (BackendUnavailableError, ItemFailedError),
                match=r"command not allowed when used memory|gave up after 3 attempts",
            ) as info:
                client.embed(texts, timeout=120)
            assert "EQ\\x01" not in str(info.value) and len(str(info.value)) < 2000
            direct = redis.Redis.from_url(cache.url)
            assert claims(direct) == 0  # released at once, not left to lapse
            direct.config_set("maxmemory", "0")
            started = time.monotonic()
            np.testing.assert_array_equal(client.embed(texts, timeout=60), expected(texts))
            assert time.monotonic() - started < 20  # no lease (30 s) waited for
            client.close()
            direct.close()
            log = worker.log_path.read_bytes()
        assert b"EQ\\x01" not in log and b"\x00\x00\x80" not in log  # reasons, never payloads


def test_the_async_client_keeps_the_contract(hash_worker: LocalWorker, redis_url: str, r: redis.Redis) -> None:
    texts = [f"async text {i}" for i in range(50)]

    async def main() -> None:
        async with AsyncEmbeddingClient(redis_url, model=HASH_MODEL) as client:
            np.testing.assert_array_equal(await client.embed(texts, timeout=30), expected(texts))
            singles = await asyncio.gather(*(client.embed([t], timeout=30) for t in texts))
            np.testing.assert_array_equal(np.vstack(singles), expected(texts))
            small = await client.embed(texts[:3], dim=16, timeout=30)
            assert small.shape == (3, 16)
            with pytest.raises(InvalidInputError, match="index 1"):
                await client.embed(["fine", None], timeout=30)
            assert (await client.embed([], dim=8)).shape == (0, 8)
        async with AsyncEmbeddingClient(redis_url, model="hash/async-nobody") as client:
            with pytest.raises(EmbqTimeoutError) as info:
                await client.embed(["no worker serves this"], timeout=0.5)
            assert info.value.missing == 1

    asyncio.run(main())


def test_a_cancelled_async_call_releases_its_claims(redis_url: str, r: redis.Redis) -> None:
    async def main() -> None:
        settings = Settings(redis_url=redis_url, model="hash/async-cancel", unknown_model_grace=0)  # claims at once
        async with AsyncEmbeddingClient(settings=settings) as client:
            call = asyncio.ensure_future(client.embed([f"given up {i}" for i in range(10)]))
            await asyncio.sleep(0.5)
            assert claims(r) == 10
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            for _ in range(100):
                if claims(r) == 0:
                    break
                await asyncio.sleep(0.05)
            assert claims(r) == 0

    asyncio.run(main())


def test_embed_iter_streams_in_order_with_failures_and_progress(make_client: Client, start_worker: Start) -> None:
    model = "hash/stream"
    start_worker(model, env={"EMBQ_MAX_TEXT_BYTES": "100"})
    texts = [f"streamed {i}" for i in range(1000)]
    texts[123] = "y" * 500  # refused by the worker alone
    client = make_client(model=model)
    progressed: list[int] = []
    stream = client.embed_iter(iter(texts), batch=64, window=3, failures="nan", on_progress=progressed.append)
    starts, blocks = zip(*stream, strict=True)
    assert list(starts) == list(range(0, 1000, 64))
    vectors = np.vstack(blocks)
    good = [i for i in range(1000) if i != 123]
    np.testing.assert_array_equal(vectors[good], expected([texts[i] for i in good]))
    assert np.isnan(vectors[123]).all() and list(stream.failures) == [123]
    assert sum(progressed) == 1000 and stream.rows == 1000 and stream.computed == 999
    with pytest.raises(ItemFailedError) as info:
        list(client.embed_iter(texts, batch=64))
    assert list(info.value.failures) == [123]
    again = client.embed_iter(texts[:100], batch=64)
    assert sum(len(block) for _, block in again) == 100 and again.cached == 100


def read_slowly(texts: list[str], every: int) -> Iterator[str]:
    """Texts as a file gives them: a pause every ``every``, so that calls reach the client one by one."""
    for i, text in enumerate(texts):
        if i % every == 0:
            time.sleep(0.05)
        yield text


def test_cached_rows_are_found_while_the_first_task_waits_for_its_worker_to_start(
    redis_url: str, start_worker: Start
) -> None:
    """``embq embed`` starts its private worker at the first task; while the model loads, the client goes on
    finding the cached rows of the texts after it (a resumed job shows them at once)."""
    model = "hash/first-task"
    texts = [f"first task {i}" for i in range(1000)]
    with EmbeddingClient(redis_url, model=model) as warm:
        worker = start_worker(model)
        warm.embed(texts[::2], timeout=60)  # every other row cached, as a killed job leaves them
        worker.stop()
    loading, loaded = threading.Event(), threading.Event()

    def load_worker() -> None:
        loading.set()
        loaded.wait(60)
        start_worker(model)

    found: dict[str, int] = {"cached": 0}
    record = lambda how, n: found.__setitem__(how, found.get(how, 0) + n)  # noqa: E731
    settings = Settings(redis_url=redis_url, model=model, l1_bytes=0)
    with EmbeddingClient(settings=settings, before_first_task=load_worker) as client:
        stream = client.embed_iter(read_slowly(texts, 100), batch=100, window=10, on_rows=record)
        result: list[np.ndarray] = []
        reader = threading.Thread(target=lambda: result.extend(block for _, block in stream), daemon=True)
        reader.start()
        assert loading.wait(30)
        wait_until(lambda: found["cached"] == 500, 10, "every cached row found while the worker loads")
        loaded.set()
        reader.join(60)
    np.testing.assert_array_equal(np.vstack(result), expected(texts))


def test_a_client_used_again_after_fork_gets_its_own_dispatcher(hash_worker: LocalWorker, make_client: Client) -> None:
    client = make_client()
    client.embed(["before the fork"], timeout=30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: threads and sockets of the parent are gone
        try:
            out = client.embed(["after the fork"], timeout=30)
            ok = np.array_equal(out, expected(["after the fork"]))
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    np.testing.assert_array_equal(client.embed(["parent again"], timeout=30), expected(["parent again"]))


def test_results_are_read_while_new_calls_keep_arriving(hash_worker: LocalWorker, redis_url: str) -> None:
    """A service whose calls never stop arriving still gets each result as its notice lands, not at
    the next lease tick (15 s here) nor when the arrivals stop."""

    async def main() -> None:
        settings = Settings(redis_url=redis_url, model=HASH_MODEL, lease_seconds=60)
        async with AsyncEmbeddingClient(settings=settings) as client:
            await client.embed(["warm up"], timeout=30)
            first = asyncio.ensure_future(client.embed(["the first of a steady stream"], timeout=30))
            others = []
            stop = time.monotonic() + 5
            while not first.done() and time.monotonic() < stop:
                others.append(asyncio.ensure_future(client.embed([f"steady {len(others)}"], timeout=30)))
                await asyncio.sleep(0)  # a new call whenever the dispatcher waits on Redis
            assert first.done(), f"no result while {len(others)} calls kept arriving"
            vectors = await asyncio.gather(first, *others)
            np.testing.assert_array_equal(vectors[0], expected(["the first of a steady stream"]))

    asyncio.run(main())


def test_a_claim_of_ours_that_no_task_carries_is_sent(
    hash_worker: LocalWorker, make_client: Client, r: redis.Redis
) -> None:
    """A call that failed while the cache was unreachable could not release its claims. The next call
    for those texts finds them ours, with no task of ours carrying them, and sends them at once rather
    than wait for the claims to lapse (an hour)."""
    client = make_client()
    client.embed(["warm up"], timeout=30)
    token = client.driver().core.token
    texts = [f"left claimed by a failed call {i}" for i in range(5)]
    for digest in keys.text_digests(HASH_MODEL, client.settings.cache_namespace, "", texts):
        r.set(keys.vector_key(digest), CLAIM_PREFIX + b"-" + token.encode(), px=3_600_000)
    np.testing.assert_array_equal(client.embed(texts, timeout=20), expected(texts))
