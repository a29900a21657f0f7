"""``embq serve`` as a real process, driven by the real ``openai`` client (and raw HTTP), with real workers."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from embq.producer import EmbeddingClient, keys
from embq.worker.engines.hash import hash_vector
from embq.worker.local import LocalGateway, LocalRedis, LocalWorker, wait_until
from tests.conftest import HASH_MODEL

KEYS = ("key-one", "key-two")
NAMED = "hash/named"
MAX_TEXTS = 64
MAX_BYTES = 64 * 1024
MAX_TEXT_BYTES = 2000


@pytest.fixture(scope="module")
def gateway(redis_server: LocalRedis) -> Iterator[LocalGateway]:
    env = {
        "EMBQ_API_KEYS": ", ".join(KEYS),
        "EMBQ_MAX_REQUEST_TEXTS": str(MAX_TEXTS),
        "EMBQ_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "EMBQ_MAX_TEXT_BYTES": str(MAX_TEXT_BYTES),
        "EMBQ_UNKNOWN_MODEL_GRACE": "1",  # a mistyped model is a 404 after 1 s, not the default 10
    }
    server = LocalGateway(redis_server.url, models=(NAMED,), env=env).start()
    yield server
    assert server.stop() == 0, server.log_text()
    assert "EMBQ_API_KEYS is not set" not in server.log_text()
    server.cleanup()


@pytest.fixture
def api(gateway: LocalGateway, redis_url: str, hash_worker: LocalWorker) -> Iterator[openai.OpenAI]:
    """The openai client as a user sets it up, without retries so that each status is seen once."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS[1], max_retries=0, timeout=120)
    yield client
    client.close()


def expected(texts: list[str], dim: int | None = None) -> np.ndarray:
    full = np.stack([hash_vector(t, 384) for t in texts])
    if dim is None:
        return full
    head = full[:, :dim]
    return head / np.linalg.norm(head, axis=1, keepdims=True)


def rows(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_default_base64_and_float_equal_the_clients_vectors(
    api: openai.OpenAI, make_client: Callable[..., EmbeddingClient]
) -> None:
    texts = ["first", "second", "first", "Ünïcödé 中文 🚀", "", "  spaces  "]
    by_default = api.embeddings.create(model=HASH_MODEL, input=texts)  # the client asks for base64 and decodes it
    as_floats = api.embeddings.create(model=HASH_MODEL, input=texts, encoding_format="float")
    direct = make_client().embed(texts)
    np.testing.assert_array_equal(rows(by_default), direct)
    np.testing.assert_array_equal(rows(as_floats), direct)
    np.testing.assert_array_equal(direct, expected(texts))
    assert by_default.model == HASH_MODEL and by_default.object == "list"
    assert by_default.usage.prompt_tokens == by_default.usage.total_tokens >= len(texts)


def test_base64_is_little_endian_float32(api: openai.OpenAI) -> None:
    response = api.embeddings.create(model=HASH_MODEL, input=["b64"], encoding_format="base64")
    raw = response.data[0].embedding
    assert isinstance(raw, str)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(raw), dtype="<f4"), expected(["b64"])[0])


def test_dimensions_serve_the_renormalised_prefix(
    api: openai.OpenAI, make_client: Callable[..., EmbeddingClient]
) -> None:
    response = api.embeddings.create(model=HASH_MODEL, input="one text", dimensions=32)
    got = rows(response)
    assert got.shape == (1, 32)
    np.testing.assert_array_equal(got, make_client().embed(["one text"], dim=32))
    np.testing.assert_allclose(got, expected(["one text"], 32), rtol=1e-6)


