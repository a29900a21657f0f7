"""What the queue itself costs: CPU per text of worker, producer and Redis, and one call of a million texts.

With the ``hash`` engine the model costs little, so the queue's own work shows.
CPU time is read with ``psutil`` for each process around one ``embed`` call:
the worker's minus the engine's own (the same texts, in the same engine calls,
timed in this process), the producer's (this process: nothing else runs in it
meanwhile), and the Redis server's.

The million-text call runs in a child process (``python -m bench.queue_cost
million``) so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import redis

from bench import stack
from bench.texts import make_texts
from bench.workloads import DIRECT, Rows
from embq.producer import EmbeddingClient, Settings
from embq.worker.engines.hash import HashEngine

#: Texts of the CPU-per-text measurement, and their length.
COST_TEXTS, SHORT_WORDS = 30_000, 12
#: Dimension of the hash vectors in the million-text call: the result alone is n x dim x 4 bytes.
MILLION_DIM = 128


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def queue_cost(rows: Rows, url: str, redis_pid: int, worker: stack.Worker, run: int) -> None:
    """CPU µs per text of each process for one bulk call of short texts, and its rate against the raw engine."""
    texts = make_texts(COST_TEXTS, seed=40_000 + run, max_words=SHORT_WORDS)
    engine = HashEngine(stack.MODELS["hash"])
    me = psutil.Process()
    before, started = cpu(me), time.perf_counter()
    engine.encode(texts)
    raw_seconds, engine_cpu = time.perf_counter() - started, cpu(me) - before

    client = stack.client(url, "hash")
    client.embed(["warm up"])
    processes = {"worker": worker.psutil(), "redis": psutil.Process(redis_pid), "producer": me}
    before_cpu = {name: cpu(p) for name, p in processes.items()}
    started = time.perf_counter()
    client.embed(texts)
    seconds = time.perf_counter() - started
    spent = {name: (cpu(p) - before_cpu[name]) / len(texts) * 1e6 for name, p in processes.items()}
    client.close()
    spent["worker"] -= engine_cpu / len(texts) * 1e6
    for name, label in (("worker", "worker beyond the engine"), ("producer", "producer"), ("redis", "Redis")):
        rows.get("Queue CPU", "hash", label, "µs/text").rates.append(spent[name])
    rows.get("Queue CPU", "hash", "queue total", "µs/text").rates.append(sum(spent.values()))
    rows.get("Queue CPU", "hash", "engine itself", "µs/text").rates.append(engine_cpu / len(texts) * 1e6)
    rows.get("Bulk short", "hash", DIRECT).rates.append(len(texts) / raw_seconds)
    rows.get("Bulk short", "hash", "embq, 1 worker").rates.append(len(texts) / seconds)


def million(rows: Rows, url: str, count: int, run: int) -> None:
    """One call of ``count`` short texts, then the same call again (all cached), each in a child process."""
    stack.cold(url)
    for label in ("uncached", "cached"):
        command = [sys.executable, "-m", "bench.queue_cost", "million", url, str(count), str(run)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row = rows.get("Million", "hash", f"{count:,} texts, {label}", "s")
        row.rates.append(result["seconds"])
        row.note("first task s", result["first_task"])
        row.note("peak RSS MB", result["peak_rss_mb"])
        row.note("RSS before MB", result["rss_before_mb"])


def peak_rss() -> int:
    """This process's own high-water RSS in bytes.

    Not ``getrusage``: Linux carries the forking parent's peak into a child's ``ru_maxrss`` across exec,
    so a child of a large benchmark process would report the parent's size.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def million_child(url: str, count: int, run: int) -> None:
    """In a child process: time one call, watch when its first task reaches the broker, report peak RSS."""
    texts = make_texts(count, seed=50_000 + run, max_words=SHORT_WORDS)
    settings = Settings(redis_url=url, model=stack.MODELS["hash"])
    client = EmbeddingClient(settings=settings)
    watcher = redis.Redis.from_url(url)
    queues = settings.queues  # a million texts go in the bulk lane
    first: list[float] = []
    stop = threading.Event()

    def watch(started: float) -> None:
        while not stop.is_set() and not first:
            if any(watcher.llen(queue) for queue in queues) or watcher.hlen("unacked"):
                first.append(time.perf_counter() - started)
            time.sleep(0.01)  # 10 ms resolution: a faster poll would slow the call it watches

    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    thread = threading.Thread(target=watch, args=(started,), daemon=True)
    thread.start()
    client.embed(texts, dim=MILLION_DIM)
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    client.close()
    peak = peak_rss()
    result = {
        "seconds": seconds,
        "first_task": first[0] if first else float("nan"),
        "peak_rss_mb": peak / 2**20,
        "rss_before_mb": rss_before / 2**20,
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["million"]:
    os.environ.pop("EMBQ_REDIS_URL", None)
    million_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
