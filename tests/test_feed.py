"""The worker's feed at GPU rates: the hash engine on a simulated device, a deep bounded backlog, near-equal
passes. Real Redis, real worker processes; assertions on behaviour (depths, token counts), never on timings."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.texts import make_texts
from embq.producer import ConfigurationError, EmbeddingClient, keys
from embq.worker.backlog import Backlog
from embq.worker.batcher import Batcher
from embq.worker.engines import estimate_tokens
from embq.worker.engines.device import Timeline, device_model
from embq.worker.engines.hash import SIMULATED_PASS_TEXTS, SIMULATED_PASS_TOKENS, HashEngine, hash_vector
from embq.worker.local import LocalWorker, free_port, wait_until
from tests.test_status import status

MODEL = "hash/simulated"
#: Texts per task of the bounded-backlog test: many small tasks, so that some must wait in the broker.
TASK_TEXTS = 64


class Tokens:
    """A task's texts as the backlog sees them: their token counts."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.texts = [f"{id(self)} {row}" for row in range(len(tokens))]  # distinct: no copies to share a vector


def drain(backlog: Backlog, take: Callable[[], list]) -> float:
    """Form passes with ``take`` until the backlog is empty; real over padded tokens of them all."""
    real = padded = 0
    while backlog.texts:
        chosen = take()
        lengths = [job.tokens[row] for job, row in chosen]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
        for job, row in chosen:
            backlog.remove(job, row)
    return real / padded


def test_a_device_model_charges_padding_and_runs_passes_in_order() -> None:
    padded = device_model("rate=1000,overhead=0.5,attention=1000")
    packed = device_model("rate=1000,overhead=0.5,attention=1000,packed=1")
    assert padded.pass_seconds([100, 300]) == pytest.approx(0.5 + 2 * 300 * 1.3 / 1000)
    assert packed.pass_seconds([100, 300]) == pytest.approx(0.5 + (100 * 1.1 + 300 * 1.3) / 1000)
    assert device_model("h200-4b-packed").packed and not device_model("h200-4b").packed
    assert device_model("instant").pass_seconds([512] * 64) == 0.0
    timeline = Timeline()
    first = timeline.submit(10.0)
    second = timeline.submit(5.0)  # queued behind the first, as on one CUDA stream
    assert second == pytest.approx(first + 5.0) and timeline.busy_seconds == 15.0
    for bad in ("h100-7b", "rate=fast", "rate=1000,speed=2"):
        with pytest.raises(ConfigurationError, match="EMBQ_HASH_DEVICE"):
            device_model(bad)


def test_the_densest_pass_takes_a_run_of_equal_lengths() -> None:
    rng = np.random.default_rng(3)
    job = Tokens([100] * 300 + rng.integers(10, 600, 50).tolist())
    backlog = Backlog()
    backlog.add(job, range(len(job.tokens)))
    chosen = backlog.densest_pass(budget=100 * 300, most=2048, overhead=512)
    assert sorted(job.tokens[row] for _, row in chosen) == [100] * 300


def test_dense_passes_pad_little_where_oldest_first_passes_do_not() -> None:
    """8,000 benchmark texts waiting, passes of a GPU worker's budget: the densest run of lengths keeps them
    near-equal; anchoring every pass on the oldest text does not."""
    job = Tokens([estimate_tokens(t) for t in make_texts(8000, seed=11)])

    def fresh() -> Backlog:
        backlog = Backlog()
        backlog.add(job, range(len(job.tokens)))
        return backlog

    dense = fresh()
    dense_share = drain(dense, lambda: dense.densest_pass(SIMULATED_PASS_TOKENS, SIMULATED_PASS_TEXTS, 1024))
    oldest = fresh()
    waiting = dict.fromkeys(range(len(job.tokens)))  # in arrival order

    def around_oldest() -> list:
        chosen = oldest.pass_around((job, next(iter(waiting))), SIMULATED_PASS_TOKENS, SIMULATED_PASS_TEXTS, True)
        for _, row in chosen:
            del waiting[row]
        return chosen

    oldest_share = drain(oldest, around_oldest)
    assert dense_share >= 0.9 > oldest_share, (dense_share, oldest_share)


def scrape(port: int) -> dict[tuple[str, str], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, s.labels.get("lane", "")): s.value for f in text_string_to_metric_families(body) for s in f.samples
    }


