"""A cache must never serve a vector its model did not make: not another namespace's, not a poisoned value."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from embq.producer import EmbeddingClient, Settings, keys
from embq.producer.codec import pack
from embq.producer.contract import TASK_EMBED, make_celery, make_payload
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalWorker, wait_until
from tests.conftest import HASH_MODEL

Start = Callable[..., LocalWorker]
Client = Callable[..., EmbeddingClient]


def hashes(texts: list[str], dim: int = 384) -> np.ndarray:
    return np.stack([hash_vector(t, dim) for t in texts])


def test_workers_of_one_model_in_two_namespaces_answer_only_their_own(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    """Each namespace has its own queue: 100 calls in each, at once, all get their own worker's vectors."""
    model = "hash/namespaces"
    start_worker(model, env={"EMBQ_HASH_DIM": "384"})
    start_worker(model, env={"EMBQ_HASH_DIM": "256", "EMBQ_CACHE_NAMESPACE": "narrow"})
    assert keys.queue_name(model) != keys.queue_name(model, "narrow") == f"embq.{model}@narrow"
    wide, narrow = make_client(model=model), make_client(model=model, cache_namespace="narrow")

    def call(i: int) -> None:
        texts = [f"namespaced {i} {j}" for j in range(30)]
        np.testing.assert_array_equal(wide.embed(texts, timeout=60), hashes(texts, 384))
        np.testing.assert_array_equal(narrow.embed(texts, timeout=60), hashes(texts, 256))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(100)))
    texts = [f"one large call {i}" for i in range(3000)]
    np.testing.assert_array_equal(narrow.embed(texts, timeout=120), hashes(texts, 256))


def test_a_worker_refuses_a_task_of_another_namespace(hash_worker: LocalWorker, redis_url: str, r: redis.Redis) -> None:
    """A task that reaches a worker of another namespace (an older producer) fails by name, caching nothing."""
    other = Settings(redis_url=redis_url, model=HASH_MODEL, cache_namespace="elsewhere")
    payload = make_payload(other, "", ["not mine to answer"], keys.reply_key("nobody"))
    app = make_celery(Settings(redis_url=redis_url, model=HASH_MODEL))
    queue = keys.queue_name(HASH_MODEL)
    app.send_task(TASK_EMBED, args=[payload], queue=queue, exchange="", routing_key=queue)
    wait_until(lambda: "cache namespace 'elsewhere'" in hash_worker.log_path.read_text(), 30, "the refusal")
    digest = keys.text_digest(HASH_MODEL, "elsewhere", "", "not mine to answer")
    assert not r.exists(keys.vector_key(digest))


@pytest.fixture
def signed(hash_worker: LocalWorker, r: redis.Redis) -> None:
    """The hash worker's signature, which each test's cleanup removes, back in the cache (its heartbeat)."""
    key = keys.signature_key(Settings().cache_namespace, HASH_MODEL)
    wait_until(lambda: r.exists(key), 30, "the worker's heartbeat to store its signature")


POISONS = {
    "another dimension": pack(hash_vector("x", 10)),
    "a zero vector": pack(np.zeros(384)),
    "huge floats": pack(np.full(384, 3e38, dtype=np.float32)),
    "not unit length": pack(2 * hash_vector("y", 384)),
    "not finite": pack(np.full(384, np.nan), "float16"),
}


@pytest.mark.parametrize("dim", [None, 128])
def test_poisoned_cache_values_are_recomputed_and_replaced(
    signed: None, make_client: Client, r: redis.Redis, dim: int | None
) -> None:
    texts = [f"poisoned with {kind}" for kind in POISONS]
    for text, value in zip(texts, POISONS.values(), strict=True):
        r.set(keys.vector_key(keys.text_digest(HASH_MODEL, "v1", "", text)), value)
    everything = [*texts, "a fresh text beside them"]
    expected = hashes(everything)
    if dim is not None:
        expected = expected[:, :dim] / np.linalg.norm(expected[:, :dim], axis=1, keepdims=True)
    np.testing.assert_allclose(make_client().embed(everything, dim=dim, timeout=60), expected, rtol=1e-6, atol=1e-6)
    for text in texts:  # replaced by the model's own vector
        stored = r.get(keys.vector_key(keys.text_digest(HASH_MODEL, "v1", "", text)))
        assert stored == pack(hash_vector(text, 384))


def test_a_call_whose_cached_values_all_have_another_dimension_recomputes_them(
    signed: None, make_client: Client, r: redis.Redis
) -> None:
    """Values of one layout are decoded at once: they too must have the model's dimension."""
    texts = [f"all ten floats {i}" for i in range(50)]
    for text in texts:
        r.set(keys.vector_key(keys.text_digest(HASH_MODEL, "v1", "", text)), pack(hash_vector(text, 10)))
    client = make_client()
    np.testing.assert_array_equal(client.embed(texts, timeout=60), hashes(texts))
    np.testing.assert_array_equal(client.embed(texts, timeout=60), hashes(texts))  # now cached right
