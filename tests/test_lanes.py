"""Queries ahead of backfills: two lanes, abandoned work dropped, tasks sized to the engine, unknown models.

Real processes throughout: a Redis, hash workers slowed down per text (``EMBQ_HASH_SECONDS_PER_TEXT``) so
that a backlog lasts long enough to be overtaken, producers in this process or in a child.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import redis

from embq.producer import EmbeddingClient, EmbqTimeoutError, ModelNotServedError, keys
from embq.producer.broker import UNACKED_KEY
from embq.producer.fleet import START_TASK_TEXTS
from embq.producer.langchain import EmbqEmbeddings
from embq.worker.batcher import Batcher
from embq.worker.engines.hash import HashEngine, hash_vector
from embq.worker.local import LocalGateway, LocalWorker, wait_until
from tests.conftest import HASH_MODEL

ROOT = Path(__file__).resolve().parent.parent
Client = Callable[..., EmbeddingClient]
Start = Callable[..., LocalWorker]


def hashed(texts: list[str]) -> np.ndarray:
    return np.stack([hash_vector(t, 384) for t in texts])


def stat(r: redis.Redis, model: str, field: str) -> int:
    return int(r.hget(keys.stats_key(model), field) or 0)


def slow(seconds_per_text: float, **extra: str) -> dict[str, str]:
    """A hash worker that takes ``seconds_per_text`` per text, in passes of 64 texts."""
    return {"EMBQ_HASH_SECONDS_PER_TEXT": str(seconds_per_text), "EMBQ_BATCH_MAX_TEXTS": "64", **extra}


# -- the batcher ---------------------------------------------------------------------------------


class GatedEngine(HashEngine):
    """The hash engine; its first call waits for ``gate``, and every call is recorded."""

    def __init__(self) -> None:
        super().__init__("hash/test", dim=16)
        self.gate = threading.Event()
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.gate.wait(30)
        return super().encode(texts)


@pytest.fixture
def gated() -> Iterator[tuple[Batcher, GatedEngine]]:
    engine = GatedEngine()
    batcher = Batcher(engine, max_tokens=1_000_000, max_texts=100, max_wait=0.0)
    batcher.start()
    yield batcher, engine
    engine.gate.set()
    batcher.stop(timeout=10)


def test_queries_join_the_next_pass_and_take_at_most_half_of_it(gated: tuple[Batcher, GatedEngine]) -> None:
    batcher, engine = gated
    bulk = [f"bulk {i}" for i in range(1000)]
    queries = [f"query {i}" for i in range(120)]
    jobs: dict[str, object] = {}
    threads = [
        threading.Thread(target=lambda: jobs.setdefault("bulk", batcher.embed(bulk, lane=keys.BULK))),
    ]
    threads[0].start()
    wait_until(lambda: len(engine.calls) == 1, 10, "the first bulk pass")
    threads.append(threading.Thread(target=lambda: jobs.setdefault("q", batcher.embed(queries))))
    threads[1].start()
    wait_until(lambda: batcher._queued_texts >= 900 + 120, 10, "the queries to wait")
    engine.gate.set()
    for thread in threads:
        thread.join(30)
    second, third = engine.calls[1], engine.calls[2]
    assert sum(t.startswith("query") for t in second) == 50 == sum(t.startswith("bulk") for t in second)
    assert sum(t.startswith("query") for t in third) == 50, "queries keep half of each pass while bulk waits"
    last_query = max(i for i, call in enumerate(engine.calls) if any(t.startswith("query") for t in call))
    assert last_query == 3 < len(engine.calls) - 1, "the queries were done long before the backfill"
    assert sum(len(call) for call in engine.calls) == 1120


# -- the queue -----------------------------------------------------------------------------------


def test_a_query_goes_ahead_of_a_backfill_that_still_completes(
    make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/lanes"
    # ~500 texts/s: the backfill lasts ~20 s; of 8 task slots, bulk tasks may hold 2.
    start_worker(model, env=slow(0.002, EMBQ_CONCURRENCY="8", EMBQ_BULK_TASKS="2"))
    backfill = [f"backfill row {i}" for i in range(10_000)]
    done: list[np.ndarray] = []
    resolved = [0]

    def run_backfill() -> None:
        progress = lambda n: resolved.__setitem__(0, resolved[0] + n)  # noqa: E731
        stream = make_client(model=model).embed_iter(backfill, batch=1000, timeout=300, on_progress=progress)
        done.extend(vectors for _, vectors in stream)

    held: list[int] = []
    thread = threading.Thread(target=run_backfill)
    thread.start()
    while not resolved[0] and thread.is_alive():
        held.append(r.hlen(UNACKED_KEY))  # tasks taken by the worker and not finished
        time.sleep(0.05)
    queries = make_client(model=model)
    for i in range(5):
        text = f"a query {i}"
        np.testing.assert_array_equal(queries.embed([text], timeout=60), hashed([text]))
    assert resolved[0] < 9_000, "the queries waited behind the backfill"
    assert 2 <= max(held) <= 3, "bulk tasks hold 2 slots (one more may come while the worker stops reading)"
    thread.join(300)
    np.testing.assert_array_equal(np.vstack(done), hashed(backfill))
    assert stat(r, model, "texts_interactive") == 5 and stat(r, model, "texts_bulk") == 10_000


def test_a_timed_out_call_is_dropped_and_a_later_call_computes_only_the_rest(
    make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/timed-out"
    start_worker(model, env=slow(0.005))  # ~200 texts/s: 3,000 texts would take 15 s
    texts = [f"given up {i}" for i in range(3000)]
    client = make_client(model=model)
    with pytest.raises(EmbqTimeoutError) as late:
        client.embed(texts, timeout=2)
    assert repr(keys.queue_name(model, lane=keys.BULK)) in str(late.value)  # the queue of the call's lane
    start = time.monotonic()
    for i in range(3):
        text = f"after the timeout {i}"
        np.testing.assert_array_equal(client.embed([text], timeout=30), hashed([text]))
    assert time.monotonic() - start < 10
    accounted = lambda: stat(r, model, "abandoned") + stat(r, model, "texts_bulk")  # noqa: E731
    wait_until(lambda: accounted() == 3000, 60, "every text computed or skipped")
    skipped = stat(r, model, "abandoned")
    assert skipped >= 1500, f"only {skipped} of the 3,000 abandoned texts were skipped"
    np.testing.assert_array_equal(client.embed(texts, timeout=120), hashed(texts))
    assert stat(r, model, "texts_bulk") == 3000, "each text computed once: the later call only computed the rest"


def test_a_producer_stopped_by_ctrl_c_leaves_its_queued_texts_to_be_skipped(
    redis_url: str, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/interrupted-producer"
    code = (
        "from producer import EmbeddingClient\n"
        f"EmbeddingClient({redis_url!r}, model={model!r}).embed([f'never needed {{i}}' for i in range(2000)])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBQ_UNKNOWN_MODEL_GRACE": "0"}  # its worker comes later
    producer = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        bulk = keys.queue_name(model, lane=keys.BULK)
        tasks = -(-2000 // START_TASK_TEXTS)  # no worker has published a rate: tasks of the starting size
        wait_until(lambda: r.llen(bulk) == tasks, 60, "the producer's tasks in the bulk queue")
        status = subprocess.run(
            [sys.executable, "-m", "embq", "status"],
            env={**env, "EMBQ_REDIS_URL": redis_url},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert f"(!) {model}: tasks queued and no worker online" in status.stdout, status.stdout
        producer.send_signal(signal.SIGINT)
        _, err = producer.communicate(timeout=30)
        assert "KeyboardInterrupt" in err
    finally:
        if producer.poll() is None:
            producer.kill()
    start_worker(model)
    wait_until(lambda: stat(r, model, "abandoned") == 2000, 60, "the worker to skip every text")
    assert stat(r, model, "texts") == 0 and r.llen(bulk) == 0


def test_tasks_shrink_to_a_slow_worker(make_client: Client, start_worker: Start, r: redis.Redis) -> None:
    model = "hash/slow"
    worker = start_worker(model, env=slow(0.01))  # 100 texts/s
    client = make_client(model=model, task_seconds=0.5, lease_seconds=1.0)
    client.embed([f"warm up {i}" for i in range(300)], timeout=60)  # 1 task of 300 texts: 3 s of engine

    assert worker.process is not None
    heartbeat = keys.worker_key(f"{socket.gethostname()}:{worker.process.pid}")

    def speed() -> float:
        return float(r.hget(heartbeat, "speed") or 0)

    wait_until(lambda: speed() > 0, 30, "the worker to publish its rate")
    tasks = stat(r, model, "tasks")
    client.embed([f"sized {i}" for i in range(600)], timeout=120)
    sent = stat(r, model, "tasks") - tasks
    expected = 600 / (0.5 * speed())
    assert sent >= expected / 2, f"{sent} tasks for 600 texts at {speed():.0f} texts/s: not sized to 0.5 s"


def test_bulk_tasks_are_small_while_no_worker_is_ready(
    make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    """A job sent while its workers start (none ready, no rate known) is cut into tasks of START_TASK_TEXTS, which
    spread over the workers as they come up, not into a few of 1,024 texts."""
    model = "hash/unmeasured"
    start_worker(model).stop()  # served before: the job's tasks are queued while no worker is online
    texts = [f"unmeasured {i}" for i in range(1024)]
    client = make_client(model=model)
    job = threading.Thread(target=client.embed, args=(texts,), kwargs={"priority": keys.BULK, "timeout": 120})
    job.start()
    bulk = keys.queue_name(model, lane=keys.BULK)
    wait_until(lambda: r.llen(bulk) >= 1024 // START_TASK_TEXTS, 60, "the job's tasks, of the starting size")
    start_worker(model)
    job.join(120)
    assert not job.is_alive()
    np.testing.assert_array_equal(client.embed(texts, timeout=30), [hash_vector(t, 384) for t in texts])


def test_no_stall_warning_while_a_worker_embeds_a_long_task(
    make_client: Client, start_worker: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A task of 1,024 texts takes ~20 s here, longer than the warning's 12 s: the worker's heartbeats
    show it embedding, so the producer keeps quiet."""
    model = "hash/long-task"
    start_worker(model, env=slow(0.02))
    client = make_client(model=model, stall_warning_seconds=12, lease_seconds=2.0, task_seconds=60)
    with caplog.at_level(logging.WARNING, logger="embq.producer.dispatcher"):
        client.embed([f"long {i}" for i in range(1024)], timeout=120)
    assert "no progress" not in caplog.text