class Sampler:
    """The worker's metrics (and the bulk queue's length) every 100 ms while a block runs."""

    def __init__(self, port: int, r: redis.Redis) -> None:
        self.port, self.r = port, r
        self.samples: list[tuple[dict[tuple[str, str], float], int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            queued = self.r.llen(keys.queue_name(MODEL, lane=keys.BULK))
            self.samples.append((scrape(self.port), queued))


def producers(make_client: Callable[..., EmbeddingClient], texts: list[str], count: int = 4) -> np.ndarray:
    """``texts`` embedded by ``count`` clients at once, each its share; rows back in order."""
    out = np.empty((len(texts), 384), dtype=np.float32)

    def run(i: int) -> None:
        out[i::count] = make_client(MODEL).embed(texts[i::count], timeout=300)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def test_a_worker_on_a_simulated_gpu_holds_a_deep_backlog_and_forms_near_equal_passes(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], r: redis.Redis
) -> None:
    port = free_port()
    start_worker(MODEL, env={"EMBQ_HASH_DEVICE": "rate=150000,overhead=0.002", "EMBQ_METRICS_PORT": str(port)})
    texts = make_texts(12000, seed=12)  # enough that the backlog forms even when a loaded machine sends slowly
    before = scrape(port)
    with Sampler(port, r) as sampler:
        vectors = producers(make_client, texts)
    after = scrape(port)
    for row in range(0, len(texts), 97):
        np.testing.assert_array_equal(vectors[row], hash_vector(texts[row], 384))
    deepest = max(metrics.get(("embq_backlog_tokens", keys.BULK), 0) for metrics, _ in sampler.samples)
    assert deepest >= 8 * SIMULATED_PASS_TOKENS, "many passes' worth waiting, not one or two"

    def grew(name: str) -> float:
        return after[(name, "")] - before.get((name, ""), 0.0)

    real, padded = grew("embq_pass_tokens_total"), grew("embq_pass_padded_tokens_total")
    assert real >= sum(estimate_tokens(t) for t in texts) and real / padded >= 0.85, (real, padded)
    assert grew("embq_device_seconds_total") > 0


def test_the_backlog_is_bounded_in_seconds_of_the_engines_work(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], r: redis.Redis
) -> None:
    """Half a second of work at most: the rest of the job stays in the broker, for other workers to take."""
    port = free_port()
    env = {
        "EMBQ_HASH_DEVICE": "rate=60000,overhead=0.002",
        "EMBQ_METRICS_PORT": str(port),
        "EMBQ_BACKLOG_SECONDS": "0.5",
    }
    start_worker(MODEL, env=env)
    texts = make_texts(3000, seed=13)
    with Sampler(port, r) as sampler:
        # Many small tasks: the gate closes after a few, before a loaded machine could have fetched them all.
        vectors = make_client(MODEL, task_max_texts=TASK_TEXTS).embed(texts, timeout=300)
    np.testing.assert_array_equal(vectors[-1], hash_vector(texts[-1], 384))
    working = [(m, queued) for m, queued in sampler.samples if m[("embq_engine_busy_seconds_total", "")] > 0]
    targets = {m[("embq_backlog_target_tokens", "")] for m, _ in working}
    assert SIMULATED_PASS_TOKENS in targets, "half a second of this device is less than a pass: one pass"
    assert any(queued > 0 for _, queued in working), "tasks waited in the broker while the worker had enough"
    # Once the texts taken before the rate was known are down to the target, the backlog stays near it: past it
    # by at most the tasks taken just before it was reached (a few of TASK_TEXTS texts).
    held = [(m[("embq_backlog_tokens", keys.BULK)], m[("embq_backlog_target_tokens", "")]) for m, _ in working]
    steady = held[next(i for i, (tokens, target) in enumerate(held) if tokens <= target) :]
    task_tokens = TASK_TEXTS * sum(estimate_tokens(t) for t in texts) / len(texts)
    assert max(tokens - target for tokens, target in steady) <= 8 * task_tokens, (steady, task_tokens)


class MemoryBoundEngine(HashEngine):
    """The hash engine on a simulated device with room for 4,000 tokens a pass, recording each pass's size."""

    def __init__(self) -> None:
        super().__init__(MODEL, dim=16, simulated_device="rate=1000000000,overhead=0,memory=4000")
        self.passes: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.passes.append(sum(estimate_tokens(t) for t in texts))
        return super().encode(texts)


def test_out_of_memory_lowers_the_pass_budget_so_later_passes_fit() -> None:
    engine = MemoryBoundEngine()
    batcher = Batcher(engine, max_tokens=65536, max_texts=2048, max_wait=0.01)
    batcher.start()
    try:
        texts = make_texts(400, seed=15, max_words=60)
        job = batcher.embed(texts)  # its first pass fails, and splits until the parts fit
        first = len(engine.passes)
        again = batcher.embed(make_texts(400, seed=16, max_words=60))
    finally:
        batcher.stop(timeout=10)
    assert job.ok.all() and again.ok.all() and not job.errors
    np.testing.assert_array_equal(job.matrix[7], hash_vector(texts[7], 16))
    assert any(size > 4000 for size in engine.passes[:first])
    assert batcher.max_tokens <= 4000 and "out of memory" in batcher.lowered
    assert all(size <= 4000 for size in engine.passes[first:]), engine.passes  # the next job's passes all fit


def test_a_worker_out_of_memory_says_so_in_its_metrics_and_status(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], redis_url: str
) -> None:
    port = free_port()
    env = {"EMBQ_HASH_DEVICE": "rate=100000000,overhead=0,memory=20000", "EMBQ_METRICS_PORT": str(port)}
    start_worker(MODEL, env=env)
    texts = make_texts(2000, seed=17)
    vectors = make_client(MODEL).embed(texts, timeout=120)
    for row in range(0, len(texts), 101):
        np.testing.assert_array_equal(vectors[row], hash_vector(texts[row], 384))
    assert scrape(port)[("embq_pass_budget_tokens", "")] <= 20000

    def shown() -> bool:
        return "after out of memory" in status(redis_url)

    wait_until(shown, 30, "embq status to show the lowered pass budget")
