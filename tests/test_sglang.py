"""The SGLang engine host end to end: real Redis, real worker processes, the sglang 0.5.23 stand-in.

The worker imports ``sglang`` from ``tests/standins`` (see its docstring for
what it mirrors); everything else is the production code path.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from producer import EmbeddingClient, ItemFailedError, keys
from tests.conftest import Background, alive, embed_in_background
from tests.sglang_support import MODEL, alias, expected, pids_in_log, sglang_env, standin, tokenizer
from worker.engines.sglang import SGLangEngine
from worker.local import LocalWorker, wait_until
from worker.tasks import MAX_ENGINE_DEATHS

Start = Callable[..., LocalWorker]
Client = Callable[..., EmbeddingClient]


def test_every_option_is_a_real_engine_keyword() -> None:
    engine = SGLangEngine(
        MODEL,
        mem_fraction_static=0.8,
        max_running_requests=128,
        chunked_prefill_size=4096,
        context_length=8192,
        tp_size=2,
        dtype="bfloat16",
        load_format="dummy",
        trust_remote_code=True,
        truncate=True,
        sglang_args={"random_seed": 7},
    )
    kwargs = engine.engine_kwargs()
    assert kwargs["is_embedding"] is True and kwargs["allow_auto_truncate"] is True
    assert set(kwargs) <= standin.FIELDS
    with pytest.raises(TypeError, match="Unexpected keyword argument 'not_an_option'"):
        standin.Engine(**kwargs, not_an_option=1)


def test_an_unknown_engine_keyword_stops_the_worker_at_start(start_worker: Start) -> None:
    with pytest.raises(Exception, match="exited with 3") as info:
        start_worker(MODEL, engine="sglang", env=sglang_env(EMBQ_SGLANG_ARGS='{"not_an_option": 1}'))
    assert "Unexpected keyword argument 'not_an_option'" in str(info.value)


def test_vectors_instructions_dims_and_too_long_texts(start_worker: Start, make_client: Client, tmp_path: Path) -> None:
    worker = start_worker(MODEL, engine="sglang", env=sglang_env(EMBQ_MEM_FRACTION_STATIC="0.7"))
    assert "'mem_fraction_static': 0.7" in worker.log_path.read_text()
    assert "'is_embedding': True" in worker.log_path.read_text()
    client = make_client(model=MODEL)
    texts = [f"document number {i} about embeddings" for i in range(50)]
    np.testing.assert_allclose(client.embed(texts, timeout=60), expected(texts), rtol=1e-5, atol=1e-6)

    task = "Given a web search query, retrieve relevant passages"
    query = client.embed(["what is redis"], instruction=task, timeout=60)
    np.testing.assert_allclose(query, expected([f"Instruct: {task}\nQuery:what is redis"]), atol=1e-6)

    full = client.embed(texts[:5], timeout=60)
    small = client.embed(texts[:5], dim=64, timeout=60)
    head = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(small, head, rtol=1e-6)

    long_text = "word " * 300
    with pytest.raises(ItemFailedError) as info:
        client.embed(["before", long_text, "after"], timeout=60)
    assert list(info.value.failures) == [1]
    assert "tokens, the model's context is 128 tokens" in info.value.failures[1]
    np.testing.assert_allclose(info.value.vectors[[0, 2]], expected(["before", "after"]), atol=1e-6)

    truncating = alias(tmp_path, "truncating")
    start_worker(truncating, engine="sglang", env=sglang_env(EMBQ_TRUNCATE="1"))
    cut = make_client(model=truncating).embed([long_text], timeout=60)
    ids = tokenizer()(long_text)["input_ids"][:128]
    np.testing.assert_allclose(cut[0], standin.standin_embedding(ids, 384), atol=1e-6)


def run_workers_until_done(start_worker: Start, background: Background, env: dict[str, str], most: int) -> int:
    """Start workers one after another, as an orchestrator restarts them; returns how many died."""
    deaths = 0
    for _ in range(most):
        worker = start_worker(MODEL, engine="sglang", env=env, wait=False)
        assert worker.process is not None
        process = worker.process

        def ended(process: subprocess.Popen[bytes] = process) -> bool:
            return background.finished or process.poll() is not None

        wait_until(ended, 120, "the call or the worker to end")
        if background.finished:
            return deaths
        assert process.returncode == 4, worker.log_tail()  # engine dead: tasks requeued, worker exits
        deaths += 1
    raise AssertionError(f"still not done after {most} workers")


def test_a_text_that_crashes_the_engine_fails_alone(start_worker: Start, make_client: Client) -> None:
    texts = [f"mate {i}" for i in range(12)]
    texts[5] = "a POISON text"
    background = embed_in_background(make_client(model=MODEL), texts, timeout=300)
    env = sglang_env(EMBQ_STANDIN_POISON="POISON")
    deaths = run_workers_until_done(start_worker, background, env, most=6)
    # the batch once, then the text alone on each of its MAX_ENGINE_DEATHS deliveries
    assert deaths == 1 + MAX_ENGINE_DEATHS
    with pytest.raises(ItemFailedError) as info:
        background()
    assert list(info.value.failures) == [5] and "engine died" in info.value.failures[5], info.value.failures
    good = [i for i in range(12) if i != 5]
    np.testing.assert_allclose(info.value.vectors[good], expected([texts[i] for i in good]), atol=1e-6)


def test_a_batch_too_big_for_the_engine_succeeds_split(start_worker: Start, make_client: Client) -> None:
    texts = [f"crowd {i}" for i in range(20)]
    background = embed_in_background(make_client(model=MODEL), texts, timeout=300)
    deaths = run_workers_until_done(start_worker, background, sglang_env(EMBQ_STANDIN_OOM_ABOVE="8"), most=4)
    assert deaths == 1
    np.testing.assert_allclose(background(), expected(texts), atol=1e-6)


def test_a_silent_engine_makes_the_worker_requeue_and_exit(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    stuck = start_worker(MODEL, engine="sglang", env=sglang_env(EMBQ_STANDIN_HANG="HANG", EMBQ_ENGINE_CALL_TIMEOUT="2"))
    children = pids_in_log(stuck)
    texts = ["fine", "HANG until the worker gives up"]
    join = embed_in_background(make_client(model=MODEL), texts)
    assert stuck.process is not None
    wait_until(lambda: stuck.process.poll() is not None, 60, "the stuck worker to exit")
    assert stuck.process.returncode == 4, stuck.log_tail()
    assert not stuck.ready_file.exists()
    assert not any(alive(pid) for pid in children)
    assert r.llen(keys.queue_name(MODEL)) == 1  # the task went back to the queue
    start_worker(MODEL, engine="sglang", env=sglang_env())
    np.testing.assert_allclose(join(), expected(texts), atol=1e-6)


def test_a_crashed_engine_makes_the_worker_requeue_and_exit(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    doomed = start_worker(MODEL, engine="sglang", env=sglang_env(EMBQ_STANDIN_DIE="DIE"))
    children = pids_in_log(doomed)
    texts = ["survivor", "DIE here"]
    join = embed_in_background(make_client(model=MODEL), texts)
    assert doomed.process is not None
    wait_until(lambda: doomed.process.poll() is not None, 60, "the crashed worker to exit")
    assert doomed.process.returncode == 4, doomed.log_tail()
    assert "an SGLang child process failed (SIGQUIT)" in doomed.log_path.read_text()
    assert not any(alive(pid) for pid in children)
    # Back in the queue at once, not after the visibility timeout, and only once:
    # the dying worker does not take it again.
    assert r.llen(keys.queue_name(MODEL)) == 1, doomed.log_tail(80)
    start_worker(MODEL, engine="sglang", env=sglang_env())
    np.testing.assert_allclose(join(), expected(texts), atol=1e-6)


def test_sigterm_finishes_the_batch_in_flight_and_returns_the_rest(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    slow = start_worker(MODEL, engine="sglang", env=sglang_env(EMBQ_STANDIN_DELAY="2", EMBQ_CONCURRENCY="1"))
    children = pids_in_log(slow)
    texts = [f"slow {i}" for i in range(6)]
    client = make_client(model=MODEL, task_max_texts=2)
    join = embed_in_background(client, texts)
    queue = keys.queue_name(MODEL)
    wait_until(lambda: r.llen(queue) == 2, 30, "the worker to take one task of three")
    assert slow.stop(grace=30) == 0, slow.log_tail()
    assert int(r.hget(keys.stats_key(MODEL), "texts") or 0) == 2  # the batch in flight was finished
    assert r.llen(queue) == 2  # the rest went back, or was never taken
    assert not any(alive(pid) for pid in children)
    start_worker(MODEL, engine="sglang", env=sglang_env())
    np.testing.assert_allclose(join(), expected(texts), atol=1e-6)
