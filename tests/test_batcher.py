"""The batcher in-process with the real hash engine: coalescing, length sorting, failure isolation."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from worker.batcher import Batcher
from worker.engines.hash import HashEngine, hash_vector


class ObservedEngine(HashEngine):
    """The hash engine, recording each call and raising on texts that contain ``POISON``."""

    def __init__(self) -> None:
        super().__init__("test/hash", dim=16)
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if any("POISON" in t for t in texts):
            raise RuntimeError("the engine chokes on POISON")
        return super().encode(texts)


@pytest.fixture
def engine() -> ObservedEngine:
    return ObservedEngine()


@pytest.fixture
def batcher(engine: ObservedEngine) -> Iterator[Batcher]:
    b = Batcher(engine, max_tokens=100_000, max_texts=256, max_wait=0.2)
    b.start()
    yield b
    b.stop(timeout=10)


def run_concurrently(batcher: Batcher, groups: list[list[str]]) -> list:
    jobs: list = [None] * len(groups)
    start = threading.Barrier(len(groups))

    def submit(i: int) -> None:
        start.wait()
        jobs[i] = batcher.embed(groups[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return jobs


def test_small_concurrent_tasks_are_coalesced(batcher: Batcher, engine: ObservedEngine) -> None:
    groups = [[f"single {i}"] for i in range(64)]
    jobs = run_concurrently(batcher, groups)
    for group, job in zip(groups, jobs, strict=False):
        np.testing.assert_array_equal(job.vectors[0], hash_vector(group[0], 16))
    assert len(engine.calls) <= 4  # 64 single-text tasks, a handful of engine calls
    assert sum(len(c) for c in engine.calls) == 64


def test_a_call_is_sorted_by_length(batcher: Batcher, engine: ObservedEngine) -> None:
    texts = ["x" * n for n in (50, 3, 20, 1, 9)]
    job = batcher.embed(texts)
    assert engine.calls == [sorted(texts, key=len)]
    for text, vector in zip(texts, job.vectors, strict=False):
        np.testing.assert_array_equal(vector, hash_vector(text, 16))


def test_the_token_budget_splits_calls(engine: ObservedEngine) -> None:
    b = Batcher(engine, max_tokens=60, max_texts=1000, max_wait=0.0)
    b.start()
    try:
        job = b.embed(["y" * 100] * 10)  # ~27 estimated tokens each
    finally:
        b.stop(timeout=10)
    assert not job.errors
    assert all(len(call) <= 2 for call in engine.calls) and len(engine.calls) >= 5


def test_a_poison_text_fails_alone(batcher: Batcher, engine: ObservedEngine) -> None:
    texts = [f"mate {i}" for i in range(15)] + ["POISON pill"]
    job = batcher.embed(texts)
    assert list(job.errors) == [15] and "chokes on POISON" in job.errors[15]
    for text, vector in zip(texts[:15], job.vectors, strict=False):
        np.testing.assert_array_equal(vector, hash_vector(text, 16))
    assert job.vectors[15] is None


def test_stop_finishes_what_is_queued(engine: ObservedEngine) -> None:
    b = Batcher(engine, max_tokens=10, max_texts=1, max_wait=0.0)
    b.start()
    jobs = run_concurrently(b, [[f"t{i}"] for i in range(8)])
    b.stop(timeout=10)
    assert all(job.done.is_set() and not job.errors for job in jobs)
