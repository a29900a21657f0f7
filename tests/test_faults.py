"""Faults production meets, with real processes, real signals and real Redis restarts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from embq.producer import BackendUnavailableError, EmbeddingClient, ItemFailedError, Settings, keys
from embq.producer.contract import TASK_EMBED, make_celery, make_payload
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalRedis, LocalWorker, wait_until
from tests.conftest import embed_in_background
from tests.sglang_support import SGLangCpu
from tests.tls_proxy import TlsProxy

Start = Callable[..., LocalWorker]
Client = Callable[..., EmbeddingClient]


def hashed(texts: list[str]) -> np.ndarray:
    return np.stack([hash_vector(t, 384) for t in texts])


def test_a_worker_killed_mid_batch_has_its_batch_redelivered(
    start_worker: Start, make_client: Client, r: redis.Redis, sglang: SGLangCpu
) -> None:
    visibility = "2"
    model, python = str(sglang.model), str(sglang.python)
    env = sglang.env(EMBQ_TEST_SCHEDULER_DELAY="60", EMBQ_VISIBILITY_TIMEOUT=visibility)
    doomed = start_worker(model, engine="sglang", env=env, python=python)
    texts = [f"in flight {i}" for i in range(40)]
    join = embed_in_background(make_client(model=model, task_max_texts=10), texts, timeout=300)
    wait_until(lambda: r.hlen("unacked") == 4, 30, "the worker to take all four tasks")
    doomed.kill()  # SIGKILL in the middle of its engine call

    def visible_again() -> bool:
        scores = [score for _, score in r.zrange("unacked_index", 0, -1, withscores=True)]
        return bool(scores) and max(scores) < time.time() - float(visibility)

    wait_until(visible_again, 30, "the visibility timeout to pass")
    start_worker(model, engine="sglang", env=sglang.env(EMBQ_VISIBILITY_TIMEOUT=visibility), python=python)
    np.testing.assert_allclose(join(), sglang.expected(texts), atol=1e-5)
    assert int(r.hget(keys.stats_key(model), "texts") or 0) == 40  # only the redelivered batch, once


@pytest.fixture
def restartable() -> Iterator[list[LocalRedis]]:
    servers = [LocalRedis().start()]
    yield servers
    servers[-1].stop()


def restart(servers: list[LocalRedis]) -> LocalRedis:
    """Stop the Redis and start an empty one on the same port, as a restart without persistence does."""
    port = servers[-1].port
    servers[-1].stop()
    servers.append(LocalRedis(port=port).start())
    return servers[-1]


def test_workers_and_producers_survive_a_redis_restart(restartable: list[LocalRedis]) -> None:
    url = restartable[0].url
    model = "hash/restart"
    with LocalWorker(url, engine="hash", model=model):
        client = EmbeddingClient(settings=Settings(redis_url=url, model=model, lease_seconds=2.0))
        before = [f"before {i}" for i in range(50)]
        np.testing.assert_array_equal(client.embed(before, timeout=30), hashed(before))
        restart(restartable)
        texts = before + [f"after {i}" for i in range(50)]
        np.testing.assert_array_equal(client.embed(texts, timeout=60), hashed(texts))
        client.close()


def test_a_producer_waiting_through_a_redis_restart_resends_what_was_lost(
    restartable: list[LocalRedis],
) -> None:
    url = restartable[0].url
    model = "hash/lost-queue"
    client = EmbeddingClient(settings=Settings(redis_url=url, model=model, lease_seconds=2.0, unknown_model_grace=0))
    texts = [f"queued {i}" for i in range(30)]
    join = embed_in_background(client, texts, timeout=90)
    broker = redis.Redis.from_url(url)
    wait_until(lambda: broker.llen(keys.queue_name(model)) == 1, 30, "the task to be queued")
    broker.close()
    restart(restartable)  # the queued task and the claims are gone
    with LocalWorker(url, engine="hash", model=model):
        np.testing.assert_array_equal(join(), hashed(texts))
    client.close()


def test_a_task_the_broker_lost_is_sent_again_by_its_producer(
    make_client: Client, start_worker: Start, r: redis.Redis
) -> None:
    """Kombu pops a message (BRPOP) before it records it as unacked: a worker
    killed between the two loses the message. Deleting the queued task is that loss."""
    model = "hash/lost-task"
    texts = [f"lost {i}" for i in range(30)]
    join = embed_in_background(make_client(model=model, lease_seconds=2.0, unknown_model_grace=0), texts, timeout=90)
    wait_until(lambda: r.llen(keys.queue_name(model)) == 1, 30, "the task to be queued")
    r.delete(keys.queue_name(model))
    start_worker(model)
    np.testing.assert_array_equal(join(), hashed(texts))
    assert int(r.hget(keys.stats_key(model), "texts") or 0) == 30


def test_a_task_that_keeps_vanishing_fails_instead_of_looping(make_client: Client, r: redis.Redis) -> None:
    model = "hash/vanishing"
    queue = keys.queue_name(model)
    client = make_client(model=model, lease_seconds=1.0, unknown_model_grace=0)
    join = embed_in_background(client, ["never answered"], timeout=60)
    for _ in range(3):  # each send of the task is lost
        wait_until(lambda: r.llen(queue) == 1, 30, "the task to be queued")
        r.delete(queue)
    with pytest.raises(ItemFailedError, match="gave up after 3 attempts: their task left the broker unanswered"):
        join()


def test_a_broker_restart_alone_loses_no_task() -> None:
    """Broker and cache apart: the claims survive in the cache, the queued task does not."""
    with LocalRedis() as cache:
        brokers = [LocalRedis().start()]
        try:
            settings = Settings(
                broker_url=brokers[0].url,
                cache_url=cache.url,
                model="hash/broker-restart",
                lease_seconds=2.0,
                unknown_model_grace=0,
            )
            client = EmbeddingClient(settings=settings)
            texts = [f"broker restart {i}" for i in range(30)]
            join = embed_in_background(client, texts, timeout=90)
            broker = redis.Redis.from_url(brokers[0].url)
            wait_until(lambda: broker.llen(keys.queue_name(settings.model)) == 1, 30, "the task to be queued")
            broker.close()
            restart(brokers)
            env = {"EMBQ_BROKER_URL": brokers[-1].url, "EMBQ_CACHE_URL": cache.url}
            with LocalWorker(brokers[-1].url, engine="hash", model=settings.model, env=env):
                np.testing.assert_array_equal(join(), hashed(texts))
            client.close()
        finally:
            brokers[-1].stop()


class Exploit:
    """Unpickling this runs a command: what a pickled message could do to a worker that accepts pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickled_message_is_rejected_not_executed(
    hash_worker: LocalWorker, redis_url: str, make_client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "executed"
    attacker = make_celery(Settings(redis_url=redis_url, model="hash/test"))
    attacker.conf.update(task_serializer="pickle", accept_content=["pickle"])
    queue = keys.queue_name("hash/test")
    pickle.dumps(Exploit(marker))  # the payload is a valid pickle
    attacker.send_task(TASK_EMBED, args=[Exploit(marker)], queue=queue, exchange="", routing_key=queue)
    wait_until(lambda: "ContentDisallowed" in hash_worker.log_path.read_text(), 30, "the worker to refuse it")
    assert not marker.exists()
    np.testing.assert_array_equal(make_client().embed(["still serving"], timeout=30), hashed(["still serving"]))


@pytest.mark.parametrize("user", [None, "embq-app"])
def test_password_and_acl_user_are_supported_and_never_logged(user: str | None) -> None:
    secret = "s3cret-Pa55word"
    with LocalRedis(password=secret) as server:
        url = server.url
        if user is not None:
            admin = redis.Redis.from_url(url)
            admin.acl_setuser(
                user, enabled=True, passwords=[f"+{secret}"], keys=["*"], channels=["*"], commands=["+@all"]
            )
            admin.close()
            url = f"redis://{user}:{secret}@127.0.0.1:{server.port}/0"
        with LocalWorker(url, engine="hash", model="hash/auth") as worker:
            client = EmbeddingClient(url, model="hash/auth")
            np.testing.assert_array_equal(client.embed(["guarded"], timeout=30), hashed(["guarded"]))
            client.close()
            log = worker.log_path.read_text()
        assert secret not in log
        with pytest.raises(BackendUnavailableError, match=r"invalid|WRONGPASS|auth") as info:
            EmbeddingClient(f"redis://:wrong@127.0.0.1:{server.port}/0", model="hash/auth").embed(["x"], timeout=5)
        assert "wrong" not in str(info.value)


def test_tls_with_a_password_for_broker_and_cache(tmp_path: Path) -> None:
    secret = "tls-Pa55word"
    with LocalRedis(password=secret) as server, TlsProxy(server.port, tmp_path) as proxy:
        url = f"rediss://:{secret}@localhost:{proxy.port}/0?ssl_ca_certs={proxy.ca_path}"
        with LocalWorker(url, engine="hash", model="hash/tls") as worker:
            client = EmbeddingClient(url, model="hash/tls")
            texts = [f"over tls {i}" for i in range(20)]
            np.testing.assert_array_equal(client.embed(texts, timeout=30), hashed(texts))
            client.close()
            log = worker.log_path.read_text()
        assert secret not in log
        assert "insecure" not in log.lower()
        untrusted = EmbeddingClient(f"rediss://:{secret}@localhost:{proxy.port}/0", model="hash/tls")
        with pytest.raises(BackendUnavailableError, match="certificate verify failed") as info:
            untrusted.embed(["x"], timeout=5)
        assert secret not in str(info.value)


def test_a_shared_redis_that_can_evict_the_queue_is_warned_about() -> None:
    with LocalRedis("--maxmemory-policy", "allkeys-lru") as server:
        with LocalWorker(server.url, engine="hash", model="hash/evict") as worker:
            assert "it can evict queued tasks" in worker.log_path.read_text()


def test_broker_and_cache_in_two_redis() -> None:
    with LocalRedis() as broker, LocalRedis() as cache:
        env = {"EMBQ_BROKER_URL": broker.url, "EMBQ_CACHE_URL": cache.url}
        with LocalWorker(broker.url, engine="hash", model="hash/two", env=env):
            client = EmbeddingClient(model="hash/two", settings=Settings(broker_url=broker.url, cache_url=cache.url))
            texts = [f"split {i}" for i in range(20)]
            np.testing.assert_array_equal(client.embed(texts, timeout=30), hashed(texts))
            client.close()
        b, c = redis.Redis.from_url(broker.url), redis.Redis.from_url(cache.url)
        assert not list(b.scan_iter(match=keys.VECTOR + "*"))
        assert len(list(c.scan_iter(match=keys.VECTOR + "*"))) == 20
        assert not list(c.scan_iter(match="_kombu*"))
        b.close()
        c.close()


def test_two_worker_kills_suspect_only_the_texts_inside_the_engine(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    """Workers killed twice while four tasks of 100 texts are held: only the texts of the pass inside the
    engine at each kill are suspected (run alone), the rest go on as one task, and no text is refused."""
    model, visibility = "hash/killed-twice", "2"
    slow = {
        "EMBQ_HASH_SECONDS_PER_TEXT": "0.02",
        "EMBQ_BATCH_MAX_TEXTS": "10",
        "EMBQ_VISIBILITY_TIMEOUT": visibility,
    }
    texts = [f"killed twice {i}" for i in range(400)]
    client = make_client(model=model, visibility_timeout=2, unknown_model_grace=0)  # its workers start after it
    join = embed_in_background(client, texts, timeout=300)

    def visible_again() -> bool:
        scores = [score for _, score in r.zrange("unacked_index", 0, -1, withscores=True)]
        return bool(scores) and max(scores) < time.time() - float(visibility)

    logs = []
    for _ in range(2):
        doomed = start_worker(model, env=slow)
        wait_until(lambda log=doomed.log_path: "received" in log.read_text(), 60, "the worker to take tasks")
        time.sleep(0.5)  # a few passes done, one inside the engine
        doomed.kill()
        logs.append(doomed)
        wait_until(visible_again, 30, "the visibility timeout to pass")
    last = start_worker(model, env={"EMBQ_VISIBILITY_TIMEOUT": visibility})
    np.testing.assert_array_equal(join(), hashed(texts))
    said = "\n".join(w.log_path.read_text() for w in [*logs, last])
    splits = [int(n) for n in re.findall(r"(\d+) of the \d+ texts of a task were in an engine pass", said)]
    assert splits and all(n <= 10 for n in splits), splits  # one pass at most, not every text held
    assert "refused" not in said


def test_workers_and_producers_ride_out_redis_restarts_under_load(tmp_path: Path) -> None:
    """Redis killed (SIGKILL) and back on its port 1.5 s later, three times, while four producers embed:
    the worker keeps running, and every call succeeds."""
    data = tmp_path / "redis"
    server = LocalRedis(data_dir=data).start()
    model = "hash/restarts"
    worker = LocalWorker(server.url, engine="hash", model=model, env={"EMBQ_HASH_SECONDS_PER_TEXT": "0.0005"})
    results: list[object] = []
    try:
        worker.start()

        def produce(n: int) -> None:
            client = EmbeddingClient(settings=Settings(redis_url=server.url, model=model))
            for k in range(3):
                texts = [f"restart {n} {k} {i}" for i in range(2000)]
                try:
                    results.append(np.array_equal(client.embed(texts, timeout=120), hashed(texts)))
                except Exception as e:
                    results.append(e)
            client.close()

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(3):
            time.sleep(2)
            assert server.process is not None
            server.process.kill()
            server.process.wait()
            time.sleep(1.5)
            server = LocalRedis(data_dir=data, port=server.port).start()
        for thread in threads:
            thread.join(300)
        assert results == [True] * 12, results
        assert worker.process is not None and worker.process.poll() is None, worker.log_tail()
        assert "Unrecoverable" not in worker.log_path.read_text()
        assert worker.stop() == 0
    finally:
        worker.cleanup()
        server.stop()


def test_a_worker_rides_out_a_full_redis(start_worker: Start, make_client: Client, r: redis.Redis) -> None:
    """A shared Redis at its memory cap, with noeviction: calls fail with Redis's reason, the worker lives
    on (it exits 0 when stopped), and serves again once there is room."""
    model = "hash/full-broker"
    worker = start_worker(model)
    client = make_client(model=model)
    client.embed(["before it was full"], timeout=30)
    r.set("ballast", b"\0" * (8 << 20))
    r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) - (1 << 20)))
    try:
        for k in range(3):
            with pytest.raises((ItemFailedError, BackendUnavailableError)):
                client.embed([f"full {k} {i}" for i in range(3000)], timeout=30)
        assert worker.process is not None and worker.process.poll() is None, worker.log_tail()
    finally:
        r.config_set("maxmemory", "0")
        r.delete("ballast")
    texts = [f"room again {i}" for i in range(100)]
    np.testing.assert_array_equal(make_client(model=model).embed(texts, timeout=60), hashed(texts))
    assert "Unrecoverable" not in worker.log_path.read_text()
    assert worker.stop() == 0


