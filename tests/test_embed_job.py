"""``embq embed`` as a job: fail before working, resume after SIGKILL, flat memory, stop at once on signals.

Real processes throughout: the embed command, its private Redis and worker (or
the session's Redis and a worker), signals sent to the command's PID.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from embq.producer import EmbeddingClient, keys
from embq.worker.local import LocalRedis, LocalWorker, wait_until
from tests.conftest import HASH_MODEL, alive
from tests.files_support import ROOT, clean_env, embq, read_output, write_input

Client = Callable[..., EmbeddingClient]
Start = Callable[..., LocalWorker]

#: Seconds an interrupted run may take to stop everything (what a user may wait, with a margin to spare).
STOP_WITHIN = 5.0
STARTED = re.compile(r"started (?:redis-server|worker) pid=(\d+)")


class Embed:
    """``embq embed`` running in the background; its stderr goes to a file the test reads."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str], name: str = "embed") -> None:
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "embq", "embed", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        return [int(p) for p in STARTED.findall(self.text())]

    def rows_done(self) -> int:
        found = re.findall(r"(\d+)/\d+ rows \[", self.text())  # the progress lines off a terminal
        return int(found[-1]) if found else 0

    def signal(self, signum: int) -> tuple[int, float]:
        """Send ``signum``; the exit status and the seconds until the process was gone."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(60)
        finally:
            self.stop()
        return code, time.monotonic() - sent

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def private_env(home: Path, tmp: Path | None = None) -> dict[str, str]:
    """Embedded defaults (no Redis configured), with the home and temporary directories under the test's."""
    return clean_env(EMBQ_HOME=str(home), **({"TMPDIR": str(tmp)} if tmp else {}))


def jsonl_rows(path: Path, count: int, unique: int, prefix: str = "text") -> list[str]:
    """``count`` records with ids, whose texts repeat every ``unique`` rows; returns the texts."""
    texts = [f"{prefix} {i % unique} of the job" for i in range(count)]
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    return texts


def stats_texts(client: redis.Redis, model: str) -> int:
    return int(client.hget(keys.stats_key(model), "texts") or 0)


def assert_nothing_left(job: Embed, home: Path, engine: str, tmp: Path) -> None:
    assert "Traceback" not in job.text(), job.text()
    assert job.pids() and not any(alive(pid) for pid in job.pids())
    assert not (home / engine / "run").exists()  # the worker's ready file and log
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("embq-")]