def test_raw_http_as_curl_sends_it(gateway: LocalGateway, hash_worker: LocalWorker, redis_url: str) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": HASH_MODEL, "input": ["a", "b"], "user": "ignored", "instruction": "query: "}
    answer = httpx.post(gateway.url + "/v1/embeddings", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    data = answer.json()
    assert set(data) == {"object", "data", "model", "usage"}
    assert data["object"] == "list" and data["model"] == HASH_MODEL
    assert [(d["object"], d["index"]) for d in data["data"]] == [("embedding", 0), ("embedding", 1)]
    assert isinstance(data["data"][0]["embedding"][0], float)  # OpenAI's default format: float
    got = np.array([d["embedding"] for d in data["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected(["query: a", "query: b"]))  # the hash engine prefixes it
    assert data["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_models_lists_named_and_online_models(api: openai.OpenAI, start_worker: Callable[..., LocalWorker]) -> None:
    listed = {m.id: m for m in api.models.list()}
    assert {HASH_MODEL, NAMED} <= set(listed)
    assert listed[HASH_MODEL].object == "model" and listed[HASH_MODEL].owned_by == "embq"
    assert api.models.retrieve(HASH_MODEL).id == HASH_MODEL
    assert api.models.retrieve(NAMED).id == NAMED

    worker = start_worker("hash/arrives")
    assert "hash/arrives" in {m.id for m in api.models.list()}
    out = api.embeddings.create(model="hash/arrives", input=["hello"])
    np.testing.assert_array_equal(rows(out), expected(["hello"]))
    worker.stop()
    assert "hash/arrives" not in {m.id for m in api.models.list()}


def test_a_request_waits_for_the_first_worker_of_its_model_to_start(
    redis_server: LocalRedis, start_worker: Callable[..., LocalWorker]
) -> None:
    """Gateway and worker started together (the quickstart, a rollout): the first request is not a 404."""
    with LocalGateway(redis_server.url) as gateway, ThreadPoolExecutor(1) as pool:
        api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = pool.submit(api.embeddings.create, model="hash/starting", input=["early"])
        time.sleep(0.5)
        start_worker("hash/starting", wait=False)
        np.testing.assert_array_equal(rows(answer.result(timeout=120)), expected(["early"]))
        api.close()


def test_an_unknown_model_is_404(api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        api.embeddings.create(model="no/such-model", input=["x"])
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "GET /v1/models" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        api.models.retrieve("no/such-model")
    assert caught.value.code == "model_not_found"


def test_bad_items_are_400_naming_their_index(api: openai.OpenAI, r: redis.Redis) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=["fine", 5, "fine", None])  # type: ignore[list-item]
    error = caught.value
    assert error.param == "input" and error.code == "invalid_input"
    assert "input[1] is int" in error.message and "input[3] is NoneType" in error.message
    assert error.body["failed"] == {"1": "is int, not str", "3": "is NoneType, not str"}  # type: ignore[index]

    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=["fine", "x" * (MAX_TEXT_BYTES + 1)])
    assert "input[1]" in caught.value.message and "over the limit" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=[[101, 2023], [3]])
    assert caught.value.code == "token_ids_unsupported"
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=[])
    assert caught.value.param == "input"
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=["x"], encoding_format="binary")  # type: ignore[arg-type]
    assert caught.value.param == "encoding_format"
    assert r.llen(keys.queue_name(HASH_MODEL)) == 0, "nothing is enqueued for a refused request"


def test_a_base_url_without_v1_gets_a_404_that_says_so(gateway: LocalGateway) -> None:
    """The ``openai`` client with ``base_url`` lacking ``/v1`` asks for ``/embeddings``: the 404 names the path
    it meant and the base URL to set."""
    client = openai.OpenAI(base_url=gateway.url, api_key=KEYS[0], max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model=HASH_MODEL, input=["x"])
    message = caught.value.message
    assert "did you mean /v1/embeddings?" in message and f"base_url='{gateway.url}/v1'" in message, message
    other = httpx.get(gateway.url + "/nothing-here", timeout=30)
    assert other.status_code == 404 and "POST /v1/embeddings" in other.json()["error"]["message"]


def test_malformed_bodies_are_400(gateway: LocalGateway) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    for body, param in [(b"{not json", None), (b"[1, 2]", None), (b'{"input": ["x"]}', "model")]:
        answer = httpx.post(gateway.url + "/v1/embeddings", content=body, headers=headers, timeout=30)
        assert answer.status_code == 400, answer.text
        assert set(answer.json()["error"]) >= {"message", "type", "param", "code"}
        assert answer.json()["error"]["param"] == param


@pytest.mark.parametrize("dimensions", [0, -3, 100_000])
def test_impossible_dimensions_are_400(api: openai.OpenAI, dimensions: int) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=["dims"], dimensions=dimensions)
    assert caught.value.param == "dimensions" and caught.value.code == "invalid_dimensions"


