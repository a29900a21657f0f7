"""What an operator reads: ``embq status`` with embq's own hit rate, and the metrics port each worker serves."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from embq.producer import EmbeddingClient, Settings, keys
from embq.worker.local import LocalWorker
from embq.worker.status import render_status
from tests.test_monitoring import scrape

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(redis_url: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "embq", "status"],
        env={**os.environ, "EMBQ_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_workers_on_one_host_serve_metrics_on_two_ports_and_status_shows_both(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], redis_url: str
) -> None:
    port = free_port()
    first = start_worker("hash/ports", env={"EMBQ_METRICS_PORT": str(port)})
    second = start_worker("hash/ports", env={"EMBQ_METRICS_PORT": str(port)})
    log = second.log_path.read_text()
    assert "ERROR" not in log
    [warning] = [line for line in log.splitlines() if "WARNING" in line and "metrics port" in line]
    served = int(re.search(r"serving /metrics on :(\d+)", warning).group(1))  # type: ignore[union-attr]
    assert served != port and f"metrics port {port} is taken" in warning and "EMBQ_METRICS_PORT" in warning
    assert f"metrics on :{port}/metrics" in first.log_path.read_text()
    for each in (port, served):
        assert scrape(each)[("embq_worker_info", (("engine", "hash"), ("model", "hash/ports")))] == 1
    shown = status(redis_url)
    assert f"metrics :{port}" in shown and f"metrics :{served}" in shown


def test_status_shows_embqs_own_hit_rate_per_model(
    hash_worker: LocalWorker, make_client: Callable[..., EmbeddingClient], redis_url: str
) -> None:
    client = make_client(model="hash/test")
    texts = [f"hit rate {i}" for i in range(10)]
    client.embed(texts, timeout=30)  # 10 misses
    client.embed(texts + [f"hit rate more {i}" for i in range(10)], timeout=30)  # 10 hits, 10 misses
    shown = status(redis_url)
    row = next(line for line in shown.splitlines() if line.startswith("hash/test "))
    assert row.split()[-1] == "33.3%"
    assert "Redis keyspace hit rate" in shown and "not only vectors" in shown
    assert re.search(r"now: [\d.,]+ texts/s, [\d,]+ tokens/s, engine busy \d+%", shown), shown


def counts(shown: str, model: str) -> tuple[int, list[int]]:
    """The model row's texts and each of its worker rows' texts, from one screen of ``embq status``."""
    row = next(line for line in shown.splitlines() if line.startswith(model + " "))
    workers = [int(m.group(1)) for m in re.finditer(rf" {re.escape(model)} .* (\d+) texts  up", shown)]
    return int(row.split()[6]), workers


def test_the_model_row_counts_what_the_worker_rows_count_during_work(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient], redis_url: str
) -> None:
    """The model's texts are its workers' texts plus those of workers gone, at every moment of a job."""
    model = "hash/counts"
    settings = Settings(redis_url=redis_url, model=model)
    gone = start_worker(model)
    make_client(model).embed([f"counted before {i}" for i in range(300)], timeout=60)
    gone.stop()
    start_worker(model, env={"EMBQ_HASH_DEVICE": "rate=20000,overhead=0.002"})  # slow enough to look at mid-job
    texts = [f"counted during {i} " + "word " * (i % 40) for i in range(3000)]
    job = threading.Thread(target=make_client(model, task_max_texts=128).embed, args=(texts,), kwargs={"timeout": 300})
    job.start()
    seen: list[tuple[int, list[int]]] = []
    while job.is_alive():
        seen.append(counts(render_status(settings), model))
        time.sleep(0.2)
    job.join()
    seen.append(counts(render_status(settings), model))
    for model_texts, worker_texts in seen:
        assert model_texts == 300 + sum(worker_texts), seen
    assert any(0 < sum(w) < len(texts) for _, w in seen), f"no look caught the job half done: {seen}"
    assert seen[-1] == (300 + len(texts), [len(texts)])


def test_a_workers_row_shows_its_rate_and_the_texts_it_holds(r: redis.Redis, redis_url: str) -> None:
    """What a heartbeat says (here one written by hand, as a worker mid-job writes it) is what the screen says."""
    beat = {"model": "hash/held", "namespace": "v1", "engine": "hash", "ready": "1", "started": f"{time.time():.0f}"}
    beat |= {"stored": "1200", "texts": "5000", "texts_per_s": "812.5", "tokens_per_s": "40000", "busy": "0.97"}
    key = keys.worker_key("host-a:41")
    r.hset(key, mapping=beat | {"waiting": "3800"})
    r.expire(key, 30)
    try:
        shown = render_status(Settings(redis_url=redis_url, model="hash/held"))
    finally:
        r.delete(key)
    assert re.search(r"host-a:41 +hash/held +hash +ready +1200 texts", shown), shown
    assert "now: 812.5 texts/s, 40,000 tokens/s, engine busy 97%, 3,800 texts waiting for a pass" in shown, shown