def test_a_killed_workers_tasks_go_to_another_worker_in_seconds(
    start_worker: Start, make_client: Client, r: redis.Redis
) -> None:
    """Two workers at the default visibility timeout (an hour); one is SIGKILLed while it holds tasks:
    the other takes them once the dead one's lease lapses, the call ends within 30 s of the kill, and
    every vector is right."""
    model = "hash/killed-holder"
    slow = {"EMBQ_HASH_SECONDS_PER_TEXT": "0.002", "EMBQ_BATCH_MAX_TEXTS": "64"}  # 500 texts/s each
    start_worker(model, env=slow)  # the survivor
    doomed = start_worker(model, env=slow)
    texts = [f"held by the dead {i}" for i in range(6000)]
    join = embed_in_background(make_client(model=model, task_max_texts=200), texts, timeout=300)
    assert doomed.process is not None
    holding = keys.HOLDING + f"{socket.gethostname()}:{doomed.process.pid}:"
    held = lambda: [k for k in r.scan_iter(match=holding + "*") if r.hlen(k) > 1]  # noqa: E731
    wait_until(lambda: held(), 30, "the doomed worker to hold tasks")
    time.sleep(4)
    assert not join.finished
    doomed.kill()
    killed = time.monotonic()
    vectors = join()
    assert time.monotonic() - killed <= 30, "the dead worker's tasks waited for the visibility timeout"
    np.testing.assert_array_equal(vectors, hashed(texts))
    # Any live worker on this broker may have put them back (every worker watches every lease): its record says.
    dead = f"{socket.gethostname()}:{doomed.process.pid}:"
    reclaimed = {name.decode(): json.loads(record) for name, record in r.hgetall(keys.RECLAIMED).items()}
    assert any(name.startswith(dead) and record["queues"] for name, record in reclaimed.items()), reclaimed
    assert int(r.hget(keys.stats_key(model), "texts") or 0) <= 6000 + 200, "a task computed by two live workers"


