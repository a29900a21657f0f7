"""The batcher in-process with the real hash engine: coalescing, length sorting, failure isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from embq.producer.keys import BULK
from embq.worker.batcher import Batcher, BatcherStopped
from embq.worker.engines import EngineDead, EngineItemErrors
from embq.worker.engines.hash import HashEngine, hash_vector
from embq.worker.local import wait_until
from tests.test_lanes import GatedEngine


class ObservedEngine(HashEngine):
    """The hash engine, recording each call and raising on texts that contain ``POISON``."""

    def __init__(self) -> None:
        super().__init__("hash/test", dim=16)
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
        np.testing.assert_array_equal(job.vector(0), hash_vector(group[0], 16))
    assert len(engine.calls) <= 4  # 64 single-text tasks, a handful of engine calls
    assert sum(len(c) for c in engine.calls) == 64


class SlowEngine(ObservedEngine):
    """Half a second per call, like a model on a CPU."""

    def encode(self, texts: list[str]) -> np.ndarray:
        time.sleep(0.5)
        return super().encode(texts)


def test_callers_answered_by_a_long_call_join_the_next_one() -> None:
    """Eight callers, each sending one text after the other: once the load is steady every call holds
    all eight, instead of one half waiting in the queue while the other half is in the engine."""
    engine = SlowEngine()
    b = Batcher(engine, max_tokens=100_000, max_texts=256, max_wait=0.0)
    b.start()
    start = threading.Barrier(8)

    def caller(i: int) -> None:
        start.wait()
        for round_ in range(5):
            b.embed([f"caller {i} round {round_}"])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        b.stop(timeout=10)
    sizes = [len(call) for call in engine.calls]
    # 40 texts: a first call of those that came first, full calls, and the rest of the first ones.
    assert len(sizes) <= 6 and sizes.count(8) >= 3, sizes


def test_a_call_is_sorted_by_length(batcher: Batcher, engine: ObservedEngine) -> None:
    texts = ["x" * n for n in (50, 12, 20, 1, 30)]  # 14, 5, 7, 2 and 9 estimated tokens
    job = batcher.embed(texts)
    assert engine.calls == [sorted(texts, key=len)]
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(job.vector(i), hash_vector(text, 16))


def test_the_token_budget_splits_calls(engine: ObservedEngine) -> None:
    b = Batcher(engine, max_tokens=60, max_texts=1000, max_wait=0.0)
    b.start()
    try:
        job = b.embed([f"{i}" + "y" * 99 for i in range(10)])  # ~27 estimated tokens each
    finally:
        b.stop(timeout=10)
    assert not job.errors
    assert all(len(call) <= 2 for call in engine.calls) and len(engine.calls) >= 5


def test_a_poison_text_fails_alone(batcher: Batcher, engine: ObservedEngine) -> None:
    texts = [f"mate {i}" for i in range(15)] + ["POISON pill"]
    job = batcher.embed(texts)
    assert list(job.errors) == [15] and "chokes on POISON" in job.errors[15]
    for i, text in enumerate(texts[:15]):
        np.testing.assert_array_equal(job.vector(i), hash_vector(text, 16))
    assert job.vector(15) is None


def test_stop_finishes_what_is_queued(engine: ObservedEngine) -> None:
    b = Batcher(engine, max_tokens=10, max_texts=1, max_wait=0.0)
    b.start()
    jobs = run_concurrently(b, [[f"t{i}"] for i in range(8)])
    b.stop(timeout=10)
    assert all(job.done.is_set() and not job.errors for job in jobs)


class FragileEngine(ObservedEngine):
    """Runs out of memory above ``limit`` texts per call; dies on texts containing ``DEAD``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if any("DEAD" in t for t in texts):
            raise EngineDead("scheduler process exited")
        if len(texts) > self.limit:
            self.calls.append(list(texts))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().encode(texts)


def test_out_of_memory_splits_the_call_until_it_fits() -> None:
    engine = FragileEngine(limit=5)
    b = Batcher(engine, max_tokens=100_000, max_texts=256, max_wait=0.0)
    b.start()
    try:
        texts = [f"text {i}" for i in range(40)]
        job = b.embed(texts)
    finally:
        b.stop(timeout=10)
    assert not job.errors
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(job.vector(i), hash_vector(text, 16))
    assert max(len(c) for c in engine.calls if len(c) <= 5) <= 5


def test_a_dead_engine_aborts_waiting_tasks_and_tells_the_worker() -> None:
    deaths: list[str] = []
    b = Batcher(FragileEngine(limit=100), max_tokens=100_000, max_texts=256, max_wait=0.0, on_dead=deaths.append)
    b.start()
    try:
        with pytest.raises(BatcherStopped, match="scheduler process exited"):
            b.embed(["fine", "DEAD"])
        with pytest.raises(BatcherStopped):
            b.embed(["after death"])
    finally:
        b.stop(timeout=10)
    assert deaths == ["scheduler process exited"]


