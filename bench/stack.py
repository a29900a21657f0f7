"""The processes a benchmark runs against: a private Redis, embq workers, a naive Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.naive import QUEUE as NAIVE_QUEUE
from bench.texts import MINILM
from embq.producer import EmbeddingClient, Settings, keys
from embq.worker.engines import Engine, create_engine
from embq.worker.local import LocalWorker, free_port, stop_process

#: The model each engine serves in the benchmarks (the hash engine's ids start with ``hash/``).
MODELS = {"sentence-transformers": MINILM, "hash": "hash/bench"}


class Worker:
    """An embq worker with its metrics port, so that engine calls can be counted."""

    def __init__(self, redis_url: str, engine: str, model: str | None = None, **env: str) -> None:
        self.port = free_port()
        self.model = model or MODELS[engine]
        # Texts over the model's context are cut, as the raw engine, naive Celery and Infinity cut them.
        settings = {"EMBQ_METRICS_PORT": str(self.port), **env}
        self.process = LocalWorker(redis_url, engine=engine, model=self.model, env=settings)

    def psutil(self) -> psutil.Process:
        assert self.process.process is not None, "the worker is not running"
        return psutil.Process(self.process.process.pid)

    def metrics(self) -> dict[str, float]:
        """Every unlabelled sample of its /metrics, by name."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples if not s.labels}

    def engine_calls(self) -> tuple[float, float]:
        """(engine calls, texts in them) so far."""
        samples = self.metrics()
        return samples["embq_engine_batch_texts_count"], samples["embq_engine_batch_texts_sum"]


@contextmanager
def workers(
    redis_url: str, engine: str, count: int = 1, model: str | None = None, **env: str
) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(count):
            worker = Worker(redis_url, engine, model, **env)
            started.append(worker)
            worker.process.start(timeout=300)
        yield started
    finally:
        for worker in started:
            worker.process.cleanup()


def client(redis_url: str, engine: str) -> EmbeddingClient:
    """A client of ``engine``'s model whose run starts cold: the cached vectors are removed first
    (workers serve only their cache namespace, so a fresh namespace would find none)."""
    cold(redis_url)
    return EmbeddingClient(settings=Settings(redis_url=redis_url, model=MODELS[engine]))


def cold(redis_url: str) -> None:
    """Remove every cached vector (not the queues, nor the workers' signatures)."""
    r = redis.Redis.from_url(redis_url)
    try:
        batch = []
        for key in r.scan_iter(match=keys.VECTOR + "*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                r.unlink(*batch)
                batch = []
        if batch:
            r.unlink(*batch)
    finally:
        r.close()


def computed(redis_url: str, engine: str) -> int:
    """Texts the workers of ``engine``'s model have embedded so far (their stats hash)."""
    r = redis.Redis.from_url(redis_url)
    try:
        return int(r.hget(keys.stats_key(MODELS[engine]), "texts") or 0)
    finally:
        r.close()


def load_engine(engine: str) -> Engine:
    loaded = create_engine(engine, MODELS[engine], truncate=True)
    loaded.load()
    return loaded


@contextmanager
def naive_worker(redis_url: str, engine: str, concurrency: int) -> Iterator[None]:
    """The naive Celery worker, warmed up (engine loaded) before it is timed."""
    log = Path(tempfile.mkdtemp(prefix="embq-bench-naive-")) / "worker.log"
    env = {**os.environ, "EMBQ_REDIS_URL": redis_url, "EMBQ_ENGINE": engine, "EMBQ_MODEL": MODELS[engine]}
    command = [sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "--pool=threads"]
    command += [
        f"--concurrency={concurrency}",
        f"--queues={NAIVE_QUEUE}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            from bench.naive import app, embed_one

            app.conf.update(broker_url=redis_url, result_backend=redis_url)
            embed_one.delay("warm-up").get(timeout=300)
            yield
        finally:
            stop_process(process, grace=30)


def naive_embed(texts: list[str]) -> np.ndarray:
    from bench.naive import embed_one

    results = [embed_one.delay(text) for text in texts]
    return np.asarray([r.get(timeout=3600) for r in results], dtype=np.float32)
