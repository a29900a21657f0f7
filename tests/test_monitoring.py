"""What operators watch: worker and producer metrics, and Flower driven in a real browser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from embq.producer import EmbeddingClient, ItemFailedError
from embq.worker.local import LocalWorker, stop_process, wait_until
from tests.conftest import HASH_MODEL

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_a_worker_serves_its_metrics(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient]
) -> None:
    port = free_port()
    start_worker("hash/metrics", env={"EMBQ_METRICS_PORT": str(port), "EMBQ_MAX_TEXT_BYTES": "100"})
    client = make_client(model="hash/metrics")
    client.embed([f"counted {i}" for i in range(20)], timeout=30)
    with pytest.raises(ItemFailedError):
        client.embed(["counted 0", "y" * 200], timeout=30)  # one cached, one the worker refuses
    m = scrape(port)
    assert m[("embq_texts_embedded_total", ())] == 20
    assert m[("embq_cache_writes_total", ())] == 20
    assert m[("embq_tokens_embedded_total", ())] > 20
    assert m[("embq_errors_total", (("kind", "item"),))] == 1
    assert m[("embq_errors_total", (("kind", "engine_dead"),))] == 0
    assert m[("embq_engine_batch_texts_sum", ())] == 20
    assert m[("embq_engine_batch_texts_count", ())] >= 1
    assert m[("embq_engine_seconds_count", ())] == m[("embq_engine_batch_texts_count", ())]
    assert m[("embq_queue_wait_seconds_count", ())] == 2  # one per task
    assert m[("embq_engine_loaded", ())] == 1
    assert m[("embq_worker_ready", ())] == 1
    assert m[("embq_worker_info", (("engine", "hash"), ("model", "hash/metrics")))] == 1


def client_count(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


def test_the_producer_counts_hits_misses_and_waits(
    hash_worker: LocalWorker, make_client: Callable[..., EmbeddingClient]
) -> None:
    names = ("embq_client_cache_hits_total", "embq_client_cache_misses_total", "embq_client_texts_sent_total")
    before = {name: client_count(name, HASH_MODEL) for name in names}
    client = make_client()
    texts = [f"producer count {i}" for i in range(10)]
    client.embed(texts + texts[:3], timeout=30)  # repeats inside a call count once
    client.embed(texts, timeout=30)
    gained = {name: client_count(name, HASH_MODEL) - before[name] for name in names}
    assert gained == {
        "embq_client_cache_hits_total": 10,
        "embq_client_cache_misses_total": 10,
        "embq_client_texts_sent_total": 10,
    }
    assert (REGISTRY.get_sample_value("embq_client_wait_seconds_count", {"model": HASH_MODEL}) or 0) >= 1


@pytest.fixture
def flower(redis_url: str) -> Iterator[tuple[int, Path]]:
    port = free_port()
    log = ARTIFACTS / "flower.log"
    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "EMBQ_REDIS_URL": redis_url, "EMBQ_MODEL": HASH_MODEL, "FLOWER_BASIC_AUTH": "ops:s3cret"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "embq", "flower", "--port", str(port), "--address", "127.0.0.1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: status(f"http://127.0.0.1:{port}/healthcheck") == 200, 60, "Flower to answer")
            yield port, log
        finally:
            stop_process(process, grace=10)


def status(url: str) -> int | None:
    try:
        return int(urllib.request.urlopen(url, timeout=2).status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def chromium(*args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Flower's dashboard is checked in Chromium: install Debian's chromium package"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_flower_shows_the_worker_and_its_succeeded_tasks(
    hash_worker: LocalWorker, make_client: Callable[..., EmbeddingClient], flower: tuple[int, Path]
) -> None:
    port, _ = flower
    base = f"http://127.0.0.1:{port}"
    assert status(f"{base}/api/workers") == 401  # the API needs the credentials
    assert status(f"{base}/metrics") == 200  # Prometheus scrapes Flower without them
    signed = f"http://ops:s3cret@127.0.0.1:{port}"
    client = make_client()
    batches = iter(range(100))

    def listed() -> bool:
        # Flower sees only the events sent after its receiver connected: keep sending work.
        client.embed([f"flower {next(batches)} {i}" for i in range(5)], timeout=30)
        return chromium("--dump-dom", f"{signed}/tasks").count(">SUCCESS<") >= 4

    wait_until(listed, 90, "succeeded tasks in Flower's dashboard", interval=0.5)
    assert "embq-hash@" in chromium("--dump-dom", f"{signed}/workers")
    screenshot = ARTIFACTS / "flower-tasks.png"
    chromium("--window-size=1400,900", f"--screenshot={screenshot}", f"{signed}/tasks")
    assert screenshot.stat().st_size > 10_000
