"""Load: 200,000 texts (50% duplicates), 16 producer threads, 2 workers, one killed and restarted midway.

Counts must be exact: every text answered with its own vector, each unique
text computed once, plus at most the batches the killed worker held.
Memory of producers and workers must stay flat. Run with ``-m soak``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import threading
import time

import msgpack
import numpy as np
import psutil
import pytest
import redis

from embq.producer import EmbeddingClient, Settings, keys
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalRedis, LocalWorker, wait_until

pytestmark = pytest.mark.soak

MODEL = "hash/soak"
UNIQUE = 100_000
PRODUCERS = 16
CALL_TEXTS = 1000
VISIBILITY = 5
#: Resident memory a process may gain between the first quarter of the run and its end (the producers'
#: L1s, bounded, on top).
FLAT_MB = 64
L1_BYTES = 1 << 20


RECEIVED = re.compile(rb"Task embq\.embed\[([^\]]+)\] received")


def held_by(worker: LocalWorker, r: redis.Redis) -> dict[str, int]:
    """Texts by task id of the messages ``worker`` took (its log says so) and has not acknowledged."""
    received = set(RECEIVED.findall(worker.log_path.read_bytes()))
    held = {}
    for raw in r.hvals("unacked"):
        message = json.loads(raw)[0]
        task_id = message["headers"]["id"]
        if task_id.encode() in received:
            args = msgpack.unpackb(base64.b64decode(message["body"]))[0]
            held[task_id] = len(args[0]["texts"])
    return held


def freeze_holding(worker: LocalWorker, r: redis.Redis) -> dict[str, int]:
    """Stop ``worker`` (SIGSTOP) at a moment it holds tasks, so that its kill surely loses a batch."""
    assert worker.process is not None
    pid = worker.process.pid
    held: dict[str, int] = {}

    def holding() -> bool:
        os.kill(pid, signal.SIGSTOP)
        held.update(held_by(worker, r))
        if not held:
            os.kill(pid, signal.SIGCONT)
        return bool(held)

    wait_until(holding, 60, "the doomed worker to hold tasks")
    return held


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_soak() -> None:
    rng = random.Random(7)
    unique = [f"soak text {i} " + "word " * rng.randint(1, 40) for i in range(UNIQUE)]
    requests = unique + unique
    rng.shuffle(requests)
    slices = [requests[n::PRODUCERS] for n in range(PRODUCERS)]
    total_calls = sum(len(range(0, len(s), CALL_TEXTS)) for s in slices)
    env = {"EMBQ_VISIBILITY_TIMEOUT": str(VISIBILITY)}

    with LocalRedis() as server:
        r = redis.Redis.from_url(server.url)
        # Each producer's L1 fills up to its bound as it runs: a small bound keeps it in the path, and apart
        # from leaks (its 16 x 1 MiB are allowed below).
        settings = Settings(
            redis_url=server.url,
            model=MODEL,
            visibility_timeout=VISIBILITY,
            lease_seconds=10.0,
            l1_bytes=L1_BYTES,
        )
        steady = LocalWorker(server.url, engine="hash", model=MODEL, env=env).start()
        doomed = LocalWorker(server.url, engine="hash", model=MODEL, env=env).start()
        done_calls = 0
        answered = 0
        wrong: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def produce(texts: list[str]) -> None:
            nonlocal done_calls, answered
            client = EmbeddingClient(settings=settings)
            try:
                for start in range(0, len(texts), CALL_TEXTS):
                    chunk = texts[start : start + CALL_TEXTS]
                    out = client.embed(chunk, timeout=240)
                    bad = [t for t, row in zip(chunk, out, strict=True) if not np.array_equal(row, hash_vector(t, 384))]
                    with lock:
                        done_calls += 1
                        answered += len(chunk)
                        wrong.extend(bad)
            except BaseException as e:
                errors.append(e)
            finally:
                client.close()

        started = time.monotonic()
        me = psutil.Process().pid
        threads = [threading.Thread(target=produce, args=(s,)) for s in slices]
        for t in threads:
            t.start()
        wait_until(lambda: done_calls >= total_calls // 4 or errors, 240, "a quarter of the work")
        assert steady.process is not None
        early = {"producers": rss_mb(me), "worker": rss_mb(steady.process.pid)}
        wait_until(lambda: done_calls >= total_calls * 2 // 5 or errors, 240, "two fifths of the work")
        held = sum(freeze_holding(doomed, r).values())
        doomed.kill()
        doomed.cleanup()
        restarted = LocalWorker(server.url, engine="hash", model=MODEL, env=env).start()
        for t in threads:
            t.join(300)
        elapsed = time.monotonic() - started
        late = {"producers": rss_mb(me), "worker": rss_mb(steady.process.pid)}
        computed = int(r.hget(keys.stats_key(MODEL), "texts") or 0)
        restarted.cleanup()
        steady.cleanup()
        r.close()

    assert not errors, errors[0]
    assert answered == len(requests) and not wrong
    assert held > 0
    assert UNIQUE <= computed <= UNIQUE + held, (computed, held)
    for name in early:
        allowed = FLAT_MB + (PRODUCERS * L1_BYTES / 2**20 if name == "producers" else 0)
        assert late[name] - early[name] < allowed, (name, early[name], late[name])
    print(
        f"\nsoak: {len(requests)} texts in {elapsed:.1f}s ({len(requests) / elapsed:.0f}/s), "
        f"{computed} computed ({computed - UNIQUE} redone, {held} held at the kill), rss {early} -> {late}"
    )
