"""A retry computes nothing twice, and a worker stopped with a deep backlog gives it back at once.

Real processes: a Redis, hash workers slowed down per text (``EMBQ_HASH_SECONDS_PER_TEXT``), the engine's
own count of what it computed (``embq_texts_embedded`` on the worker's ``/metrics``).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embq.producer import EmbeddingClient, EmbqTimeoutError
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalWorker, free_port, wait_until
from tests.conftest import embed_in_background

Client = Callable[..., EmbeddingClient]
Start = Callable[..., LocalWorker]


def hashed(texts: list[str]) -> np.ndarray:
    return np.stack([hash_vector(t, 384) for t in texts])


def embedded(port: int) -> float:
    """What the worker's engine has computed so far."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
        if s.name == "embq_texts_embedded_total"
    )


def test_two_timeouts_then_a_retry_compute_each_text_about_once(make_client: Client, start_worker: Start) -> None:
    model = "hash/retried"
    port = free_port()
    start_worker(model, env={"EMBQ_HASH_SECONDS_PER_TEXT": "0.002", "EMBQ_METRICS_PORT": str(port)})  # 500/s
    texts = [f"retried {i}" for i in range(4000)]
    client = make_client(model=model)
    for timeout in (3, 4):
        with pytest.raises(EmbqTimeoutError):
            client.embed(texts, timeout=timeout)
    np.testing.assert_array_equal(client.embed(texts, timeout=120), hashed(texts))
    wait_until(lambda: embedded(port) >= 4000, 30, "the engine's count")
    time.sleep(2)  # a duplicate still in a pass would show now
    computed = embedded(port)
    assert computed <= 1.15 * 4000, f"the engine computed {computed:.0f} vectors for 4,000 texts"


def test_a_retry_from_another_client_computes_each_text_about_once(make_client: Client, start_worker: Start) -> None:
    model = "hash/retried-elsewhere"
    port = free_port()
    start_worker(model, env={"EMBQ_HASH_SECONDS_PER_TEXT": "0.002", "EMBQ_METRICS_PORT": str(port)})
    texts = [f"retried elsewhere {i}" for i in range(4000)]
    with pytest.raises(EmbqTimeoutError):
        make_client(model=model).embed(texts, timeout=3)
    np.testing.assert_array_equal(make_client(model=model).embed(texts, timeout=120), hashed(texts))
    time.sleep(2)
    computed = embedded(port)
    assert computed <= 1.15 * 4000, f"the engine computed {computed:.0f} vectors for 4,000 texts"


def test_a_worker_stopped_with_a_deep_backlog_gives_it_back_and_exits_soon(
    make_client: Client, start_worker: Start
) -> None:
    """A worker holding a minute of bulk work (EMBQ_BACKLOG_SECONDS=60) gets SIGTERM: it exits within 30 s,
    the tasks it had not started go back to the queue, and another worker finishes the call."""
    model = "hash/stopped-deep"
    slow = {"EMBQ_HASH_SECONDS_PER_TEXT": "0.005", "EMBQ_BACKLOG_SECONDS": "60"}  # 200 texts/s
    stopped = start_worker(model, env=slow)
    texts = [f"deep backlog {i}" for i in range(10_000)]
    join = embed_in_background(make_client(model=model, task_max_texts=250), texts, timeout=300)
    wait_until(lambda: stopped.log_path.read_text().count("received") >= 8, 60, "the worker to take many tasks")
    time.sleep(2)
    start = time.monotonic()
    code = stopped.stop(grace=60)
    assert time.monotonic() - start <= 30, "the warm shutdown waited for the whole backlog"
    assert code == 0
    assert "bulk tasks not started go back to the queue" in stopped.log_path.read_text()
    start_worker(model)
    np.testing.assert_array_equal(join(), hashed(texts))
