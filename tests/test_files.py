"""Every input and output format of ``embq embed``, ids, order, BOMs, OpenAI Batch files: a running worker."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embq.producer import EmbeddingClient
from embq.producer.files import embed_file
from embq.worker import progress as progress_module
from embq.worker.progress import Progress
from tests.conftest import HASH_MODEL
from tests.files_support import clean_env, embq, read_output, write_input

pytestmark = pytest.mark.usefixtures("hash_worker")

Client = Callable[..., EmbeddingClient]

#: Nothing is stripped: spaces, tabs, a lone carriage return and the empty text are texts of their own.
TRICKY = ["first", "  padded  ", "tab\tinside", "ünïcödé 中文 🚀", "", 'comma, and "quotes"', "trailing space ", "a\rb"]
#: More rows than two chunks of the stream, so that order across chunks counts.
TEXTS = TRICKY + [f"row {i} of the file" for i in range(4500)]
#: Formats with quoting or escapes carry line breaks inside a text too.
MULTILINE = [*TEXTS[:100], "two\nlines", "crlf\r\ninside", *TEXTS[100:]]


def env_for(redis_url: str) -> dict[str, str]:
    return clean_env(EMBQ_REDIS_URL=redis_url, EMBQ_MODEL=HASH_MODEL)


@pytest.mark.parametrize("out", [".parquet", ".jsonl", ".npy"])
@pytest.mark.parametrize("source", [".txt", ".jsonl", ".csv", ".parquet"])
def test_every_format_in_and_out_keeps_order_and_ids(
    tmp_path: Path, redis_url: str, make_client: Client, source: str, out: str
) -> None:
    texts = TEXTS if source == ".txt" else MULTILINE
    with_ids = source != ".txt" and out != ".npy"
    ids = [i * 7 for i in range(len(texts))]
    path = write_input(tmp_path / f"in{source}", texts, ids if with_ids else None)
    output = tmp_path / f"out{out}"
    options = ["--id-field", "id"] if with_ids else []
    done = embq("embed", str(path), "-o", str(output), *options, env=env_for(redis_url))
    assert done.returncode == 0, done.stderr
    got_ids, vectors, errors = read_output(output, "id" if with_ids else "row")
    np.testing.assert_array_equal(vectors, make_client().embed(texts))
    if out != ".npy":
        want_ids = [str(i) for i in ids] if source == ".csv" else ids  # CSV has no types: ids stay text
        assert got_ids == (want_ids if with_ids else list(range(len(texts))))
    assert errors == [None] * len(texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, output.name])  # no temporary left


def test_parquet_ids_keep_their_type(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    texts = ["one", "two", "three"]
    path = write_input(tmp_path / "in.parquet", texts, ids=[10, 20, 30])
    output = tmp_path / "out.parquet"
    done = embq("embed", str(path), "-o", str(output), "--id-field", "id", env=env_for(redis_url))
    assert done.returncode == 0, done.stderr
    assert str(pq.read_schema(output).field("id").type) == "int64"


def test_jsonl_output_names_the_id_field_as_the_input_does(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    """The id travels under its own name (``doc_id`` here), not as ``"id"``: the output joins back on it."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"doc_id": "a1", "text": "one"}\n{"doc_id": "b2", "text": "two"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    done = embq("embed", str(path), "-o", str(output), "--id-field", "doc_id", env=env_for(redis_url))
    assert done.returncode == 0, done.stderr
    first = json.loads(output.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["doc_id", "embedding"] and first["doc_id"] == "a1"
    ids, vectors, _ = read_output(output, "doc_id")
    assert ids == ["a1", "b2"]
    np.testing.assert_array_equal(vectors, make_client().embed(["one", "two"]))


def test_a_byte_order_mark_is_not_part_of_the_first_text(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    inputs = {
        "in.txt": b"\xef\xbb\xbffirst\r\nsecond\r\nlone\rcr\n",
        "in.jsonl": b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n{"text": "lone\\rcr"}\n',
        "in.csv": b'\xef\xbb\xbftext\nfirst\nsecond\n"lone\rcr"\n',
    }
    want = make_client().embed(["first", "second", "lone\rcr"])
    for name, data in inputs.items():
        path = tmp_path / name
        path.write_bytes(data)
        output = tmp_path / f"{name}.parquet"
        done = embq("embed", str(path), "-o", str(output), env=env_for(redis_url))
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(read_output(output)[1], want, err_msg=name)
    stdin = embq("embed", "-", "-o", str(tmp_path / "stdin.parquet"), env=env_for(redis_url), stdin=inputs["in.txt"])
    assert stdin.returncode == 0, stdin.stderr
    np.testing.assert_array_equal(read_output(tmp_path / "stdin.parquet")[1], want)


def test_standard_input_as_text_or_jsonl(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    texts = [f"piped {i}" for i in range(3000)]
    output = tmp_path / "out.jsonl"
    done = embq(
        "embed", "-", "-o", str(output), env=env_for(redis_url), stdin="".join(t + "\n" for t in texts).encode()
    )
    assert done.returncode == 0, done.stderr
    ids, vectors, _ = read_output(output)
    assert ids == list(range(len(texts)))
    np.testing.assert_array_equal(vectors, make_client().embed(texts))

    records = "".join(json.dumps({"key": f"k{i}", "body": t}) + "\n" for i, t in enumerate(texts)).encode()
    table = ("key,body\n" + "".join(f'k{i},"{t}"\n' for i, t in enumerate(texts))).encode()
    for form, data in (("jsonl", records), ("csv", table)):
        output = tmp_path / f"{form}.parquet"
        done = embq(
            "embed", "-", "--input-format", form, "--field", "body", "--id-field", "key", "-o", str(output),
            env=env_for(redis_url), stdin=data,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        ids, vectors, _ = read_output(output, "key")
        assert ids == [f"k{i}" for i in range(len(texts))]
        np.testing.assert_array_equal(vectors, make_client().embed(texts))


def test_rows_that_cannot_be_embedded_fail_alone(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    lines = [
        '{"id": 1, "text": "good one"}',
        "",  # blank lines are not rows
        '{"id": 2, "text": "broken',
        '{"id": 3, "body": "no text field"}',
        '{"id": 4, "text": 42}',
        '["not", "an", "object"]',
        '{"id": 6, "text": "good two"}',
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    done = embq("embed", str(path), "-o", str(output), "--id-field", "id", env=env_for(redis_url))
    assert done.returncode == 1, done.stderr
    assert f"{path}:3 (row 1) failed: is not valid JSON" in done.stderr
    assert f"{path}:4 (row 2) failed: has no field 'text'" in done.stderr
    assert f"{path}:5 (row 3) failed: text is int, not str" in done.stderr
    assert f"{path}:6 (row 4) failed: is not a JSON object" in done.stderr
    assert "4 of 6 rows failed" in done.stderr
    ids, vectors, errors = read_output(output, "id")
    assert ids == [1, None, 3, 4, None, 6]
    assert [e is None for e in errors] == [True, False, False, False, False, True]
    np.testing.assert_array_equal(vectors[[0, 5]], make_client().embed(["good one", "good two"]))


def batch_line(custom_id: str, body: dict[str, object], url: str = "/v1/embeddings") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_an_openai_batch_file_round_trips(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    lines = [
        batch_line("one", {"model": "text-embedding-3-small", "input": "a single text"}),
        batch_line("many", {"input": ["first of many", "second of many", "first of many"]}),
        batch_line("small", {"input": ["shrunk", "shrunk too"], "dimensions": 64}),
        batch_line("b64", {"input": "base64 please", "encoding_format": "base64"}),
        batch_line("chat", {"messages": []}, url="/v1/chat/completions"),
        batch_line("tokens", {"input": [[1, 2, 3]]}),
        batch_line("too-wide", {"input": "x", "dimensions": 4096}),
        "",
        *[batch_line(f"bulk-{i}", {"input": [f"bulk text {i}"]}) for i in range(2500)],
    ]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(
        ("\n".join(lines) + "\n").encode()
        + b'{"custom_id": "bad-utf8", "url": "/v1/embeddings", "body": {"input": "broken \xff"}}\n'
    )
    done = embq("embed", str(path), env=env_for(redis_url))
    assert done.returncode == 1, done.stderr
    assert "4 of 2508 requests failed" in done.stderr
    output = tmp_path / "requests_output.jsonl"  # OpenAI's name for it
    records = [json.loads(line) for line in output.read_text().splitlines()]
    ids = [json.loads(line)["custom_id"] for line in lines if line] + ["bad-utf8"]
    assert [r["custom_id"] for r in records] == ids
    by_id = {r["custom_id"]: r for r in records}
    client = make_client()

    def vectors(custom_id: str) -> np.ndarray:
        record = by_id[custom_id]
        assert set(record) == {"id", "custom_id", "response", "error"} and record["error"] is None
        response = record["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert body["object"] == "list" and body["model"] == HASH_MODEL
        assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
        assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
        assert all(d["object"] == "embedding" for d in body["data"])
        rows = [d["embedding"] for d in body["data"]]
        rows = [np.frombuffer(base64.b64decode(v), "<f4") if isinstance(v, str) else v for v in rows]
        return np.array(rows, dtype=np.float32)

    np.testing.assert_array_equal(vectors("one"), client.embed(["a single text"]))
    np.testing.assert_array_equal(vectors("many"), client.embed(["first of many", "second of many", "first of many"]))
    np.testing.assert_allclose(vectors("small"), client.embed(["shrunk", "shrunk too"], dim=64), rtol=1e-6)
    np.testing.assert_array_equal(vectors("b64"), client.embed(["base64 please"]))
    bulk = np.concatenate([vectors(f"bulk-{i}") for i in range(2500)])
    np.testing.assert_array_equal(bulk, client.embed([f"bulk text {i}" for i in range(2500)]))
    for custom_id, says in [
        ("chat", "/v1/chat/completions"),
        ("tokens", "token ids"),
        ("too-wide", "exceeds the model's 384"),
        ("bad-utf8", "not valid UTF-8"),
    ]:
        record = by_id[custom_id]
        assert record["response"]["status_code"] == 400, record
        assert record["error"]["code"] == "invalid_request" and says in record["error"]["message"], record
        assert says in record["response"]["body"]["error"]["message"]

    first = output.read_bytes()
    again = embq("embed", str(path), env=env_for(redis_url))
    assert again.returncode == 1, again.stderr
    assert output.read_bytes() == first  # ids derive from the requests: a rerun writes the same file


def test_embed_file_in_a_pipeline_step(tmp_path: Path, make_client: Client) -> None:
    texts = [f"pipeline row {i}" for i in range(5000)]
    path = write_input(tmp_path / "part-0001.jsonl", texts, ids=[f"doc-{i}" for i in range(len(texts))])
    output = tmp_path / "part-0001.parquet"
    progress: list[int] = []
    client = make_client()
    summary = embed_file(client, path, output, id_field="id", on_progress=progress.append)
    assert summary.rows == len(texts) and summary.failed == 0 and sum(progress) == len(texts)
    ids, vectors, _ = read_output(output, "id")
    assert ids == [f"doc-{i}" for i in range(len(texts))]
    np.testing.assert_array_equal(vectors, client.embed(texts))


def test_quiet_and_no_progress(tmp_path: Path, redis_url: str) -> None:
    path = write_input(tmp_path / "in.txt", [f"quiet {i}" for i in range(3000)])
    quiet = embq("embed", str(path), "-o", str(tmp_path / "q.parquet"), "-q", env=env_for(redis_url))
    assert quiet.returncode == 0 and quiet.stderr == ""
    plain = embq("embed", str(path), "-o", str(tmp_path / "p.parquet"), "--no-progress", env=env_for(redis_url))
    assert plain.returncode == 0, plain.stderr
    assert "row/s]" not in plain.stderr  # no bar
    assert "3,000 rows in" in plain.stderr and f"0 failed -> {tmp_path / 'p.parquet'}" in plain.stderr
    bar = embq("embed", str(path), "-o", str(tmp_path / "b.parquet"), env=env_for(redis_url))
    assert "3000/3000 rows" in bar.stderr and "nothing left]" in bar.stderr  # cached at once: no rate to tell
    assert "\r" not in bar.stderr  # off a terminal, lines: no redraws for log lines to break
    again = embq("embed", str(path), "-o", str(tmp_path / "c.parquet"), env=env_for(redis_url))
    assert "3000/3000 rows" in again.stderr and "3,000 cached, nothing left" in again.stderr, again.stderr


def test_progress_counts_cached_rows_at_once_and_times_only_computed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed job: its cached rows show as soon as they are found, as cached, and give no rate or time
    left (they came at once); computed rows do, once they have come for ``RATE_AFTER`` seconds; at the end
    the line gives no rate (the summary does), and says it once."""
    lines: list[str] = []
    progress = Progress(5000, say=lines.append, shown=True, stream=io.StringIO())
    progress.rows("cached", 1478)
    assert progress.line().startswith("1478/5000 rows [") and "1,478 cached, time left unknown" in progress.line()
    progress.rows("computed", 100)  # the first computed rows start the clock of the rate
    progress.rows("failed", 2)
    assert "1580/5000 rows" in progress.line() and "time left unknown]" in progress.line()  # two notices at once
    monkeypatch.setattr(progress_module, "RATE_AFTER", 0.0)
    assert "1580/5000 rows" in progress.line() and " left at " in progress.line()
    assert "time left unknown" not in progress.line()
    progress.rows("computed", 3420)
    progress.close()
    assert lines[0].startswith("0/5000 rows") and lines[-1].startswith("5000/5000 rows")  # at the start, the end
    assert lines[-1].endswith("1,478 cached, nothing left]"), lines


def test_progress_off_a_terminal_says_a_line_while_rows_come_slowly_and_never_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows come a task at a time: between two whole percents, a line every LINE_EVERY seconds all the same;
    and the last line, said at each percent and again at the end, once."""
    monkeypatch.setattr(progress_module, "LINE_EVERY", 0.2)
    monkeypatch.setattr(progress_module, "LINE_GAP", 0.05)
    lines: list[str] = []
    progress = Progress(48, say=lines.append, shown=True, stream=io.StringIO())
    time.sleep(2.5)  # nothing done: the job is still going, and says so (a line a second: lines say seconds)
    assert len(lines) >= 3 and all(line.startswith("0/48 rows") for line in lines), lines
    progress.rows("computed", 48)  # one batch: no rate to tell, and none made up
    progress.close()
    assert lines[-1].startswith("48/48 rows") and "nothing left]" in lines[-1] and "row/s" not in lines[-1], lines
    assert len([line for line in lines if line.startswith("48/48")]) == 1, lines


@pytest.mark.parametrize("out", [".jsonl", ".npy"])
@pytest.mark.parametrize("source", [".txt", ".jsonl", ".csv"])
def test_a_named_pipe_is_read_once(tmp_path: Path, redis_url: str, make_client: Client, source: str, out: str) -> None:
    """A FIFO can be read only once: it is streamed like standard input, never counted first."""
    import os
    import threading

    texts = TEXTS[:3000]
    path = write_input(tmp_path / f"rows{source}", texts)
    fifo = tmp_path / f"pipe{source}"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()), daemon=True)
    writer.start()
    output = tmp_path / f"out{out}"
    done = embq("embed", str(fifo), "-o", str(output), env=env_for(redis_url), timeout=120)
    writer.join(10)
    assert done.returncode == 0, done.stderr
    _, vectors, _ = read_output(output)
    np.testing.assert_array_equal(vectors, make_client().embed(texts))


def test_process_substitution_is_read_once(tmp_path: Path, redis_url: str, make_client: Client) -> None:
    import shlex
    import subprocess
    import sys

    output = tmp_path / "x.jsonl"
    command = f"{shlex.quote(sys.executable)} -m embq embed <(printf 'one\\ntwo\\n') -o {shlex.quote(str(output))}"
    done = subprocess.run(["bash", "-c", command], env=env_for(redis_url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 rows" in done.stderr
    _, vectors, _ = read_output(output)
    np.testing.assert_array_equal(vectors, make_client().embed(["one", "two"]))


def test_a_huge_csv_record_and_an_id_that_is_not_utf8_fail_alone(
    tmp_path: Path, redis_url: str, make_client: Client
) -> None:
    huge = "x" * (2 << 20)  # 2 MB: over the largest text a producer sends, and over any parser's block
    data = b"id,text\n" + b"1,first\n" + f'2,"{huge}"\n'.encode() + b"\xff\xfe,bad id\n" + b"4,last\n"
    path = tmp_path / "in.csv"
    path.write_bytes(data)
    output = tmp_path / "out.jsonl"
    done = embq("embed", str(path), "-o", str(output), "--id-field", "id", env=env_for(redis_url))
    assert done.returncode == 1, done.stderr
    assert "2 of 4 rows failed" in done.stderr
    ids, vectors, errors = read_output(output, "id")
    assert ids == ["1", "2", "\ufffd\ufffd", "4"]
    assert [e is None for e in errors] == [True, False, False, True]
    assert "not valid UTF-8" in (errors[2] or "")
    np.testing.assert_array_equal(vectors[[0, 3]], make_client().embed(["first", "last"]))


@pytest.mark.parametrize(
    ("ids", "kind"),
    [([1, 2, 7.9], "int64"), ([1, "1"], "int64"), ([0.5, 3000.5], "double"), (["a", None, "b"], "string")],
)
def test_parquet_ids_are_kept_exactly_or_refused(
    tmp_path: Path, redis_url: str, make_client: Client, ids: list[object], kind: str
) -> None:
    """Ids of one JSON type keep it; a mix (an int then a float, 1 and "1") is refused, never converted."""
    texts = [f"id test {i}" for i in range(len(ids))]
    path = write_input(tmp_path / "in.jsonl", texts, ids)
    output = tmp_path / "out.parquet"
    done = embq("embed", str(path), "-o", str(output), "--id-field", "id", env=env_for(redis_url))
    if len({type(i) for i in ids if i is not None}) > 1:
        assert done.returncode == 2, done.stderr
        assert "a Parquet column holds one type" in done.stderr and "row " in done.stderr
        assert "Traceback" not in done.stderr and not output.exists()
        return
    assert done.returncode == 0, done.stderr
    assert str(pq.read_schema(output).field("id").type) == kind
    assert pq.read_table(output).column("id").to_pylist() == ids
