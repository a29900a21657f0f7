"""embq's engine host: one engine per process, fed by a batcher from Celery tasks.

Imports ``producer`` for the contract; engines are imported only when chosen.
"""

from embq.worker.app import create_app
from embq.worker.settings import WorkerSettings

__all__ = ["WorkerSettings", "create_app"]
