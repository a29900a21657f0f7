"""Real parts only: one ``redis-server`` per session and real worker processes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from embq.producer import EmbeddingClient, Settings, keys
from embq.worker.local import LocalRedis, LocalWorker

HASH_MODEL = "hash/test"

pytest_plugins = ["tests.sglang_support"]

# The tests pick their Redis themselves; settings of the calling shell must not leak in.
for name in list(os.environ):
    if name.startswith("EMBQ_"):
        del os.environ[name]


def alive(pid: int) -> bool:
    """Whether a process of that PID runs: a zombie (dead, waiting for its parent or for init to reap it)
    does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no procfs: existing is all we can tell


class Background:
    """``client.embed`` running in a thread; call the object to join it and get the result."""

    def __init__(self, client: EmbeddingClient, texts: list[str], timeout: float) -> None:
        self.timeout = timeout
        self.result: dict[str, object] = {}
        self.thread = threading.Thread(target=self._run, args=(client, texts), daemon=True)
        self.thread.start()

    def _run(self, client: EmbeddingClient, texts: list[str]) -> None:
        try:
            self.result["out"] = client.embed(texts, timeout=self.timeout)
        except BaseException as e:
            self.result["error"] = e

    @property
    def finished(self) -> bool:
        return not self.thread.is_alive()

    def __call__(self) -> np.ndarray:
        self.thread.join(self.timeout + 10)
        if "error" in self.result:
            raise self.result["error"]  # type: ignore[misc]
        return self.result["out"]  # type: ignore[return-value]


def embed_in_background(client: EmbeddingClient, texts: list[str], timeout: float = 120) -> Background:
    return Background(client, texts, timeout)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> Iterator[str]:
    """The session Redis, with every embq key and queue removed after each test (heartbeats stay)."""
    yield redis_server.url
    client = redis.Redis.from_url(redis_server.url)
    for pattern in ("embq:*", "embq.*"):
        stale = [
            key
            for key in client.scan_iter(match=pattern)
            if not key.startswith(keys.WORKER.encode()) and key != keys.WORKERS.encode()
        ]
        if stale:
            client.delete(*stale)
    client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def hash_worker(redis_server: LocalRedis) -> Iterator[LocalWorker]:
    """One warm hash-engine worker for the whole session."""
    worker = LocalWorker(redis_server.url, engine="hash", model=HASH_MODEL)
    with worker:
        yield worker


@pytest.fixture
def start_worker(redis_url: str) -> Iterator[Callable[..., LocalWorker]]:
    """Start extra workers inside a test; they are stopped after it."""
    started: list[LocalWorker] = []

    def start(
        model: str,
        engine: str = "hash",
        env: dict[str, str] | None = None,
        wait: bool = True,
        python: str | None = None,
    ) -> LocalWorker:
        worker = LocalWorker(redis_url, engine=engine, model=model, env=env, python=python)
        started.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in started:
        worker.cleanup()


@pytest.fixture
def make_client(redis_url: str) -> Iterator[Callable[..., EmbeddingClient]]:
    clients: list[EmbeddingClient] = []

    def make(model: str = HASH_MODEL, **settings: object) -> EmbeddingClient:
        client = EmbeddingClient(settings=Settings(redis_url=redis_url, model=model, **settings))  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
