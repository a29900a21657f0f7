"""What an operator reads: ``embq status`` with embq's own hit rate, and the metrics port each worker serves."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from embq.producer import EmbeddingClient
from embq.worker.local import LocalWorker
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