def test_a_long_task_hands_over_its_rows_as_they_are_done_and_a_kill_loses_only_the_last_ones(
    start_worker: Start, make_client: Client, r: redis.Redis, redis_url: str
) -> None:
    """One task of 1,024 texts in passes of 64 takes its worker 8 s: the rows done are stored while the task
    still runs, so a SIGKILL mid-task loses at most the last seconds' rows, and the worker that takes the
    task over computes only what was not stored (no text stored twice)."""
    model = "hash/hands-over"
    slow = {"EMBQ_HASH_SECONDS_PER_TEXT": "0.008", "EMBQ_BATCH_MAX_TEXTS": "64"}  # 125 texts/s
    doomed = start_worker(model, env=slow)
    texts = [f"handed over {i}" for i in range(1024)]
    settings = Settings(redis_url=redis_url, model=model)
    queue = keys.queue_name(model)
    payload = make_payload(settings, "", texts, reply="")  # one task, sent as a producer would
    make_celery(settings).send_task(TASK_EMBED, args=[payload], queue=queue, exchange="", routing_key=queue)
    stats = keys.stats_key(model)
    count = lambda field: int(r.hget(stats, field) or 0)  # noqa: E731
    wait_until(lambda: count("texts") >= 128, 30, "rows of the running task to be stored")
    assert count("tasks") == 0  # the task still runs
    doomed.kill()
    assert 128 <= count("texts") < len(texts)
    start_worker(model)  # takes the dead worker's task once its lease lapses
    wait_until(lambda: count("tasks") >= 1 and count("texts") >= len(texts), 60, "the task to end on the other")
    assert count("texts") == len(texts)  # each text stored once: the task, redelivered, skipped the rows stored
    np.testing.assert_array_equal(make_client(model=model).embed(texts, timeout=30), hashed(texts))  # all cached
    assert count("texts") == len(texts)


