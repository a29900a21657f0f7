"""``embq serve``: the gateway on uvicorn, one process, one event loop.

Scale out with more processes behind a load balancer (Kubernetes: replicas
and a HorizontalPodAutoscaler), not with uvicorn's ``--workers``: each process
keeps its own metrics, and one loop already holds thousands of waiting requests.
"""

from __future__ import annotations

import logging
import signal

import uvicorn

from producer.gateway.app import create_app
from producer.gateway.settings import GatewaySettings
from producer.settings import Settings

log = logging.getLogger("embq.gateway")

#: Seconds given to requests in flight after SIGTERM, beyond their own time limit.
SHUTDOWN_MARGIN = 5.0


def serve(settings: Settings, limits: GatewaySettings, *, host: str, port: int, access_log: bool = False) -> None:
    """Run until SIGTERM or SIGINT; requests in flight are finished first."""
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
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it found in
    # place: let that handler accept it, so that a clean stop exits 0 (as a Celery worker's warm shutdown does).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    uvicorn.Server(config).run()


def _stopped(signum: int, frame: object) -> None:
    log.info("stopped by %s", signal.Signals(signum).name)
