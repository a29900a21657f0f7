"""The ``embq`` command as a user runs it: embedded defaults, files in and out, plain Celery."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embq.producer import EmbeddingClient
from embq.worker.cli import build_parser
from embq.worker.engines.hash import hash_vector
from embq.worker.local import wait_until
from tests.conftest import HASH_MODEL, alive
from tests.sglang_support import SGLangCpu

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample.txt"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBQ_")}
    return {**env, **extra}


def embq(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embq", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.model
def test_embed_on_embedded_defaults_matches_the_model_and_leaves_nothing_running(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from embq.producer.settings import DEFAULT_MODEL
    from embq.worker.engines.sentence_transformers import resolve_model_path

    out = tmp_path / "sample.npy"
    done = embq("embed", str(SAMPLE), "-o", str(out), env=clean_env(EMBQ_HOME=str(tmp_path / "home")))
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in re.findall(r"started (?:redis-server|worker) pid=(\d+)", done.stderr)]
    assert len(pids) == 2, done.stderr
    assert not any(alive(pid) for pid in pids)
    texts = SAMPLE.read_text(encoding="utf-8").splitlines()
    vectors = np.load(out)
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    want = SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu").encode(texts, normalize_embeddings=True)
    assert (vectors * want).sum(axis=1).min() >= 0.999


def test_embed_jsonl_with_a_running_redis_is_a_pure_producer(
    tmp_path: Path, redis_url: str, hash_worker: object
) -> None:
    records = [{"id": i, "body": f"record {i}"} for i in range(30)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL=HASH_MODEL)
    done = embq("embed", str(source), "-o", str(out), "--field", "body", "--dim", "64", env=env)
    assert done.returncode == 0, done.stderr
    assert "started" not in done.stderr
    full = np.stack([hash_vector(r["body"], 384) for r in records])
    head = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(out), head, rtol=1e-6)


def test_embed_names_the_bad_line_never_sends_it_and_embeds_the_others(
    tmp_path: Path, redis_url: str, hash_worker: object
) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(b"fine\n\xff\xfe broken utf-8\nfine too\n")
    out = tmp_path / "out.npy"
    done = embq("embed", str(source), "-o", str(out), env=clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL=HASH_MODEL))
    assert done.returncode == 1, done.stderr
    assert f"{source}:2 (row 1) failed: text is not valid UTF-8" in done.stderr
    vectors = np.load(out)
    assert np.isnan(vectors[1]).all()
    np.testing.assert_array_equal(vectors[[0, 2]], np.stack([hash_vector(t, 384) for t in ("fine", "fine too")]))


def test_plain_celery_runs_the_worker(
    tmp_path: Path, redis_url: str, make_client: Callable[..., EmbeddingClient]
) -> None:
    ready = tmp_path / "ready"
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL="hash/plain", EMBQ_ENGINE="hash", EMBQ_READY_FILE=str(ready))
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "embq.worker.celery_app", "worker", "--loglevel=INFO"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: ready.exists() or process.poll() is not None, 60, "plain Celery worker")
        assert process.poll() is None
        out = make_client(model="hash/plain").embed(["plain celery"], timeout=30)
        np.testing.assert_array_equal(out[0], hash_vector("plain celery", 384))
    finally:
        process.terminate()
        assert process.wait(30) == 0
    assert not ready.exists()


def test_a_forking_pool_is_refused(redis_url: str) -> None:
    # "prefork", Celery's CLI default, yields to the app's threads setting; "processes" names it explicitly.
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL="hash/prefork", EMBQ_ENGINE="hash")
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "embq.worker.celery_app", "worker", "--pool=processes"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "--pool threads" in done.stderr


def test_status_shows_queues_and_counters(
    redis_url: str, hash_worker: object, make_client: Callable[..., EmbeddingClient]
) -> None:
    make_client().embed([f"status {i}" for i in range(7)], timeout=30)
    done = embq("status", env=clean_env(EMBQ_REDIS_URL=redis_url))
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(HASH_MODEL))
    # model, queries and oldest query's age, bulk, workers, tasks, texts, bulk texts, failed, dropped, hit rate
    _, queries, oldest, bulk, workers, _, texts, bulk_texts, failed, dropped, hits = row.split()
    assert (queries, oldest, bulk, workers) == ("0", "-", "0", "1")
    assert (texts, bulk_texts, failed, dropped, hits) == ("7", "0", "0", "0", "0.0%")
    worker = next(line for line in done.stdout.splitlines() if f" {HASH_MODEL} " in line and "ready" in line)
    assert " hash " in worker and "not ready" not in worker
    assert "cache:" in done.stdout and "hit rate" in done.stdout


def test_the_redis_url_flags_need_no_environment(
    tmp_path: Path, redis_url: str, hash_worker: object, make_client: Callable[..., EmbeddingClient]
) -> None:
    """``--redis-url`` on every command that connects, with no EMBQ_* variable set: a worker serves, ``embq embed``
    is a pure producer on it (no private stack), ``status`` reads it, ``cache clear`` clears it."""
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-m", "embq", "worker", "--engine", "hash", "--model", "hash/flags", "--redis-url", redis_url,
         "--ready-file", str(ready), "--metrics-port", "0"],
        env=clean_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: ready.exists() or process.poll() is not None, 60, "the worker started with --redis-url")
        assert process.poll() is None
        source = tmp_path / "in.txt"
        source.write_text("flag one\nflag two\n", encoding="utf-8")
        out = tmp_path / "out.npy"
        done = embq(
            "embed", str(source), "-o", str(out), "--model", "hash/flags", "--redis-url", redis_url, env=clean_env()
        )
        assert done.returncode == 0, done.stderr
        assert "private Redis" not in done.stderr
        np.testing.assert_array_equal(np.load(out), np.stack([hash_vector(t, 384) for t in ("flag one", "flag two")]))
        status = embq("status", "--redis-url", redis_url, env=clean_env())
        assert status.returncode == 0 and "hash/flags" in status.stdout, status.stderr
        cleared = embq("cache", "clear", "--redis-url", redis_url, env=clean_env())
        assert cleared.returncode == 0 and "removed" in cleared.stderr, cleared.stderr
        wrong = embq("status", "--redis-url", "http://localhost:8000", env=clean_env())
        assert wrong.returncode == 2 and "redis_url (--redis-url)='http://localhost:8000'" in wrong.stderr
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_every_command_describes_itself_and_status_explains_its_columns() -> None:
    for command, words in {
        ("worker",): "Host one engine",
        ("embed",): "Embed a file of any size",
        ("serve",): "OpenAI-compatible HTTP gateway",
        ("status",): "One row per model",
        ("flower",): "the Celery dashboard",
        ("cache",): "Manage the vector cache",
        ("cache", "clear"): "Remove every cached vector",
    }.items():
        shown = embq(*command, "--help", env=clean_env())
        assert shown.returncode == 0 and words in shown.stdout, (command, shown.stdout)
        if command != ("cache",):
            assert "--redis-url" in shown.stdout, command
    status = embq("status", "--help", env=clean_env()).stdout
    for column in ("queries", "oldest", "bulk", "workers", "tasks", "texts", "failed", "dropped", "hit rate"):
        assert re.search(rf"^  {column} +\S", status, re.MULTILINE), column


def test_embed_writes_the_good_rows_when_some_texts_fail(
    tmp_path: Path, redis_url: str, start_worker: Callable[..., object]
) -> None:
    start_worker("hash/strict-cli", env={"EMBQ_MAX_TEXT_BYTES": "100"})
    lines = ["first", "x" * 500, "third"]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL="hash/strict-cli")
    done = embq("embed", str(source), "-o", str(out), env=env)
    assert done.returncode == 1
    assert f"{source}:2 (row 1) failed" in done.stderr
    vectors = np.load(out)
    assert np.isnan(vectors[1]).all()
    np.testing.assert_array_equal(vectors[[0, 2]], np.stack([hash_vector(t, 384) for t in ("first", "third")]))


def test_sigterm_stops_the_private_redis_and_worker(tmp_path: Path, sglang: SGLangCpu) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a text\nthe engine HANGs on this one\n", encoding="utf-8")
    log = tmp_path / "embed.log"
    home = tmp_path / "home"
    env = clean_env(
        EMBQ_HOME=str(home),
        TMPDIR=str(tmp_path),
        **sglang.env(EMBQ_TEST_SCHEDULER_HANG="HANG", EMBQ_ENGINE_CALL_TIMEOUT="60"),
    )
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [
                str(sglang.python),
                "-m",
                "embq",
                "embed",
                str(source),
                "-o",
                str(tmp_path / "o.npy"),
                "--engine",
                "sglang",
                "--model",
                str(sglang.model),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    def started() -> list[int]:
        return [int(p) for p in re.findall(r"started (?:redis-server|worker) pid=(\d+)", log.read_text())]

    try:
        wait_until(
            lambda: len(started()) == 2 and "worker ready in" in log.read_text(), 120, "the job to start embedding"
        )
        process.terminate()
        assert process.wait(5) == 128 + 15, log.read_text()  # the engine hangs: the worker is not waited for
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "SIGTERM: stopping the private worker and Redis" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert not any(alive(pid) for pid in started())
    assert sorted(p.name for p in (home / "sglang").iterdir()) == ["lock", "redis"]  # no run directory left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("embq-", ".o.npy"))]  # TMPDIR and output


def test_flower_without_its_extra_is_one_line(tmp_path: Path, redis_url: str) -> None:
    shim = tmp_path / "flower"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'flower'\")\n", encoding="utf-8")
    done = embq("flower", env=clean_env(EMBQ_REDIS_URL=redis_url, PYTHONPATH=str(tmp_path)), timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'embq[flower]'" in done.stderr and "Traceback" not in done.stderr


def test_every_command_has_a_description_and_every_option_a_help() -> None:
    """``embq X --help`` tells a newcomer what X does and what each of its flags is for."""
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        if not parser.description:
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")
            elif not action.help:
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "embq")
    assert not missing, missing
