"""``embq serve``: the gateway on uvicorn, one process, one event loop.

Scale out with more processes behind a load balancer (Kubernetes: replicas
and a HorizontalPodAutoscaler), not with uvicorn's ``--workers``: each process
keeps its own metrics, and one loop already holds thousands of waiting requests.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import uvicorn

from embq.producer.errors import ConfigurationError
from embq.producer.gateway.app import create_app
from embq.producer.gateway.settings import GatewaySettings
from embq.producer.settings import Settings

log = logging.getLogger("embq.gateway")

#: Seconds given to requests in flight after SIGTERM, beyond their own time limit.
SHUTDOWN_MARGIN = 5.0


def serve(settings: Settings, limits: GatewaySettings, *, host: str, port: int, access_log: bool = False) -> None:
    """Run until SIGTERM or SIGINT; requests in flight are finished first. The port is bound before anything
    starts, so that a port in use is one line and exit status 2, not a gateway that never finishes starting."""
    listener = bind(host, port)
    if not limits.api_keys:
        log.warning("EMBQ_API_KEYS is not set: /v1/* on %s:%d answers anyone, without a key", host, port)
    named = ", ".join(limits.models) or "none (only models with a worker online)"
    log.info("OpenAI-compatible gateway on http://%s:%d/v1; models named: %s", host, port, named)
    config = uvicorn.Config(
        create_app(settings, limits),
        host=host,
        port=port,
        # embq's CLI configured logging; uvicorn's loggers propagate to it.
        log_config=None,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=int(limits.request_timeout + SHUTDOWN_MARGIN),
        # Connections and requests at once; past it, new ones get 503 at once instead of piling up.
        limit_concurrency=limits.max_connections,
        http=http_protocol(),
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it found in
    # place: let that handler accept it, so that a clean stop exits 0 (as a Celery worker's warm shutdown does).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    uvicorn.Server(config).run(sockets=[listener])


def http_protocol() -> Any:
    """uvicorn's httptools protocol with a header time limit (``embq.producer.gateway.http``), when httptools is
    there (``embq[serve]`` brings it); else uvicorn's own choice."""
    try:
        from embq.producer.gateway.http import HeaderTimeoutProtocol
    except ImportError:
        log.warning("httptools is not installed: requests whose headers never complete hold their connection")
        return "auto"
    return HeaderTimeoutProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 too), as uvicorn would make it."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(info[0], info[1], info[2])
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(info[4])
    except OSError as e:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from e
    listener.set_inheritable(True)
    return listener


def _stopped(signum: int, frame: object) -> None:
    log.info("stopped by %s", signal.Signals(signum).name)