def test_a_wrong_or_missing_key_is_401_and_probes_stay_open(gateway: LocalGateway, hash_worker: LocalWorker) -> None:
    wrong = openai.OpenAI(base_url=gateway.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.embeddings.create(model=HASH_MODEL, input=["x"])
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.get(gateway.url + "/v1/models", timeout=30)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    for key in KEYS:
        assert httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(gateway.url + "/health", timeout=30).status_code == 200
    assert httpx.get(gateway.url + "/metrics", timeout=30).status_code == 200


def test_too_large_requests_are_413(api: openai.OpenAI, gateway: LocalGateway) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=[f"t{i}" for i in range(MAX_TEXTS + 1)])
    assert caught.value.status_code == 413 and caught.value.code == "too_many_inputs"
    with pytest.raises(openai.APIStatusError) as caught:
        api.embeddings.create(model=HASH_MODEL, input=["y" * 1500] * 50)  # 75 kB > 64 KiB, refused unread
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"model": "' + HASH_MODEL.encode() + b'", "input": ["'
        for _ in range(80):
            yield b"z" * 1000
        yield b'"]}'

    answer = httpx.post(
        gateway.url + "/v1/embeddings", content=chunks(), headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30
    )
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"


def test_a_text_the_worker_refuses_is_422_naming_it(
    api: openai.OpenAI, start_worker: Callable[..., LocalWorker]
) -> None:
    start_worker("hash/strict-gateway", env={"EMBQ_MAX_TEXT_BYTES": "100"})
    wait_until(lambda: "hash/strict-gateway" in {m.id for m in api.models.list()}, 30, "the gateway to see the worker")
    texts = ["short", "x" * 500, "short too"]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        api.embeddings.create(model="hash/strict-gateway", input=texts)
    assert caught.value.code == "item_failed" and caught.value.param == "input"
    assert "input[1]" in caught.value.message and "cached" in caught.value.message
    assert list(caught.value.body["failed"]) == ["1"]  # type: ignore[index]
    good = api.embeddings.create(model="hash/strict-gateway", input=[texts[0], texts[2]])
    np.testing.assert_array_equal(rows(good), expected([texts[0], texts[2]]))


def test_the_truncate_field_cuts_long_texts_and_its_absence_fails_them(
    api: openai.OpenAI, gateway: LocalGateway, redis_url: str, start_worker: Callable[..., LocalWorker]
) -> None:
    """TEI's request field ``truncate``: true cuts a text over the context (the hash engine keeps its first
    (100 - 2) x 4 characters), absent it fails alone naming the field; ``embq serve --truncate`` makes cutting
    the default for requests without the field (``openai`` clients without ``extra_body``)."""
    start_worker("hash/cutting", env={"EMBQ_HASH_MAX_TOKENS": "100"})
    wait_until(lambda: "hash/cutting" in {m.id for m in api.models.list()}, 30, "the gateway to see the worker")
    long = "long text " * 50
    cut = api.embeddings.create(model="hash/cutting", input=["short", long], extra_body={"truncate": True})
    np.testing.assert_array_equal(rows(cut), expected(["short", long[:392]]))
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        api.embeddings.create(model="hash/cutting", input=["short", long])
    assert "input[1]" in caught.value.message and '"truncate": true' in caught.value.message
    assert "(127 tokens) is longer than this model takes (100 tokens)" in caught.value.message
    answer = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": "hash/cutting", "input": ["x"], "truncate": "yes"},
        headers={"Authorization": f"Bearer {KEYS[0]}"},
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "truncate"
    with LocalGateway(redis_url, models=("hash/cutting",), env={"EMBQ_TRUNCATE": "1"}) as cutting:
        by_default = openai.OpenAI(base_url=cutting.url + "/v1", api_key="open", max_retries=0)
        again = by_default.embeddings.create(model="hash/cutting", input=[long + "more"])
        np.testing.assert_array_equal(rows(again), expected([long[:392]]))
        with pytest.raises(openai.UnprocessableEntityError):
            by_default.embeddings.create(model="hash/cutting", input=[long], extra_body={"truncate": False})
        assert cutting.stop() == 0


def test_a_time_limit_is_504_and_the_abandoned_work_is_dropped(
    redis_url: str, r: redis.Redis, start_worker: Callable[..., LocalWorker]
) -> None:
    """A model named at start is served with no worker online: its request waits, then 504. Nobody
    waits for its texts any more, so the worker that comes later skips them; a retry computes them."""
    with LocalGateway(redis_url, models=("hash/late",), env={"EMBQ_REQUEST_TIMEOUT": "1"}) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="open", max_retries=0)
        texts = ["late one", "late two"]
        with pytest.raises(openai.APIStatusError) as caught:
            api.embeddings.create(model="hash/late", input=texts)
        assert caught.value.status_code == 504 and caught.value.code == "timeout"
        assert "retry" in caught.value.message
        assert r.llen(keys.queue_name("hash/late")) > 0, "the task was queued"
        start_worker("hash/late")
        stats = keys.stats_key("hash/late")
        wait_until(lambda: int(r.hget(stats, "abandoned") or 0) == 2, 60, "the worker to skip the dropped texts")
        assert int(r.hget(stats, "texts") or 0) == 0
        np.testing.assert_array_equal(rows(api.embeddings.create(model="hash/late", input=texts)), expected(texts))
        assert int(r.hget(stats, "texts") or 0) == 2, "computed once, by the retry"
        assert server.stop() == 0


