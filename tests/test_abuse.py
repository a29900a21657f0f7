"""Lanes that hold when a caller abuses them: a huge call that claims to be a query, fair shares of the
bulk lane between producers.

Real processes: a Redis, hash workers slowed down per text (``EMBQ_HASH_SECONDS_PER_TEXT``), the abusive
producer in a child process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openai
import pytest
import redis

from embq.producer import EmbeddingClient, Settings, keys
from embq.producer.call import choose_lane
from embq.worker.local import LocalGateway, LocalWorker, wait_until
from tests.test_lanes import hashed, stat

ROOT = Path(__file__).resolve().parent.parent
Client = Callable[..., EmbeddingClient]
Start = Callable[..., LocalWorker]


def producer(redis_url: str, model: str, texts: str, priority: str) -> subprocess.Popen[str]:
    """Another client, in a process of its own: ``embed(<texts>, priority=...)``, then prints ``done``."""
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from embq import EmbeddingClient\n"
        f"with EmbeddingClient({redis_url!r}, model={model!r}) as client:\n"
        f"    client.embed({texts}, timeout=600, priority={priority!r})\n"
        "print('done', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# -- interactive is for queries ------------------------------------------------------------------


def test_a_call_above_the_interactive_cap_goes_bulk_whatever_it_claims() -> None:
    settings = Settings(interactive_cap_texts=100)
    assert choose_lane("interactive", 100, settings) == keys.INTERACTIVE
    assert choose_lane("interactive", 101, settings) == keys.BULK
    assert choose_lane(None, 5, settings) == keys.INTERACTIVE
    assert choose_lane("bulk", 5, settings) == keys.BULK


def test_one_callers_huge_interactive_call_does_not_hold_anothers_queries(
    redis_url: str, make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/abused-lane"
    start_worker(model, env={"EMBQ_HASH_SECONDS_PER_TEXT": "0.0002"})  # 5,000 texts/s: 40,000 texts take 8 s
    abuser = producer(redis_url, model, "[f'abuse {i}' for i in range(40_000)]", "interactive")
    try:
        wait_until(lambda: stat(r, model, "texts") >= 2000, 120, "the huge call to be under way")
        client = make_client(model=model)
        waits = []
        for i in range(10):
            text = f"a real query {i}"
            start = time.monotonic()
            np.testing.assert_array_equal(client.embed([text], timeout=60), hashed([text]))
            waits.append(time.monotonic() - start)
        assert stat(r, model, "texts") < 40_000, "the queries were answered while the huge call ran"
        out, err = abuser.communicate(timeout=300)
    finally:
        if abuser.poll() is None:
            abuser.kill()
    assert "done" in out, err
    assert max(waits) <= 2.0, f"a query waited {max(waits):.1f}s behind another caller's call"
    assert err.count("EMBQ_INTERACTIVE_CAP_TEXTS") == 1, err  # said once
    assert stat(r, model, "texts_bulk") == 40_000 and stat(r, model, "texts_interactive") == 10


def test_interactive_calls_of_one_client_are_admitted_through_a_window(
    redis_url: str, make_client: Client, r: redis.Redis
) -> None:
    """No worker yet: what one client claims for its interactive calls stays within its window, the
    rest waits in the client; a worker then answers every call."""
    model = "hash/interactive-window"
    client = make_client(model=model, interactive_cap_texts=10, unknown_model_grace=0)
    calls = [[f"window {c} {i}" for i in range(8)] for c in range(5)]
    results: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda c=c: results.setdefault(c, client.embed(calls[c], timeout=120)))
        for c in range(5)
    ]
    for thread in threads:
        thread.start()
    claimed = lambda: len(list(r.scan_iter(match=keys.VECTOR + "*")))  # noqa: E731
    wait_until(lambda: claimed() == 10, 30, "the first window's claims")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert claimed() == 10, "more interactive texts in flight than the window"
        time.sleep(0.1)
    with LocalWorker(redis_url, engine="hash", model=model):
        for thread in threads:
            thread.join(120)
    for c in range(5):
        np.testing.assert_array_equal(results[c], hashed(calls[c]))
    assert stat(r, model, "texts_interactive") == 40


def test_the_gateway_sends_a_request_above_the_interactive_cap_to_the_bulk_lane(redis_url: str, r: redis.Redis) -> None:
    """No worker: each request waits a second, and its task shows its lane."""
    model = "hash/gateway-cap"
    env = {"EMBQ_REQUEST_TIMEOUT": "1", "EMBQ_INTERACTIVE_CAP_TEXTS": "4"}
    with LocalGateway(redis_url, models=(model,), env=env) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="open", max_retries=0)
        with pytest.raises(openai.APIStatusError) as late:
            api.embeddings.create(model=model, input=[f"a query {i}" for i in range(4)])
        assert late.value.status_code == 504 and r.llen(keys.queue_name(model)) == 1
        with pytest.raises(openai.APIStatusError) as late:
            api.embeddings.create(model=model, input=[f"a document {i}" for i in range(5)])
        assert late.value.status_code == 504 and r.llen(keys.queue_name(model, lane=keys.BULK)) == 1
        assert r.llen(keys.queue_name(model)) == 1
        assert server.stop() == 0
        assert server.log_text().count("EMBQ_INTERACTIVE_CAP_TEXTS") == 1


# -- fair shares of the bulk lane ----------------------------------------------------------------


def test_a_small_bulk_job_is_served_beside_another_producers_backfill(
    redis_url: str, make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    model = "hash/shared-bulk"
    start_worker(model, env={"EMBQ_HASH_SECONDS_PER_TEXT": "0.0002"})  # 5,000 texts/s: the backfill takes 12 s
    backfill = producer(redis_url, model, "[f'backfill row {i}' for i in range(60_000)]", "bulk")
    try:
        wait_until(lambda: stat(r, model, "texts") >= 5000, 120, "the backfill to be under way")
        small = [f"small job {i}" for i in range(500)]
        start = time.monotonic()
        vectors = make_client(model=model).embed(small, timeout=60, priority="bulk")
        waited = time.monotonic() - start
        assert stat(r, model, "texts") < 60_000, "the small job ended before the backfill"
        out, err = backfill.communicate(timeout=300)
    finally:
        if backfill.poll() is None:
            backfill.kill()
    np.testing.assert_array_equal(vectors, hashed(small))
    assert "done" in out, err
    assert waited <= 5.0, f"a 500-text job waited {waited:.1f}s behind another producer's backfill"
    assert stat(r, model, "texts_bulk") == 60_500
