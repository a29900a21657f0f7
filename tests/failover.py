"""Test support shared by the failover tests: producers embedding at once while something dies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from embq.producer import EmbeddingClient
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalWorker


def expected(texts: list[str]) -> np.ndarray:
    return np.stack([hash_vector(t, 384) for t in texts])


def worries(worker: LocalWorker) -> str:
    """The worker's log without its task lines."""
    lines = worker.log_path.read_text(errors="replace").splitlines()
    return "\n".join(line[:300] for line in lines if "] Task" not in line)


def embed_concurrently(clients: list[EmbeddingClient], calls: list[list[str]], timeout: float) -> list[object]:
    """Each client embeds its texts in its own thread; the vectors, or the error, of each."""
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = clients[i].embed(calls[i], timeout=timeout)
        except Exception as e:  # reported by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return results


def embed_while_killing(
    clients: list[EmbeddingClient], calls: list[list[str]], kill: Callable[[], float], after: float = 1.5
) -> tuple[list[object], float, float]:
    """``embed_concurrently``, with ``kill`` run ``after`` seconds in; ``(results, seconds the calls took,
    seconds ``kill`` reported)``. The clients are closed after."""
    failover: list[float] = []
    killer = threading.Timer(after, lambda: failover.append(kill()))
    try:
        killer.start()
        started = time.monotonic()
        results = embed_concurrently(clients, calls, timeout=240)
        took = time.monotonic() - started
    finally:
        killer.join()
        for client in clients:
            client.close()
    assert failover, "the kill did not complete"
    return results, took, failover[0]