# -- fail before working ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["missing.txt"], "missing.txt: no such file"),
        (["."], "is a directory"),
        (["in.txt", "-o", "nowhere/out.npy"], "nowhere: no such directory"),
        (["in.txt", "-o", "in.txt/out.npy"], "no such directory"),
        (["in.txt", "-o", "/proc/out.npy"], "cannot write /proc/out.npy"),
        (["in.txt", "-o", "out.csv"], "unknown output format '.csv'"),
        (["in.txt", "-o", "out"], "unknown output format '(no suffix)'"),
        (["in.txt", "--field", "body"], "a text input is one text per line"),
        (["in.jsonl", "--field", "body"], "no field 'body' in the first record (it has 'id', 'text')"),
        (["in.jsonl", "--id-field", "key", "-o", "o.parquet"], "no field 'key'"),
        (["in.csv", "--field", "body"], "no column 'body' (columns: 'id', 'text')"),
        (["in.parquet", "--id-field", "key", "-o", "o.parquet"], "no column 'key'"),
        (["in.parquet", "--field", "id"], "column 'id' holds int64, not text"),
        (["in.jsonl", "--id-field", "id"], "a .npy holds only vectors"),
        (["in.jsonl", "-o", "in.jsonl"], "is also the input"),
        (["-"], "name the output with -o"),
        (["-", "--input-format", "parquet", "-o", "o.jsonl"], "Parquet cannot be read from standard input"),
        (["batch.jsonl", "-o", "o.parquet"], "answered with OpenAI Batch output lines; name a .jsonl output"),
        (["batch.jsonl", "--field", "body"], "is an OpenAI Batch file"),
        (["in.txt", "--input-format", "csv", "--field", "nope"], "no column 'nope'"),
        (["program.dat"], "program.dat is not a text file: a NUL byte at offset 4"),
        (["utf16.txt"], "(UTF-16 text? convert it to UTF-8)"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_anything_starts(tmp_path: Path, args: list[str], says: str) -> None:
    for suffix in (".txt", ".jsonl", ".csv", ".parquet"):
        write_input(tmp_path / f"in{suffix}", ["one", "two"], ids=None if suffix == ".txt" else [1, 2])
    request = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    (tmp_path / "batch.jsonl").write_text(json.dumps(request) + "\n")
    (tmp_path / "program.dat").write_bytes(b"\x7fELF\x00\x01\x02 junk\nmore\n")
    (tmp_path / "utf16.txt").write_text("one\ntwo\n", encoding="utf-16")
    home = tmp_path / "home"
    done = subprocess.run(
        [sys.executable, "-m", "embq", "embed", *args],
        env={**private_env(home), "PYTHONPATH": str(ROOT)},  # run from tmp_path, with this checkout's code
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        input="",
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not home.exists()  # no private Redis, no worker, no model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary output


def test_an_empty_input_writes_an_empty_output_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = private_env(home)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    (tmp_path / "header.csv").write_text("id,text\n")
    t = str(tmp_path)
    cases = [
        [f"{t}/empty.txt", "-o", f"{t}/a.npy"],
        [f"{t}/empty.txt", "-o", f"{t}/b.npy", "--dim", "64"],
        [f"{t}/empty.jsonl", "-o", f"{t}/c.parquet", "--id-field", "id", "--dim", "64"],
        [f"{t}/header.csv", "-o", f"{t}/d.jsonl"],
    ]
    for args in cases:
        done = embq("embed", *args, env=env)
        assert done.returncode == 0, done.stderr
        assert "with no rows" in done.stderr
    assert np.load(tmp_path / "a.npy").shape == (0, 0)
    assert np.load(tmp_path / "b.npy").shape == (0, 64)
    schema = pq.read_schema(tmp_path / "c.parquet")
    assert schema.names == ["id", "embedding", "error"] and str(schema.field("embedding").type).endswith("[64]")
    assert (tmp_path / "d.jsonl").read_text() == ""
    for output, options in (("e.parquet", []), ("f.jsonl", ["--input-format", "csv"])):
        piped = embq("embed", "-", "-o", str(tmp_path / output), *options, env=env, stdin=b"")
        assert piped.returncode == 0, piped.stderr
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    assert (tmp_path / "f.jsonl").read_text() == ""
    assert not home.exists()


# -- resume --------------------------------------------------------------------------------------------


def test_a_killed_run_resumes_and_recomputes_nothing_it_finished(
    tmp_path: Path, redis_url: str, r: redis.Redis, start_worker: Start, make_client: Client
) -> None:
    model = "hash/resume"
    start_worker(model)
    source = tmp_path / "rows.jsonl"
    texts = jsonl_rows(source, 60_000, unique=40_000)
    output = tmp_path / "out.parquet"
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL=model, EMBQ_LEASE_SECONDS="5")
    args = (str(source), "-o", str(output), "--id-field", "id")

    first = Embed(tmp_path, *args, env=env, name="first")
    wait_until(lambda: stats_texts(r, model) >= 12_000 or first.process.poll() is not None, 120, "a third of the job")
    first.process.kill()
    assert first.wait() == -signal.SIGKILL
    assert not output.exists()  # only the temporary file: nothing that looks complete
    computed_before = stats_texts(r, model)
    assert 0 < computed_before < 40_000

    second = Embed(tmp_path, *args, env=env, name="second")
    assert second.wait() == 0, second.text()
    ids, vectors, _ = read_output(output, "id")
    assert ids == [f"r{i}" for i in range(len(texts))]
    np.testing.assert_array_equal(vectors, make_client(model).embed(texts))
    assert stats_texts(r, model) == 40_000  # each unique text computed once, across both runs
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the dead run's temporary went


def test_embedded_defaults_keep_the_cache_across_a_sigkill_and_clear_it(tmp_path: Path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    model = "hash/private"
    source = tmp_path / "rows.jsonl"
    jsonl_rows(source, 30_000, unique=30_000)
    output = tmp_path / "out.npy"
    env = private_env(home, tmp)
    args = (str(source), "-o", str(output), "--engine", "hash", "--model", model)

    first = Embed(tmp_path, *args, env=env, name="first")
    wait_until(lambda: first.rows_done() >= 6_000 or first.process.poll() is not None, 120, "a fifth of the job")
    first.process.kill()  # the embed process only: its Redis and worker must not outlive it
    assert first.wait() == -signal.SIGKILL
    wait_until(lambda: not any(alive(pid) for pid in first.pids()), 10, "the private Redis and worker to go")

    second = Embed(tmp_path, *args, env=env, name="second")
    assert second.wait() == 0, second.text()
    assert_nothing_left(second, home, "hash", tmp)
    data = home / "hash" / "redis"
    with LocalRedis(data_dir=data) as server:  # the same files, read by a Redis of the test's
        client = redis.Redis.from_url(server.url)
        # What the killed run finished was not computed again. The count may be a little lower: a Redis
        # killed inside a worker's pipeline keeps the vectors it had written, without their counter.
        assert stats_texts(client, model) <= 30_000
        assert sum(1 for _ in client.scan_iter(match=keys.VECTOR + "*", count=10_000)) == 30_000
        assert client.llen(keys.queue_name(model)) == 0
        client.close()
    vectors = np.load(output)
    assert vectors.shape == (30_000, 384) and not np.isnan(vectors).any()

    done = embq("cache", "clear", env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (home / "hash").iterdir()) == ["lock"]
    third = Embed(tmp_path, *args, env=env, name="third")
    assert third.wait() == 0, third.text()
    with LocalRedis(data_dir=data) as server:
        client = redis.Redis.from_url(server.url)
        assert stats_texts(client, model) == 30_000  # computed afresh: statistics went with the cache
        client.close()


def test_the_private_redis_keeps_what_it_answered_through_its_own_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    server = LocalRedis(data_dir=data).start()
    client = redis.Redis.from_url(server.url)
    client.set("embq:v:kept", b"vector", ex=3600)
    client.close()
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    server.process = None
    with LocalRedis(data_dir=data) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("embq:v:kept") == b"vector"
        client.close()


def test_cache_clear_removes_vectors_and_never_broker_keys(
    redis_url: str, r: redis.Redis, make_client: Client, hash_worker: LocalWorker
) -> None:
    make_client().embed([f"to clear {i}" for i in range(2500)])
    # Another model's: the session's worker would stop at its next heartbeat on a signature not its own.
    r.set(keys.signature_key("v1", "hash/cleared"), b"hash/384")
    r.rpush(keys.queue_name("hash/queued"), b"a queued task")
    r.hset("unacked", "tag", b"a task a worker holds")
    try:
        done = embq("cache", "clear", env=clean_env(EMBQ_REDIS_URL=redis_url))
        assert done.returncode == 0, done.stderr
        # The vectors, the fake signature, and the worker's own unless a heartbeat is yet to claim it again.
        assert re.search(r"removed 2,50[12] cache keys", done.stderr), done.stderr
        assert not list(r.scan_iter(match=keys.VECTOR + "*")) and not list(r.scan_iter(match=keys.SIGNATURE + "*"))
        assert r.llen(keys.queue_name("hash/queued")) == 1 and r.hexists("unacked", "tag")
        assert stats_texts(r, HASH_MODEL) > 0
    finally:  # the broker's own hash outlives the test's cleanup of embq's keys: leave no fake task in it
        r.hdel("unacked", "tag")


# -- memory --------------------------------------------------------------------------------------------


def peak_rss_mb(args: list[str], env: dict[str, str]) -> float:
    """Peak resident memory of one ``embq embed`` process, as the kernel counted it (ru_maxrss of a child)."""
    probe = (
        "import resource, subprocess, sys\n"
        "code = subprocess.call([sys.executable, '-m', 'embq', 'embed', *sys.argv[1:]])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


def test_memory_does_not_grow_with_the_file(tmp_path: Path, redis_url: str, hash_worker: LocalWorker) -> None:
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL=HASH_MODEL)
    peaks = {}
    for rows in (20_000, 20_000, 200_000):  # the first run fills the cache: both measured runs read it
        source = tmp_path / f"{rows}.jsonl"
        jsonl_rows(source, rows, unique=20_000, prefix="memory")
        peaks[rows] = peak_rss_mb([str(source), "-o", str(tmp_path / f"{rows}.parquet"), "--id-field", "id"], env)
        assert pq.read_metadata(tmp_path / f"{rows}.parquet").num_rows == rows
    extra_vectors_mb = (200_000 - 20_000) * 384 * 4 / 2**20
    # Ten times the rows; holding a sixth of the extra vectors (or 250 bytes an extra row) would show.
    assert peaks[200_000] - peaks[20_000] < extra_vectors_mb / 6, peaks


# -- signals ---------------------------------------------------------------------------------------------


@pytest.mark.model
def test_ctrl_c_while_the_model_loads_stops_everything(tmp_path: Path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    source = write_input(tmp_path / "in.txt", [f"line {i}" for i in range(2000)])
    output = tmp_path / "out.npy"
    job = Embed(tmp_path, str(source), "-o", str(output), env=private_env(home, tmp))
    worker_log = home / "sentence-transformers" / "run" / f"worker-{job.process.pid}" / "worker.log"

    def loading() -> bool:
        return job.process.poll() is not None or (worker_log.exists() and "loading engine" in worker_log.read_text())

    wait_until(loading, 60, "the worker to load its model")
    code, seconds = job.signal(signal.SIGINT)
    assert code == 130, job.text()
    assert seconds < STOP_WITHIN, job.text()
    before = job.text().split("SIGINT")[0]
    assert "worker ready" not in before  # it was still loading the model
    assert "SIGINT: stopping the private worker and Redis and removing the unfinished out.npy" in job.text()
    assert_nothing_left(job, home, "sentence-transformers", tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed.log", "home", "in.txt", "tmp"]


def test_ctrl_c_while_embedding_stops_everything(tmp_path: Path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    source = tmp_path / "rows.jsonl"
    jsonl_rows(source, 60_000, unique=60_000)
    output = tmp_path / "out.parquet"
    job = Embed(tmp_path, str(source), "-o", str(output), "--engine", "hash", env=private_env(home, tmp))
    wait_until(lambda: job.rows_done() > 0 or job.process.poll() is not None, 120, "the first rows")
    code, seconds = job.signal(signal.SIGINT)
    assert code == 130, job.text()
    assert seconds < STOP_WITHIN, job.text()
    assert job.rows_done() < 60_000
    assert "embq: stopped" in job.text()
    assert_nothing_left(job, home, "hash", tmp)
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_private_worker_that_cannot_start_ends_the_job_in_one_line(tmp_path: Path) -> None:
    """The worker starts beside the job (which goes on finding cached rows): its failure still ends the job."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    source = write_input(tmp_path / "in.txt", [f"never embedded {i}" for i in range(3000)])
    env = private_env(home, tmp) | {"EMBQ_HASH_DEVICE": "no-such-device"}
    job = Embed(tmp_path, str(source), "-o", str(tmp_path / "out.npy"), "--engine", "hash", env=env)
    assert job.wait(60) == 2, job.text()
    assert "worker cannot start: EMBQ_HASH_DEVICE='no-such-device'" in job.text(), job.text()
    assert_nothing_left(job, home, "hash", tmp)
    assert not (tmp_path / "out.npy").exists()


def test_ctrl_c_stops_a_producer_that_waits_for_absent_workers(tmp_path: Path, redis_url: str, r: redis.Redis) -> None:
    source = write_input(tmp_path / "in.txt", [f"nobody embeds {i}" for i in range(5000)])
    output = tmp_path / "out.jsonl"
    env = clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL="hash/nobody", EMBQ_UNKNOWN_MODEL_GRACE="0")
    job = Embed(tmp_path, str(source), "-o", str(output), env=env)
    bulk = keys.queue_name("hash/nobody", lane=keys.BULK)  # a file is bulk work
    wait_until(lambda: r.llen(bulk) > 0, 60, "tasks in the queue")
    code, seconds = job.signal(signal.SIGINT)
    assert code == 130, job.text()
    assert seconds < STOP_WITHIN, job.text()
    assert "Traceback" not in job.text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed.log", "in.txt"]


def test_a_second_run_on_the_same_home_waits_its_turn_and_sighup_stops_it(tmp_path: Path) -> None:
    """The first run reads a pipe that the test holds open, so it is still running, for sure, while the
    second one waits, is refused by ``embq cache clear`` and is stopped by SIGHUP."""
    import os

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    env = private_env(home, tmp)
    pipe = tmp_path / "rows.fifo"
    os.mkfifo(pipe)
    small = write_input(tmp_path / "small.txt", ["text 1 of the job", "text 2 of the job"])
    first = Embed(tmp_path, str(pipe), "-o", str(tmp_path / "big.npy"), "--engine", "hash", env=env, name="first")
    with open(pipe, "w", encoding="utf-8") as feed:  # opened once the first run opens its end
        feed.write("text 0 of the job\ntext 1 of the job\n")
        feed.flush()
        wait_until(lambda: "starting a private Redis" in first.text(), 60, "the first run to take the home")
        second = Embed(
            tmp_path, str(small), "-o", str(tmp_path / "small.npy"), "--engine", "hash", env=env, name="second"
        )
        pid = first.process.pid
        wait_until(lambda: f"waiting for the embq embed (pid {pid})" in second.text(), 60, "the second run to wait")
        busy = embq("cache", "clear", env=env)
        assert busy.returncode == 2 and f"an embq process (pid {pid}) is using" in busy.stderr
        code, seconds = second.signal(signal.SIGHUP)
        assert code == 128 + signal.SIGHUP, second.text()
        assert seconds < STOP_WITHIN and "Traceback" not in second.text()
        assert first.process.poll() is None  # undisturbed, still reading
        feed.write("text 2 of the job\n")
    assert first.wait() == 0, first.text()
    third = Embed(tmp_path, str(small), "-o", str(tmp_path / "small.npy"), "--engine", "hash", env=env, name="third")
    assert third.wait() == 0, third.text()
    assert "2 cached" in third.text()
    np.testing.assert_array_equal(np.load(tmp_path / "small.npy"), np.load(tmp_path / "big.npy")[[1, 2]])


# -- embedded defaults: what starts, and when -----------------------------------------------------------


def test_a_fully_cached_rerun_starts_no_worker(tmp_path: Path) -> None:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    source = write_input(tmp_path / "in.txt", [f"cached rerun {i}" for i in range(500)])
    env = private_env(home, tmp)
    first = Embed(tmp_path, str(source), "-o", str(tmp_path / "first.npy"), "--engine", "hash", env=env, name="first")
    assert first.wait() == 0, first.text()
    assert "starting a hash worker" in first.text()
    second = Embed(tmp_path, str(source), "-o", str(tmp_path / "again.npy"), "--engine", "hash", env=env, name="again")
    assert second.wait() == 0, second.text()
    assert "starting a hash worker" not in second.text() and "500 cached, 0 computed" in second.text()
    assert_nothing_left(second, home, "hash", tmp)
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(tmp_path / "first.npy"))


@pytest.mark.model
def test_the_truncation_hint_works_on_embedded_defaults(tmp_path: Path) -> None:
    """A text over the context fails by default and names ``--truncate``; with it, the run computes only
    that text: the others' vectors, cached whole, are their cut ones too (they fit the context)."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    long = " ".join(f"word{i % 10}" for i in range(400))
    source = write_input(tmp_path / "in.txt", ["short one", long, "short two"])
    output = tmp_path / "out.jsonl"
    env = private_env(home, tmp)
    first = Embed(tmp_path, str(source), "-o", str(output), env=env, name="first")
    assert first.wait() == 1, first.text()
    assert "--truncate on embq embed" in first.text()
    second = Embed(tmp_path, str(source), "-o", str(output), "--truncate", env=env, name="second")
    assert second.wait() == 0, second.text()
    assert "1 computed" in second.text() and "2 cached" in second.text()
    _, vectors, errors = read_output(output)
    assert errors == [None] * 3 and not np.isnan(vectors).any()