def test_a_stall_warning_when_no_worker_takes_the_work(
    make_client: Client, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    model = "hash/unserved"
    client = make_client(model=model, stall_warning_seconds=1, lease_seconds=0.4, unknown_model_grace=0)
    with caplog.at_level(logging.WARNING, logger="embq.producer.dispatcher"), pytest.raises(EmbqTimeoutError):
        client.embed(["waits"], timeout=3)
    assert "no progress" in caplog.text and "embq.hash/unserved" in caplog.text


def test_a_model_no_worker_serves_fails_fast_in_the_client_langchain_and_the_gateway(
    hash_worker: LocalWorker, redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBQ_UNKNOWN_MODEL_GRACE", "1")
    start = time.monotonic()
    with EmbeddingClient(redis_url, model="no/such-model") as client, pytest.raises(ModelNotServedError) as caught:
        client.embed(["a typo"])
    assert time.monotonic() - start < 10
    assert "'no/such-model'" in str(caught.value) and repr(HASH_MODEL) in str(caught.value)
    assert HASH_MODEL in caught.value.served
    embeddings = EmbqEmbeddings("no/such-model", redis_url)
    with pytest.raises(ModelNotServedError):
        embeddings.embed_query("a typo")
    embeddings.close()
    with LocalGateway(redis_url) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="open", max_retries=0)
        with pytest.raises(openai.NotFoundError) as refused:
            api.embeddings.create(model="no/such-model", input=["a typo"])
        assert refused.value.code == "model_not_found"
        assert server.stop() == 0
    assert not [k for k in r.scan_iter(match="embq.no/such-model*")], "no queue left behind"
    assert not list(r.scan_iter(match=keys.VECTOR + "*")), "nothing claimed"


def test_a_model_served_before_waits_for_its_workers_and_says_so(
    start_worker: Start, redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    model = "hash/comes-back"
    worker = start_worker(model)
    assert worker.stop() == 0  # its signature stays: the model is known
    with (
        EmbeddingClient(redis_url, model=model) as client,
        caplog.at_level(logging.WARNING, logger="embq.producer.dispatcher"),
        pytest.raises(EmbqTimeoutError),
    ):
        client.embed(["waits for the worker"], timeout=1)
    assert caplog.text.count("no worker of model 'hash/comes-back' is online") == 1


def test_the_gateway_takes_the_lane_from_the_request(redis_url: str, r: redis.Redis) -> None:
    """A model named at start, no worker: each request waits a second, and its task shows its lane."""
    model = "hash/gateway-lanes"
    with LocalGateway(redis_url, models=(model,), env={"EMBQ_REQUEST_TIMEOUT": "1"}) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="open", max_retries=0)
        with pytest.raises(openai.APIStatusError) as late:
            api.embeddings.create(model=model, input=["a query"])
        assert late.value.status_code == 504
        assert r.llen(keys.queue_name(model)) == 1 and not r.exists(keys.queue_name(model, lane=keys.BULK))
        with pytest.raises(openai.APIStatusError) as late:
            api.embeddings.create(model=model, input=["a document"], extra_headers={"X-Embq-Priority": "bulk"})
        assert late.value.status_code == 504 and r.llen(keys.queue_name(model, lane=keys.BULK)) == 1
        with pytest.raises(openai.APIStatusError) as late:
            api.embeddings.create(model=model, input=["another document"], extra_body={"priority": "bulk"})
        assert late.value.status_code == 504 and r.llen(keys.queue_name(model, lane=keys.BULK)) == 2
        with pytest.raises(openai.BadRequestError) as refused:
            api.embeddings.create(model=model, input=["x"], extra_headers={"X-Embq-Priority": "urgent"})
        assert "X-Embq-Priority" in refused.value.message and refused.value.code == "invalid_priority"
        with pytest.raises(openai.BadRequestError) as refused:  # checked even where the field would win
            api.embeddings.create(
                model=model, input=["x"], extra_body={"priority": "bulk"}, extra_headers={"X-Embq-Priority": "soon"}
            )
        assert refused.value.code == "invalid_priority"
        with pytest.raises(openai.BadRequestError) as refused:
            api.embeddings.create(model=model, input=["x"], extra_body={"priority": "Bulk"})
        assert refused.value.code == "invalid_priority" and refused.value.param == "priority"
        with pytest.raises(openai.APIStatusError) as late:  # the field wins over the header
            api.embeddings.create(
                model=model,
                input=["a third document"],
                extra_body={"priority": "bulk"},
                extra_headers={"X-Embq-Priority": "interactive"},
            )
        assert late.value.status_code == 504 and r.llen(keys.queue_name(model, lane=keys.BULK)) == 3
        assert server.stop() == 0
