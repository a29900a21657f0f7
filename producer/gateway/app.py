"""The ASGI application: ``/v1/embeddings``, ``/v1/models``, ``/health``, ``/metrics``.

One event loop serves every request; each model has one ``AsyncEmbeddingClient``,
created on first use and shared by all requests for it (the client is safe to
share: concurrent calls for the same texts meet at their in-flight markers and
are computed once). Nothing here blocks the loop but JSON work proportional to
a request's own size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from embq.producer import keys, sentinel
from embq.producer.aio import AsyncEmbeddingClient
from embq.producer.backend import nothing_listens, redact, start_hint
from embq.producer.errors import EmbqError
from embq.producer.gateway.auth import ApiKeys, BearerAuth
from embq.producer.gateway.catalog import ModelCatalog, ModelInfo
from embq.producer.gateway.errors import SERVER, APIError, from_embq
from embq.producer.gateway.metrics import TEXTS, RequestMetrics
from embq.producer.gateway.protocol import embedding_response, parse_embedding_request, parse_json
from embq.producer.gateway.responses import JSON, error_response
from embq.producer.gateway.settings import GatewaySettings
from embq.producer.settings import Settings

log = logging.getLogger(__name__)

#: Seconds ``/health`` waits for each Redis to answer PING before it calls it unreachable.
HEALTH_TIMEOUT = 2.0
#: Header naming a request's lane (``interactive`` or ``bulk``), for clients that cannot add a body field.
PRIORITY_HEADER = "X-Embq-Priority"
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
#: Seconds each connection gets to close at shutdown.
CLOSE_TIMEOUT = 2.0
#: Seconds between two looks for the worker of a model not served yet (``Gateway._wait_for_worker``).
MODEL_LOOK_SECONDS = 0.25


class Gateway:
    """What one gateway process holds: its settings, one client per model, the catalog, Redis for probes."""

    def __init__(self, settings: Settings, limits: GatewaySettings) -> None:
        self.settings = settings
        self.limits = limits
        # Its own small asyncio connections for probes and the catalog: short timeouts, so that
        # /health answers within HEALTH_TIMEOUT even while Redis is gone.
        options: dict[str, Any] = {"socket_connect_timeout": HEALTH_TIMEOUT, "socket_timeout": HEALTH_TIMEOUT}
        self.cache = aioredis.Redis.from_url(settings.cache, **options)
        same = settings.broker == settings.cache
        if same:
            self.broker = self.cache
        elif sentinel.is_sentinel(settings.broker):
            self.broker = sentinel.amaster_client(settings.broker, **options)
        else:
            self.broker = aioredis.Redis.from_url(settings.broker, **options)
        self.catalog = ModelCatalog(
            self.cache,
            limits.models,
            namespace=settings.cache_namespace,
            cache_url=settings.cache,
            cache_options=options,
        )
        self.clients: dict[str, AsyncEmbeddingClient] = {}
        self._healthy: bool | None = None

    def client(self, model: str) -> AsyncEmbeddingClient:
        """The model's client, created on first use (only for models the catalog serves)."""
        found = self.clients.get(model)
        if found is None:
            # The catalog already refused models no worker has served; a named one waits for its workers.
            settings = self.settings.with_overrides(unknown_model_grace=0)
            found = self.clients[model] = AsyncEmbeddingClient(settings=settings, model=model)
            log.info("serving model %s", model)
        return found

    async def require_model(self, model: str, wait: bool = True) -> None:
        """A 404 for a model no worker serves nor has served; ``wait``: after giving its first worker the
        time to start (a request to embed), not at once (a question about the models)."""
        try:
            served = await self.catalog.serves(model) or (wait and await self._wait_for_worker(model))
        except REDIS_ERRORS as e:
            raise unreachable(e) from e
        if not served:
            raise APIError(
                404,
                f"The model {model!r} does not exist: no worker serves it nor has served it"
                + (f" (waited {self._model_grace():g}s, EMBQ_UNKNOWN_MODEL_GRACE, for one to start)" if wait else "")
                + "; GET /v1/models lists the models served.",
                code="model_not_found",
                param="model",
            )

    def _model_grace(self) -> float:
        return self.settings.unknown_model_grace or self.limits.request_timeout

    async def _wait_for_worker(self, model: str) -> bool:
        """A model nobody has served yet may have its first worker starting (started beside the gateway, it
        announces itself a second or two later, before it loads): its requests wait for it, as a client's
        calls do, ``EMBQ_UNKNOWN_MODEL_GRACE`` seconds (the request timeout if 0) before the 404."""
        deadline = asyncio.get_running_loop().time() + self._model_grace()
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(MODEL_LOOK_SECONDS)
            if await self.catalog.serves(model):
                return True
        return False

    async def embeddings(self, request: Request) -> Response:
        body = await read_body(request, self.limits.max_request_bytes)
        query = parse_embedding_request(
            parse_json(body), max_texts=self.limits.max_request_texts, max_text_bytes=self.settings.max_text_bytes
        )
        await self.require_model(query.model)
        timeout = self.limits.request_timeout
        priority = request_priority(query.priority, request.headers.get(PRIORITY_HEADER))
        truncate = self.limits.truncate if query.truncate is None else query.truncate
        try:
            vectors = await self.client(query.model).embed(
                query.texts,
                dim=query.dimensions,
                instruction=query.instruction,
                timeout=timeout,
                truncate=truncate,
                priority=priority,
            )
        except EmbqError as e:
            raise from_embq(e, model=query.model, timeout=timeout) from e
        TEXTS.labels(query.model).inc(len(query.texts))
        return JSON(embedding_response(query, vectors))

    async def models(self, request: Request) -> Response:
        try:
            listed = await self.catalog.listed()
        except REDIS_ERRORS as e:
            raise unreachable(e) from e
        return JSON({"object": "list", "data": [model_object(m) for m in listed]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        await self.require_model(name, wait=False)
        try:
            listed = {m.id: m for m in await self.catalog.listed()}
        except REDIS_ERRORS as e:
            raise unreachable(e) from e
        return JSON(model_object(listed.get(name, ModelInfo(name, self.catalog.started, 0))))

    async def health(self, request: Request) -> Response:
        """Ready to serve: both Redis answer. A load balancer sends traffic only here; liveness is /health/live."""
        broker, cache = await asyncio.gather(ping(self.broker), ping(self.cache))
        healthy = broker is None and cache is None
        if healthy != self._healthy:
            if healthy:
                log.info("broker and cache Redis reachable")
            else:
                log.warning("not ready: broker Redis %s; cache Redis %s", said(broker), said(cache))
            self._healthy = healthy
        body = {
            "status": "ok" if healthy else "unavailable",
            "broker": "ok" if broker is None else "unreachable",
            "cache": "ok" if cache is None else "unreachable",
        }
        return JSON(body, status_code=200 if healthy else 503)

    async def check_redis(self) -> None:
        """At start: a Redis that does not answer is said at once, with what to do, not first in a request's
        log line; the gateway starts all the same (``/health`` says unavailable until it answers)."""
        for role, client in (("broker", self.broker), ("cache", self.cache)):
            if role == "cache" and client is self.broker:
                continue
            error = await ping(client)
            if error is not None:
                url = getattr(self.settings, role)
                log.warning(
                    "%s Redis at %s (from %s) does not answer (%s): %s; requests get 503 until it does",
                    role,
                    redact(url),
                    self.settings.origin(role),
                    said(error),
                    start_hint(url) if nothing_listens(error) else "start it",
                )

    async def live(self, request: Request) -> Response:
        """The process answers. Independent of Redis: an outage must not make an orchestrator restart gateways."""
        return JSON({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def watch_workers(self, stop: asyncio.Event) -> None:
        """Keep the catalog current, so that a model whose workers are all gone stops being served. Ends when
        ``stop`` is set: redis-py's asyncio client can swallow a cancellation, a loop of ours must not."""
        while not stop.is_set():
            try:
                await self.catalog.look()  # its connection times out after HEALTH_TIMEOUT
            except REDIS_ERRORS as e:
                log.debug("cannot list workers: %s", e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), keys.HEARTBEAT_SECONDS)

    async def close(self) -> None:
        """Close every connection, each within ``CLOSE_TIMEOUT``: a Redis that hangs cannot hold the exit."""
        closing = [client.aclose() for client in self.clients.values()] + [self.cache.aclose(), self.catalog.aclose()]
        if self.broker is not self.cache:
            closing.append(self.broker.aclose())
        tasks = [asyncio.ensure_future(close) for close in closing]
        _, hanging = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)  # waits for no cancellation
        if hanging:
            log.info("%d connections did not close within %.0fs; leaving them", len(hanging), CLOSE_TIMEOUT)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.info("a connection did not close cleanly: %s", task.exception())


def request_priority(field: str | None, header: str | None) -> str:
    """A request's lane: the body's ``priority``, else the header, else interactive (someone waits on it).
    A header that is set is checked even when the body wins: a typo must not pass unseen."""
    given = (header or "").strip()
    if given and given.lower() not in keys.LANES:
        wrong = f"header {PRIORITY_HEADER} must be 'interactive' or 'bulk', got {given[:40]!r}"
        raise APIError(400, wrong, code="invalid_priority")
    if field is not None:
        return field
    return given.lower() or keys.INTERACTIVE


def model_object(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": "embq"}


def unreachable(error: BaseException) -> APIError:
    log.error("cache Redis unreachable: %s", error)
    return APIError(
        503, "embq's Redis cannot be reached; retry later.", type=SERVER, code="backend_unavailable",
        headers={"Retry-After": "1"},
    )  # fmt: skip


async def ping(client: aioredis.Redis) -> Exception | None:
    """None when ``client``'s Redis answers PING in time, else the error."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await client.ping()
    except REDIS_ERRORS as e:
        return e
    return None


def said(error: Exception | None) -> str:
    """A ``ping`` result, for a log line."""
    return "ok" if error is None else str(error) or type(error).__name__


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from its Content-Length before reading it, or as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size:,} bytes or more, over the limit of {limit:,} (EMBQ_MAX_REQUEST_BYTES): split it",
        code="request_too_large",
    )


#: Paths of the API without its ``/v1``: what an OpenAI client asks for when its ``base_url`` lacks it.
API_PATHS = ("/embeddings", "/models")


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    path = request.url.path
    message = f"{request.method} {path}: {error.detail}"
    if error.status_code == 404 and not path.startswith("/v1/"):
        if path.rstrip("/") in API_PATHS or path.startswith("/models/"):
            base = str(request.base_url).rstrip("/") + "/v1"
            message += f"; did you mean /v1{path}? An OpenAI client's base URL ends in /v1: base_url={base!r}"
        else:
            message += "; embq serve answers POST /v1/embeddings, GET /v1/models, /health and /metrics"
    return error_response(APIError(error.status_code, message, code="not_found" if error.status_code == 404 else None))


async def api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, APIError)
    return error_response(error)


async def internal_error(request: Request, error: Exception) -> Response:
    return error_response(APIError(500, "internal error; the gateway's log has the details", type=SERVER))


def create_app(settings: Settings, limits: GatewaySettings) -> Starlette:
    gateway = Gateway(settings, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.check_redis()
        stop = asyncio.Event()
        watcher = asyncio.create_task(gateway.watch_workers(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait([watcher], timeout=CLOSE_TIMEOUT + HEALTH_TIMEOUT)  # a look in flight may hang
            await gateway.close()

    routes = [
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        # Model ids hold slashes (sentence-transformers/all-MiniLM-L6-v2).
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/health/live", gateway.live, methods=["GET"]),
        Route("/metrics", gateway.metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestMetrics), Middleware(BearerAuth, keys=ApiKeys(limits.api_keys))],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