def test_redis_down_is_503_and_health_says_so() -> None:
    with LocalRedis() as down, LocalGateway(down.url, models=("hash/down",)) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="open", max_retries=0)
        assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok", "broker": "ok", "cache": "ok"}
        down.stop()
        with pytest.raises(openai.APIStatusError) as caught:
            api.embeddings.create(model="hash/down", input=["x"])
        assert caught.value.status_code == 503 and caught.value.code == "backend_unavailable"
        assert "127.0.0.1" not in caught.value.message, "Redis' address stays in the gateway's log"
        with pytest.raises(openai.APIStatusError) as caught:
            api.models.list()
        assert caught.value.status_code == 503
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "broker": "unreachable", "cache": "unreachable"}
        assert httpx.get(server.url + "/health/live", timeout=30).status_code == 200
        assert server.stop() == 0
        warnings = [line for line in server.log_text().splitlines() if "WARNING" in line and "EMBQ_API_KEYS" in line]
        assert len(warnings) == 1, server.log_text()


def test_many_concurrent_requests(gateway: LocalGateway, hash_worker: LocalWorker, redis_url: str) -> None:
    async def run() -> list[tuple[list[str], np.ndarray]]:
        api = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120)

        async def one(i: int) -> tuple[list[str], np.ndarray]:
            texts = [f"concurrent {i % 16}", f"concurrent {i}"]
            return texts, rows(await api.embeddings.create(model=HASH_MODEL, input=texts))

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await api.close()

    for texts, got in asyncio.run(run()):
        np.testing.assert_array_equal(got, expected(texts))


def scrape(gateway: LocalGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = httpx.get(gateway.url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_metrics_count_requests_latency_texts_and_cache_hits(api: openai.OpenAI, gateway: LocalGateway) -> None:
    before = scrape(gateway)
    texts = ["metric one", "metric two", "metric three"]
    api.embeddings.create(model=HASH_MODEL, input=texts)
    api.embeddings.create(model=HASH_MODEL, input=texts)  # all three cached now
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="no/such-model", input=["x"])
    after = scrape(gateway)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("embq_gateway_requests_total", endpoint="/v1/embeddings", status="200") == 2
    assert grew("embq_gateway_requests_total", endpoint="/v1/embeddings", status="404") == 1
    assert grew("embq_gateway_request_seconds_count", endpoint="/v1/embeddings") == 3
    assert grew("embq_gateway_texts_total", model=HASH_MODEL) == 6
    assert grew("embq_client_cache_hits_total", model=HASH_MODEL) >= 3
    assert grew("embq_client_cache_misses_total", model=HASH_MODEL) == 3


def test_a_port_in_use_is_one_line_and_exit_2(redis_url: str) -> None:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBQ_")} | {"EMBQ_REDIS_URL": redis_url}
        done = subprocess.run(
            [sys.executable, "-m", "embq", "serve", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_absurd_bodies_are_400_without_echoing_them(gateway: LocalGateway) -> None:
    deep = "[" * 5_000 + "]" * 5_000
    huge = "9" * 4300
    with httpx.Client(base_url=gateway.url, timeout=30, headers={"Authorization": f"Bearer {KEYS[0]}"}) as http:
        nested = http.post("/v1/embeddings", content=f'{{"model": "{HASH_MODEL}", "input": {deep}}}')
        assert nested.status_code == 400 and "nests JSON too deeply" in nested.text
        big = http.post("/v1/embeddings", content=f'{{"model": "{HASH_MODEL}", "input": "x", "dimensions": {huge}}}')
        assert big.status_code == 400 and "'dimensions'" in big.text and len(big.text) < 1000, big.text


def test_a_request_whose_headers_never_complete_is_dropped(gateway: LocalGateway) -> None:
    import socket
    import time
    from urllib.parse import urlsplit

    from embq.producer.gateway.http import HEADER_TIMEOUT

    where = urlsplit(gateway.url)
    with socket.create_connection((where.hostname, where.port), timeout=HEADER_TIMEOUT + 10) as slow:
        slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        started = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the gateway
        assert HEADER_TIMEOUT - 1 < time.monotonic() - started < HEADER_TIMEOUT + 5
