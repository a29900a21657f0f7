"""The SGLang engine host end to end, against the real sglang 0.5.23 package.

Workers run in the SGLang test environment and host the real ``sglang.Engine``
whose scheduler process is the CPU one of ``tests/sglang_cpu/scheduler.py``:
``ServerArgs`` validation, spawn and pickling, signal handlers, SGLang's logger
setup, its tokenizer manager, detokenizer process, watchdog, context-length
errors and ``shutdown`` are SGLang's own. Only the forward pass is ours (a tiny
random-weight Qwen3 on the CPU), and faults are injected there. Everything
outside the worker is real too: a real Redis, real worker processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import psutil
import pytest
import redis

from embq.producer import EmbeddingClient, EmbqError, ItemFailedError, keys
from embq.producer.broker import UNACKED_KEY
from embq.worker.local import LocalWorker, wait_until
from embq.worker.tasks import MAX_ENGINE_DEATHS
from tests.conftest import Background, alive, embed_in_background
from tests.sglang_support import CONTEXT, SGLangCpu, front_pids, logged_pids, pids_in_log

Start = Callable[..., LocalWorker]
Client = Callable[..., EmbeddingClient]

#: Run in the SGLang environment: the keywords a worker passes, through the real ServerArgs and pickle.
SERVER_ARGS_CHECK = """
import json, pickle, sys
from sglang.srt.server_args import ServerArgs
from embq.worker.engines.sglang import SGLangEngine, on_child_failure
options = json.loads(sys.argv[1])
kwargs = SGLangEngine(sys.argv[2], **options).engine_kwargs()
args = pickle.loads(pickle.dumps(ServerArgs(**kwargs)))
assert args.custom_sigquit_handler is on_child_failure, args.custom_sigquit_handler
try:
    ServerArgs(**kwargs, not_an_option=1)
except TypeError as e:
    print(json.dumps({"fields": sorted(kwargs), "unknown": str(e), "truncate": args.allow_auto_truncate}))
