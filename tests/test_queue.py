"""The whole flow through a real Redis and real hash-engine worker processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from embq.producer import EmbeddingClient, EmbqTimeoutError, InvalidInputError, ItemFailedError, keys, protocol
from embq.producer.codec import CLAIM_PREFIX, pack
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalWorker
from tests.conftest import HASH_MODEL

pytestmark = pytest.mark.usefixtures("hash_worker")

Client = Callable[..., EmbeddingClient]


def expected(texts: list[str], instruction: str = "") -> np.ndarray:
    return np.stack([hash_vector(instruction + t, 384) for t in texts])


def stats(r: redis.Redis, model: str = HASH_MODEL) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.stats_key(model)).items()}


def test_vectors_come_back_in_input_order(make_client: Client) -> None:
    texts = [f"text number {i}" for i in range(300)]
    out = make_client().embed(texts, timeout=60)
    assert out.dtype == np.float32 and out.shape == (300, 384)
    np.testing.assert_array_equal(out, expected(texts))


def test_duplicates_inside_a_call_are_computed_once(make_client: Client, r: redis.Redis) -> None:
    texts = ["same", "other", "same", "same", "other"]
    out = make_client().embed(texts, timeout=60)
    np.testing.assert_array_equal(out, expected(texts))
    assert stats(r)["texts"] == 2
    # Rows arrive as 0, 1, 3, 2, 4 (a repeat's row follows its first): a run in appearance only.
    texts = ["p", "q", "r", "q", "s"]
    np.testing.assert_array_equal(make_client().embed(texts, timeout=60), expected(texts))


def test_texts_differing_in_spaces_or_case_get_distinct_vectors(make_client: Client) -> None:
    texts = ["a b", "a  b", "A b", " a b", "a b ", "a\tb"]
    out = make_client().embed(texts, timeout=60)
    np.testing.assert_array_equal(out, expected(texts))
    assert len({row.tobytes() for row in out}) == len(texts)


def test_instruction_is_applied_and_keyed(make_client: Client) -> None:
    client = make_client()
    plain = client.embed(["x"], timeout=60)
    query = client.embed(["x"], instruction="query: ", timeout=60)
    np.testing.assert_array_equal(query, expected(["x"], "query: "))
    assert not np.array_equal(plain, query)


def test_dim_truncates_and_renormalises_the_full_vector(make_client: Client, r: redis.Redis) -> None:
    client = make_client()
    texts = [f"matryoshka {i}" for i in range(20)]
    full = client.embed(texts, timeout=60)
    computed = stats(r)["texts"]
    small = client.embed(texts, dim=32, timeout=60)
    head = full[:, :32]
    np.testing.assert_allclose(small, head / np.linalg.norm(head, axis=1, keepdims=True), rtol=1e-6)
    assert small.shape == (20, 32)
    assert stats(r)["texts"] == computed  # one computation serves every dimension
    with pytest.raises(InvalidInputError, match="exceeds"):
        client.embed(texts, dim=385, timeout=60)


def test_empty_input(make_client: Client) -> None:
    assert make_client(model="hash/never-served").embed([], timeout=5).shape == (0, 0)  # no worker told its size
    assert make_client(model="hash/never-served").embed([], dim=8).shape == (0, 8)


def test_the_models_dimension_settles_empty_inputs_and_dims_before_sending(
    make_client: Client, start_worker: Callable[..., LocalWorker], r: redis.Redis
) -> None:
    model = "hash/known-dimension"
    start_worker(model, env={"EMBQ_HASH_DIM": "48"}).stop()  # its signature outlives it
    client = make_client(model=model)
    assert client.embed([]).shape == (0, 48)
    with pytest.raises(InvalidInputError, match="dim=64 exceeds the model's dimension 48"):
        client.embed(["never sent"], dim=64)
    assert r.llen(keys.queue_name(model)) == 0 and stats(r, model).get("misses", 0) == 0


@pytest.mark.parametrize("bad", [None, 5, b"bytes", "\ud800", "x" * (64 << 20)])
def test_bad_input_is_refused_at_once_and_nothing_is_enqueued(make_client: Client, r: redis.Redis, bad: object) -> None:
    client = make_client()
    before = r.dbsize()
    start = time.monotonic()
    with pytest.raises(InvalidInputError) as info:
        client.embed(["good", bad, "also good"], timeout=60)
    assert time.monotonic() - start < 1.0
    assert info.value.index == 1 and "index 1" in str(info.value)
    assert r.dbsize() == before
    np.testing.assert_array_equal(client.embed(["good", "also good"], timeout=60), expected(["good", "also good"]))


def test_a_bare_string_is_never_iterated_as_characters(make_client: Client, r: redis.Redis) -> None:
    with pytest.raises(InvalidInputError, match="wrap it in a list"):
        make_client().embed("hello", timeout=5)
    heartbeats = (keys.WORKER.encode(), keys.WORKERS.encode())
    assert not [key for key in r.scan_iter(match="embq*") if not key.startswith(heartbeats)]


def test_ttl_on_every_cache_key_and_on_no_broker_key(make_client: Client, r: redis.Redis) -> None:
    make_client().embed([f"ttl {i}" for i in range(50)], timeout=60)
    with pytest.raises(EmbqTimeoutError):  # leaves a queued task for a model nobody serves (not checked: grace 0)
        make_client(model="hash/nobody", unknown_model_grace=0).embed(["queued"], timeout=0.5)
    # The timed-out call's claim is released by its client's dispatcher just after the call raises: a key
    # found by SCAN may be gone by its GET.
    values = [v for v in (r.get(k) for k in r.scan_iter(match=keys.VECTOR + "*")) if v is not None]
    assert sum(1 for v in values if not v.startswith(CLAIM_PREFIX)) == 50
    assert sum(1 for v in values if v.startswith(CLAIM_PREFIX)) == 0  # released at the timeout: nobody waits
    cache_ttl = 30 * 24 * 3600
    for key in r.scan_iter():
        name = key.decode()
        ttl = r.ttl(key)
        if ttl == -2:  # gone since the SCAN (a released claim, an expired liveness key)
            continue
        broker = ("_kombu", "unacked", keys.QUEUE_PREFIX, keys.HOLDING, keys.HOLDERS, keys.DEAD_WORKERS, keys.RECLAIMED)
        if name.startswith(broker) and name != "unacked_mutex":
            assert ttl == -1, f"broker key {name} must not expire (ttl {ttl})"
        else:
            assert ttl > 0, f"cache key {name} has no TTL"
        if name.startswith(keys.VECTOR) and not r.get(key).startswith(CLAIM_PREFIX):
            assert cache_ttl - 60 < ttl <= cache_ttl
    assert r.llen(keys.queue_name("hash/nobody")) == 1


def test_timeout_says_how_many_items_are_missing(make_client: Client) -> None:
    with pytest.raises(EmbqTimeoutError) as info:
        make_client(model="hash/nobody").embed(["a", "b", "a"], timeout=0.5)
    assert info.value.missing == 3 and info.value.total == 3
    assert "3 of 3" in str(info.value) and "embq.hash/nobody" in str(info.value)


def test_a_repeat_call_never_reaches_a_worker(
    make_client: Client, start_worker: Callable[..., LocalWorker], r: redis.Redis
) -> None:
    model = "hash/stopped"
    worker = start_worker(model)
    client = make_client(model=model)
    texts = [f"repeat {i}" for i in range(200)]
    first = client.embed(texts, timeout=60)
    assert worker.stop() == 0
    start = time.monotonic()
    again = client.embed(texts, timeout=5)
    assert time.monotonic() - start < 5
    np.testing.assert_array_equal(first, again)
    assert r.llen(keys.queue_name(model)) == 0
    assert stats(r, model)["texts"] == 200


def test_concurrent_producers_compute_each_text_exactly_once(make_client: Client, r: redis.Redis) -> None:
    texts = [f"shared text {i}" for i in range(500)]
    clients = [make_client() for _ in range(8)]
    barrier = threading.Barrier(len(clients))
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def produce(n: int) -> None:
        order = texts[n * 37 :] + texts[: n * 37]  # each producer starts somewhere else
        barrier.wait()
        try:
            out = clients[n].embed(order, timeout=120)
            results[n] = out[np.argsort([texts.index(t) for t in order])]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    want = expected(texts)
    for out in results.values():
        np.testing.assert_array_equal(out, want)
    assert stats(r)["texts"] == 500
    assert not [k for k in r.scan_iter(match=keys.VECTOR + "*") if r.get(k).startswith(CLAIM_PREFIX)]
    assert not list(r.scan_iter(match=keys.WATCH + "*"))
    for client in clients:  # a client's reply stream and liveness live as long as the client
        client.close()
    assert not list(r.scan_iter(match=keys.REPLY + "*"))
    assert not list(r.scan_iter(match=keys.ALIVE + "*"))


def test_a_dead_producers_claim_is_taken_over_when_its_liveness_lapses(make_client: Client, r: redis.Redis) -> None:
    client = make_client(lease_seconds=1.0)
    texts = ["orphan 1", "orphan 2"]
    r.set(keys.alive_key("a-producer-that-just-died"), b"1", px=1000)
    for text in texts:
        digest = keys.text_digest(HASH_MODEL, "v1", "", text)
        r.set(keys.vector_key(digest), protocol.claim_value("a-producer-that-just-died"), px=3_600_000)
    start = time.monotonic()
    out = client.embed(texts, timeout=30)
    assert 0.9 < time.monotonic() - start < 10  # watched until its liveness lapsed, then taken over
    np.testing.assert_array_equal(out, expected(texts))


def test_a_claim_whose_owner_is_gone_is_taken_at_once(make_client: Client, r: redis.Redis) -> None:
    texts = ["left behind 1", "left behind 2"]
    for text in texts:
        digest = keys.text_digest(HASH_MODEL, "v1", "", text)
        r.set(keys.vector_key(digest), protocol.claim_value("a-producer-long-gone"), px=3_600_000)
    start = time.monotonic()
    np.testing.assert_array_equal(make_client().embed(texts, timeout=30), expected(texts))
    assert time.monotonic() - start < 5  # no lease to wait for


def test_a_corrupted_cache_value_is_recomputed(make_client: Client, r: redis.Redis) -> None:
    client = make_client()
    digest = keys.text_digest(HASH_MODEL, "v1", "", "fragile")
    r.set(keys.vector_key(digest), b"not a vector", ex=100)
    np.testing.assert_array_equal(client.embed(["fragile"], timeout=60), expected(["fragile"]))
    assert r.get(keys.vector_key(digest)) == pack(expected(["fragile"])[0])


def test_a_text_the_worker_refuses_fails_alone(make_client: Client, start_worker: Callable[..., LocalWorker]) -> None:
    model = "hash/strict"
    start_worker(model, env={"EMBQ_MAX_TEXT_BYTES": "100"})
    texts = ["short", "x" * 500, "also short"]
    with pytest.raises(ItemFailedError) as info:
        make_client(model=model).embed(texts, timeout=60)
    assert list(info.value.failures) == [1]
    assert "over the limit" in info.value.failures[1] and "index 1" in str(info.value)
    good = info.value.vectors
    np.testing.assert_array_equal(good[[0, 2]], expected(["short", "also short"]))
    assert np.isnan(good[1]).all()