def test_refused_items_fail_alone_without_bisection() -> None:
    class Refusing(ObservedEngine):
        def encode(self, texts: list[str]) -> np.ndarray:
            too_long = {i: "text is too long" for i, t in enumerate(texts) if len(t) > 10}
            if too_long:
                self.calls.append(list(texts))
                raise EngineItemErrors(too_long)
            return super().encode(texts)

    engine = Refusing()
    b = Batcher(engine, max_tokens=100_000, max_texts=256, max_wait=0.0)
    b.start()
    try:
        job = b.embed(["short", "x" * 50, "tiny"])
    finally:
        b.stop(timeout=10)
    assert job.errors == {1: "text is too long"}
    assert len(engine.calls) == 2  # the refused call, then the rest in one call


def test_concurrent_runners_never_make_an_empty_call() -> None:
    engine = ObservedEngine()
    engine.concurrent_calls = 2
    b = Batcher(engine, max_tokens=100_000, max_texts=8, max_wait=0.05)
    b.start()
    try:
        jobs = run_concurrently(b, [[f"runner {i}", f"mate {i}"] for i in range(40)])
    finally:
        b.stop(timeout=10)
    assert all(job.done.is_set() and not job.errors for job in jobs)
    assert all(engine.calls) and sum(len(c) for c in engine.calls) == 80


def test_a_lone_text_runs_with_no_other_call_beside_it() -> None:
    class Overlap(ObservedEngine):
        def __init__(self) -> None:
            super().__init__()
            self.concurrent_calls = 2
            self.running = 0
            self.suspects = 0
            self.overlapped: list[str] = []
            self.lock = threading.Lock()

        def encode(self, texts: list[str]) -> np.ndarray:
            suspect = any(t.startswith("suspect") for t in texts)
            with self.lock:
                self.running += 1
                self.suspects += suspect
                if self.running > 1 and self.suspects:
                    self.overlapped.extend(texts)
            try:
                time.sleep(0.01)
                return super().encode(texts)
            finally:
                with self.lock:
                    self.running -= 1
                    self.suspects -= suspect

    engine = Overlap()
    b = Batcher(engine, max_tokens=100_000, max_texts=4, max_wait=0.0)
    b.start()
    try:
        threads = [threading.Thread(target=b.embed, args=([f"plain {i}", f"other {i}"],)) for i in range(20)]
        suspects = [threading.Thread(target=b.embed, args=([f"suspect {i}"], True)) for i in range(5)]
        for t in threads + suspects:
            t.start()
        for t in threads + suspects:
            t.join()
    finally:
        b.stop(timeout=10)
    assert not engine.overlapped
    assert all(len(call) == 1 for call in engine.calls if call[0].startswith("suspect"))


class PaddedEngine(ObservedEngine):
    """The hash engine budgeted as a padded one: a pass costs its longest text times its texts."""

    pads = True


def test_passes_group_texts_of_one_length_across_every_task_held() -> None:
    """Eight tasks of mixed lengths, in arrival order, come out as passes of near-equal lengths:
    padded tokens stay within 10% of real ones, where arrival order would double them."""
    engine = PaddedEngine()
    b = Batcher(engine, max_tokens=400, max_texts=64, max_wait=0.5)
    rng = np.random.default_rng(7)
    groups = [[f"{task} {i} " + "w" * int(rng.integers(4, 400)) for i in range(100)] for task in range(8)]
    b.start()
    try:
        jobs = run_concurrently(b, groups)
    finally:
        b.stop(timeout=10)
    for group, job in zip(groups, jobs, strict=True):
        assert not job.errors
        np.testing.assert_array_equal(job.matrix, np.stack([hash_vector(t, 16) for t in group]))
    assert b.padded_done <= 1.1 * b.tokens_done, (b.padded_done, b.tokens_done)
    tasks_per_pass = [len({t.split()[0] for t in call}) for call in engine.calls]
    assert max(tasks_per_pass) > 1  # passes mix tasks
    arrival = [group[i : i + 8] for group in groups for i in range(0, 100, 8)]
    waste = sum(max(map(len, p)) * len(p) for p in arrival) / sum(len(t) for p in arrival for t in p)
    assert waste > 1.5  # what passes in arrival order would have cost