"""


def test_the_keywords_a_worker_passes_make_a_serverargs_that_pickles(sglang: SGLangCpu) -> None:
    options = {
        "mem_fraction_static": 0.8,
        "max_running_requests": 128,
        "chunked_prefill_size": 4096,
        "context_length": 8192,
        "tp_size": 2,
        "dtype": "bfloat16",
        "load_format": "dummy",
        "trust_remote_code": True,
        "sglang_args": {"random_seed": 7},
    }
    done = subprocess.run(
        [str(sglang.python), "-W", "ignore", "-c", SERVER_ARGS_CHECK, json.dumps(options), str(sglang.model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "custom_sigquit_handler" in found["fields"] and "enable_tokenizer_batch_encode" in found["fields"]
    assert found["truncate"] is True  # always: each task says whether its texts are cut (tasks decide, not workers)
    assert found["unknown"] == "Unexpected keyword argument 'not_an_option'"


def test_without_sglang_the_worker_says_so_in_one_line_at_once(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBQ_")} | {"EMBQ_REDIS_URL": redis_url}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "embq", "worker", "--engine", "sglang", "--model", "Qwen/Qwen3-Embedding-0.6B"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert time.monotonic() - started < 10
    assert done.returncode == 3
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "sglang" in lines[0] and "embq[sglang]" in lines[0] and "Traceback" not in lines[0]


def start_sglang(start_worker: Start, sglang: SGLangCpu, model: str | None = None, **kwargs: object) -> LocalWorker:
    env = kwargs.pop("env", None) or sglang.env()
    return start_worker(model or str(sglang.model), engine="sglang", env=env, python=str(sglang.python), **kwargs)


def test_an_unknown_engine_keyword_stops_the_worker_at_start(start_worker: Start, sglang: SGLangCpu) -> None:
    with pytest.raises(Exception, match="exited with 3") as info:
        start_sglang(start_worker, sglang, env=sglang.env({"not_an_option": 1}))
    assert "refused its options: Unexpected keyword argument 'not_an_option'" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_sglangs_sigquit_is_handled_whichever_thread_of_the_host_takes_it(
    start_worker: Start, sglang: SGLangCpu
) -> None:
    """SGLang's children SIGQUIT the host when they fail, and the kernel may hand the signal to any of its
    threads; Python runs the handler on the main thread, once it runs Python. An idle worker's host must not
    sit blocked on its pipe meanwhile: the engine is marked dead within moments, not at the next call."""
    worker = start_sglang(start_worker, sglang)
    [host] = logged_pids(worker, "SGLang host process") or []
    threads = [int(tid) for tid in os.listdir(f"/proc/{host}/task") if int(tid) != host]
    assert threads, "the host runs SGLang's threads beside its main one"
    tgkill = 234  # x86_64's syscall number: a signal to one thread of another process
    assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, host, threads[-1], signal.SIGQUIT) == 0
    said = "an SGLang child process failed (SIGQUIT)"
    wait_until(lambda: said in worker.log_path.read_text(), 15, "the host to handle the SIGQUIT")


def test_vectors_instructions_dims_and_long_texts(start_worker: Start, make_client: Client, sglang: SGLangCpu) -> None:
    worker = start_sglang(start_worker, sglang, env=sglang.env(EMBQ_MEM_FRACTION_STATIC="0.7"))
    log = worker.log_path.read_text()
    assert "'mem_fraction_static': 0.7" in log and "'is_embedding': True" in log
    # SGLang's configure_logger reset the root logger during the load: our lines after it survive.
    assert "SGLang engine ready" in log and "engine ready: dim=64" in log
    client = make_client(model=str(sglang.model))
    texts = [f"document number {i} about embeddings" for i in range(50)]
    np.testing.assert_allclose(client.embed(texts, timeout=60), sglang.expected(texts), atol=1e-5)

    task = "Given a web search query, retrieve relevant passages"
    query = client.embed(["what is redis"], instruction=task, timeout=60)
    np.testing.assert_allclose(query, sglang.expected([f"Instruct: {task}\nQuery:what is redis"]), atol=1e-5)

    full = client.embed(texts[:5], timeout=60)
    small = client.embed(texts[:5], dim=16, timeout=60)
    head = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(small, head, rtol=1e-6)

    # The scheduler takes fewer than max_req_input_len = CONTEXT - 6 tokens whole (TpModelWorker's formula).
    limit = CONTEXT - 6
    fits = " ".join(["word"] * (limit - 2))  # "word" and " word" are one token each, plus <|endoftext|>
    over = fits + " word"
    assert len(sglang.token_ids(fits)) == limit - 1 and len(sglang.token_ids(over)) == limit
    long_text = "word " * 300
    with pytest.raises(ItemFailedError) as info:
        client.embed(["before", long_text, over, fits, "after"], timeout=60)
    assert sorted(info.value.failures) == [1, 2]
    tokens = len(sglang.token_ids(long_text))
    refusal = f"the input ({tokens} tokens) is longer than this engine takes ({limit - 1} tokens)"
    assert refusal in info.value.failures[1]
    good = ["before", fits, "after"]
    np.testing.assert_allclose(info.value.vectors[[0, 3, 4]], sglang.expected(good), atol=1e-5)

    # A call that asks for the cut, on the same worker: the tokenizer manager cuts at the context, the
    # scheduler at max_req_input_len; in one pass with a text of a call that does not.
    cut = client.embed([long_text, over, "after"], truncate=True, timeout=60)
    np.testing.assert_allclose(cut[0], sglang.embed_ids(sglang.token_ids(long_text)[:limit]), atol=1e-5)
    np.testing.assert_allclose(cut[1], sglang.embed_ids(sglang.token_ids(over)[:limit]), atol=1e-5)
    np.testing.assert_allclose(cut[2], sglang.expected(["after"])[0], atol=1e-5)


def broker_state(worker: LocalWorker) -> str:
    """The model's queues and the broker's unacknowledged tasks: where a stalled task sits."""
    client = redis.Redis.from_url(worker.env["EMBQ_REDIS_URL"])
    try:
        queues = {name: client.llen(name) for name in (keys.queue_name(worker.model, lane=lane) for lane in keys.LANES)}
        unacked = [json.loads(raw)[0]["headers"]["id"] for raw in client.hvals(UNACKED_KEY)]
        return f"queues {queues}, unacked tasks {unacked}"
    except (redis.RedisError, ValueError, KeyError, IndexError, TypeError) as e:
        return f"broker state unreadable: {e}"
    finally:
        client.close()


def run_workers_until_done(
    start_worker: Start, sglang: SGLangCpu, background: Background, env: dict[str, str], most: int
) -> int:
    """Start workers one after another, as an orchestrator restarts them; returns how many died."""
    deaths = 0
    for _ in range(most):
        worker = start_sglang(start_worker, sglang, env=env, wait=False)
        assert worker.process is not None
        process = worker.process

        def ended(process: subprocess.Popen[bytes] = process) -> bool:
            return background.finished or process.poll() is not None

        try:
            wait_until(ended, 180, "the call or the worker to end")
        except EmbqError as e:
            tail = worker.log_tail(80)
            raise AssertionError(f"{e}\n{broker_state(worker)}\nworker {deaths + 1}'s log ends:\n{tail}") from None
        if background.finished:
            return deaths
        assert process.returncode == 4, worker.log_tail()  # engine dead: tasks requeued, worker exits
        deaths += 1
    raise AssertionError(f"still not done after {most} workers")


def test_a_text_that_crashes_the_scheduler_fails_alone(
    start_worker: Start, make_client: Client, sglang: SGLangCpu
) -> None:
    texts = [f"mate {i}" for i in range(12)]
    texts[5] = "a POISON text"
    client = make_client(model=str(sglang.model), unknown_model_grace=0)  # its workers start after it
    background = embed_in_background(client, texts, timeout=600)
    env = sglang.env(EMBQ_TEST_SCHEDULER_POISON="POISON")
    deaths = run_workers_until_done(start_worker, sglang, background, env, most=6)
    # the batch once, then the text alone on each of its MAX_ENGINE_DEATHS deliveries
    assert deaths == 1 + MAX_ENGINE_DEATHS
    with pytest.raises(ItemFailedError) as info:
        background()
    assert list(info.value.failures) == [5] and "engine died" in info.value.failures[5], info.value.failures
    good = [i for i in range(12) if i != 5]
    np.testing.assert_allclose(info.value.vectors[good], sglang.expected([texts[i] for i in good]), atol=1e-5)


def test_a_batch_that_runs_the_scheduler_out_of_memory_succeeds_split(
    start_worker: Start, make_client: Client, sglang: SGLangCpu
) -> None:
    texts = [f"crowd {i}" for i in range(20)]
    client = make_client(model=str(sglang.model), unknown_model_grace=0)  # its workers start after it
    background = embed_in_background(client, texts, timeout=600)
    env = sglang.env(EMBQ_TEST_SCHEDULER_OOM_ABOVE="8")
    assert run_workers_until_done(start_worker, sglang, background, env, most=4) == 1
    np.testing.assert_allclose(background(), sglang.expected(texts), atol=1e-5)


def test_a_silent_engine_makes_the_worker_requeue_and_exit(
    start_worker: Start, make_client: Client, sglang: SGLangCpu, r: redis.Redis
) -> None:
    env = sglang.env(EMBQ_TEST_SCHEDULER_HANG="HANG", EMBQ_ENGINE_CALL_TIMEOUT="2")
    stuck = start_sglang(start_worker, sglang, env=env)
    children = pids_in_log(stuck)
    texts = ["fine", "HANG until the worker gives up"]
    join = embed_in_background(make_client(model=str(sglang.model)), texts)
    assert stuck.process is not None
    wait_until(lambda: stuck.process.poll() is not None, 60, "the stuck worker to exit")
    assert stuck.process.returncode == 4, stuck.log_tail()
    assert not stuck.ready_file.exists()
    assert not any(alive(pid) for pid in children)
    assert r.llen(keys.queue_name(str(sglang.model))) == 1  # the task went back to the queue
    start_sglang(start_worker, sglang)
    np.testing.assert_allclose(join(), sglang.expected(texts), atol=1e-5)


def test_a_dead_scheduler_makes_the_worker_requeue_and_exit(
    start_worker: Start, make_client: Client, sglang: SGLangCpu, r: redis.Redis
) -> None:
    doomed = start_sglang(start_worker, sglang, env=sglang.env(EMBQ_TEST_SCHEDULER_DIE="DIE"))
    children = pids_in_log(doomed)
    texts = ["survivor", "DIE here"]
    join = embed_in_background(make_client(model=str(sglang.model)), texts)
    assert doomed.process is not None
    wait_until(lambda: doomed.process.poll() is not None, 60, "the crashed worker to exit")
    assert doomed.process.returncode == 4, doomed.log_tail()
    log = doomed.log_path.read_text()
    assert "crashed with exit code 1" in log  # SGLang's own watchdog noticed
    assert "an SGLang child process failed (SIGQUIT)" in log  # and our handler, not SGLang's, took it
    assert not any(alive(pid) for pid in children)
    # Back in the queue at once, not after the visibility timeout, and only once:
    # the dying worker does not take it again.
    assert r.llen(keys.queue_name(str(sglang.model))) == 1, doomed.log_tail(80)
    start_sglang(start_worker, sglang)
    np.testing.assert_allclose(join(), sglang.expected(texts), atol=1e-5)


def test_sigterm_finishes_the_batch_in_flight_and_returns_the_rest(
    start_worker: Start, make_client: Client, sglang: SGLangCpu, r: redis.Redis
) -> None:
    env = sglang.env(EMBQ_TEST_SCHEDULER_DELAY="2", EMBQ_CONCURRENCY="1")
    slow = start_sglang(start_worker, sglang, env=env)
    children = pids_in_log(slow)
    model = str(sglang.model)
    texts = [f"slow {i}" for i in range(6)]
    join = embed_in_background(make_client(model=model, task_max_texts=2), texts)
    queue = keys.queue_name(model)
    wait_until(lambda: r.llen(queue) == 2, 30, "the worker to take one task of three")
    assert slow.stop(grace=30) == 0, slow.log_tail()
    assert int(r.hget(keys.stats_key(model), "texts") or 0) == 2  # the batch in flight was finished
    assert r.llen(queue) == 2  # the rest went back, or was never taken
    assert not any(alive(pid) for pid in children)
    start_sglang(start_worker, sglang)
    np.testing.assert_allclose(join(), sglang.expected(texts), atol=1e-5)


def test_a_killed_engine_host_makes_the_worker_requeue_and_exit(
    start_worker: Start, make_client: Client, sglang: SGLangCpu, r: redis.Redis
) -> None:
    worker = start_sglang(start_worker, sglang, env=sglang.env(EMBQ_TEST_SCHEDULER_DELAY="3", EMBQ_CONCURRENCY="1"))
    host, *children = pids_in_log(worker)
    model = str(sglang.model)
    texts = ["hosted 1", "hosted 2"]
    join = embed_in_background(make_client(model=model), texts)
    wait_until(lambda: int(r.llen(keys.queue_name(model))) == 0, 30, "the worker to take the task")
    time.sleep(1)  # the pass is in the engine
    os.kill(host, signal.SIGKILL)
    assert worker.process is not None
    wait_until(lambda: worker.process.poll() is not None, 60, "the worker to exit")
    assert worker.process.returncode == 4, worker.log_tail()
    assert "the SGLang host process or one of its fronts exited" in worker.log_path.read_text()
    wait_until(lambda: not any(alive(pid) for pid in children), 30, "SGLang's children to follow their host")
    assert r.llen(keys.queue_name(model)) == 1, worker.log_tail(80)
    start_sglang(start_worker, sglang)
    np.testing.assert_allclose(join(), sglang.expected(texts), atol=1e-5)


def test_fronts_of_sglangs_multi_tokenizer_mode_share_the_work_and_die_with_the_worker(
    start_worker: Start, make_client: Client, sglang: SGLangCpu
) -> None:
    env = sglang.env({"tokenizer_worker_num": 2}, EMBQ_BATCH_MAX_TEXTS="64")
    worker = start_sglang(start_worker, sglang, env=env)
    engine = pids_in_log(worker)
    (front,) = front_pids(worker)
    before = psutil.Process(front).cpu_times()
    client = make_client(model=str(sglang.model), task_max_texts=64)
    texts = [f"front text {i} " + "word " * (i % 30) for i in range(2000)]
    np.testing.assert_allclose(client.embed(texts, timeout=120), sglang.expected(texts), atol=1e-5)
    after = psutil.Process(front).cpu_times()
    assert after.user + after.system - before.user - before.system > 0.1  # the joined front answered passes
    assert worker.process is not None
    worker.process.kill()
    worker.process.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in engine), 30, "the engine host and SGLang's children to end")