def test_a_worker_declared_dead_exits_rather_than_compute_what_went_to_another(
    start_worker: Start, r: redis.Redis
) -> None:
    """A worker frozen (SIGSTOP) past its lease is declared dead by another; thawed, it exits at once."""
    model = "hash/frozen"
    start_worker(model)
    frozen = start_worker(model)
    assert frozen.process is not None
    pid = frozen.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        dead = lambda: any(str(pid) in m.decode() for m in r.zrange(keys.DEAD_WORKERS, 0, -1))  # noqa: E731
        wait_until(dead, 60, "the frozen worker to be declared dead")
    finally:
        os.kill(pid, signal.SIGCONT)
    frozen.process.wait(30)
    assert frozen.process.returncode == 6
    assert "declared dead" in frozen.log_path.read_text()


def test_the_stall_warning_names_the_dead_worker_and_what_went_back(
    start_worker: Start, make_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """The model's only worker is SIGKILLed while it holds tasks; a worker of another model gives them
    back to their queue; the producer's stall warning names the dead worker and the tasks sent back, and
    the call ends once a worker of the model comes."""
    model = "hash/dead-and-named"
    start_worker("hash/bystander")  # reclaims the dead worker's tasks, serves none of them
    doomed = start_worker(model, env={"EMBQ_HASH_SECONDS_PER_TEXT": "0.005", "EMBQ_BATCH_MAX_TEXTS": "16"})
    texts = [f"named {i}" for i in range(1000)]
    client = make_client(model=model, task_max_texts=100, stall_warning_seconds=15, lease_seconds=2)
    with caplog.at_level(logging.WARNING, logger="embq.producer.dispatcher"):
        join = embed_in_background(client, texts, timeout=300)
        wait_until(lambda: "received" in doomed.log_path.read_text(), 30, "the doomed worker to take tasks")
        time.sleep(1)
        assert doomed.process is not None
        name = f"{socket.gethostname()}:{doomed.process.pid}:"
        doomed.kill()
        wait_until(lambda: "Workers died meanwhile" in caplog.text, 60, "the stall warning")
    warning = next(r.getMessage() for r in caplog.records if "Workers died meanwhile" in r.getMessage())
    assert name in warning and f"tasks back to '{keys.queue_name(model, lane=keys.BULK)}'" in warning, warning
    start_worker(model)
    np.testing.assert_array_equal(join(), hashed(texts))