def test_a_text_two_tasks_carry_is_computed_once() -> None:
    """Two tasks with the same 120 texts (a task sent again, a retry's) and 30 of their own, queued while
    the engine is busy: each text goes to the engine once, and both tasks get every vector."""
    engine = GatedEngine()
    b = Batcher(engine, max_tokens=100_000, max_texts=50, max_wait=0.0)
    b.start()
    shared = [f"shared {i}" for i in range(120)]
    groups = [shared + [f"first only {i}" for i in range(30)], [f"second only {i}" for i in range(30)] + shared]
    jobs: list = [None, None]
    threads = [threading.Thread(target=lambda: b.embed(["blocker"]))]
    threads += [threading.Thread(target=lambda i=i: jobs.__setitem__(i, b.embed(groups[i]))) for i in range(2)]
    try:
        threads[0].start()
        wait_until(lambda: len(engine.calls) == 1, 10, "the engine to be busy")
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: b._queued_texts == 300, 10, "both tasks to wait")
        engine.gate.set()
        for thread in threads:
            thread.join(30)
    finally:
        engine.gate.set()
        b.stop(timeout=10)
    computed = [text for call in engine.calls[1:] for text in call]
    assert sorted(computed) == sorted(set(shared) | set(groups[0][120:]) | set(groups[1][:30]))
    for job, texts in zip(jobs, groups, strict=True):
        assert job.ok.all()
        np.testing.assert_array_equal(job.matrix, np.stack([hash_vector(t, 16) for t in texts]))
    assert b.twins_filled == 120


def test_bulk_passes_serve_each_producer_in_turn() -> None:
    """One producer's 2,000 bulk texts wait; another's 100 arrive later: they go within a few passes
    (``FAIR_LAG_PASSES``), not after the whole backlog, and the first producer keeps its share meanwhile."""
    engine = GatedEngine()
    b = Batcher(engine, max_tokens=1_000_000, max_texts=50, max_wait=0.0)
    b.start()
    big = [f"backfill {i}" for i in range(2000)]
    small = [f"small job {i}" for i in range(100)]
    jobs: dict[str, object] = {}
    try:
        first = threading.Thread(target=lambda: jobs.setdefault("big", b.embed(big, lane=BULK, owner="a")))
        first.start()
        wait_until(lambda: len(engine.calls) == 1, 10, "the first pass")
        second = threading.Thread(target=lambda: jobs.setdefault("small", b.embed(small, lane=BULK, owner="b")))
        second.start()
        wait_until(lambda: b._queued_texts >= 1950 + 100, 10, "the small job to wait")
        engine.gate.set()
        first.join(30)
        second.join(30)
    finally:
        engine.gate.set()
        b.stop(timeout=10)
    last_small = max(i for i, call in enumerate(engine.calls) if any(t.startswith("small") for t in call))
    assert last_small <= 8, f"the small job's last text went in pass {last_small} of {len(engine.calls)}"
    backfill = sum(any(t.startswith("backfill") for t in call) for call in engine.calls[1 : last_small + 1])
    assert backfill >= last_small / 2, "the backfill keeps its share of the passes meanwhile"
    assert sum(len(call) for call in engine.calls) == 2100


class TimedPaddedEngine(HashEngine):
    """The hash engine as a padded one (MiniLM's kind): each pass takes time in proportion to its longest
    text times its texts; every pass is recorded with its texts' token counts."""

    pads = True

    def __init__(self) -> None:
        super().__init__("hash/test", dim=16)
        self.passes: list[tuple[int, int]] = []  # (bulk texts, padded tokens)

    def encode(self, texts: list[str]) -> np.ndarray:
        sizes = [len(t) // 4 + 2 for t in texts]
        padded = max(sizes) * len(sizes)
        self.passes.append((sum(t.startswith("bulk") for t in texts), padded))
        time.sleep(padded * 1e-5)
        return super().encode(texts)


def test_bulk_keeps_half_of_a_padded_engine_under_any_query_load() -> None:
    """256 bulk texts of ~200 tokens while 12 threads send 4-text queries: on a padded engine 32 short
    queries and one long text cost more than a pass, yet bulk keeps at least half of the engine's time."""
    engine = TimedPaddedEngine()
    b = Batcher(engine, max_tokens=2048, max_texts=64, max_wait=0.0)
    b.start()
    stop = threading.Event()
    answered = [0]

    def ask(thread: int) -> None:
        i = 0
        while not stop.is_set():
            job = b.embed([f"query {thread} {i} {k}" for k in range(4)])
            assert job.ok.all()
            answered[0] += 1
            i += 1

    askers = [threading.Thread(target=ask, args=(t,), daemon=True) for t in range(12)]
    try:
        for thread in askers:
            thread.start()
        wait_until(lambda: answered[0] >= 24, 30, "queries to flow")
        bulk = b.embed([f"bulk {i} " + "x" * 800 for i in range(256)], lane=BULK)
        assert bulk.ok.all()
    finally:
        stop.set()
        for thread in askers:
            thread.join(30)
        b.stop(timeout=30)
    last_bulk = max(i for i, (bulk_texts, _) in enumerate(engine.passes) if bulk_texts)
    first_bulk = min(i for i, (bulk_texts, _) in enumerate(engine.passes) if bulk_texts)
    during = engine.passes[first_bulk : last_bulk + 1]
    bulk_time = sum(padded for bulk_texts, padded in during if bulk_texts)
    assert bulk_time >= 0.5 * sum(padded for _, padded in during), during
    assert answered[0] > 24, "queries were answered meanwhile"
