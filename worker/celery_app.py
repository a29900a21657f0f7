"""Entry point for plain Celery: ``celery -A worker.celery_app worker``.

The app is built from the ``EMBQ_*`` environment on first access (PEP 562),
so importing this module reads nothing.
"""

from __future__ import annotations

from typing import Any

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        from embq.worker.app import create_app
        from embq.worker.settings import WorkerSettings

        _app = create_app(WorkerSettings.from_env())
    return _app
