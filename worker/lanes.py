"""Room for interactive work while a worker drains a backfill.

A worker consumes two queues per model: the interactive one first (kombu's
BRPOP reads its keys in order), the bulk one after. That alone is not enough:
each task holds one of the worker's task slots (threads, and the prefetch
count with them) until its texts are embedded, so a backfill deep enough would
fill every slot, and a query would wait in the broker until a whole bulk task
finished. So bulk tasks may hold at most ``limit`` slots: when they do, the
worker stops consuming the bulk queue (kombu's ``cancel_by_queue``, what
``celery control cancel_consumer`` does), and consumes it again once one ends.
The remaining slots are always free for interactive tasks, which the batcher
then puts in its very next pass (``embq.worker.batcher``).

The same switch keeps the bulk backlog deep but bounded: the worker also stops
consuming bulk while the batcher says its bulk texts are enough (``deep``: many
passes' worth, at most seconds of the engine's work), and consumes again as soon
as they are not, long before they run out. Tasks left in the broker stay there
for other workers (and count in the queue depth that autoscalers read).

The consumer is changed on its own thread only (``Consumer.call_soon``), and
each change is decided there from the current count, so no two threads race on
kombu's state. A bulk message fetched just before a stop takes a slot beyond the
limit; the next stop counts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class BulkSlots:
    """Counts the bulk tasks a worker runs; keeps the bulk queue consumed while they are under ``limit`` and
    the bulk texts waiting are not ``deep`` enough."""

    def __init__(self, queue: str, limit: int) -> None:
        self.queue = queue
        self.limit = max(1, limit)
        self.held = 0
        #: Whether the bulk texts waiting are enough (the batcher's ``bulk_deep``, once it exists).
        self.deep: Callable[[], bool] = lambda: False
        self._lock = threading.Lock()
        self._consumer: Any = None

    def attach(self, consumer: Any) -> None:
        """The Celery consumer (its ``task_consumer`` is rebuilt at every reconnection): bring it in line."""
        self._consumer = consumer
        self._apply()

    def enter(self) -> None:
        with self._lock:
            self.held += 1
            crossed = self.held == self.limit
        if crossed:
            self._schedule()

    def leave(self) -> None:
        with self._lock:
            self.held -= 1
            crossed = self.held == self.limit - 1
        if crossed:
            self._schedule()

    def refresh(self) -> None:
        """``deep`` changed: bring the consumer in line."""
        self._schedule()

    def _schedule(self) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.call_soon(self._apply)

    def _apply(self) -> None:
        """On the consumer's thread: consume the bulk queue if and only if bulk tasks hold fewer than ``limit``."""
        consumer = self._consumer
        tasks = getattr(consumer, "task_consumer", None)
        if tasks is None:
            return
        with self._lock:
            room = self.held < self.limit
        room = room and not self.deep()
        consuming = tasks.consuming_from(self.queue)
        if room and not consuming:
            tasks.add_queue(consumer.app.amqp.queues[self.queue])
            tasks.consume()
            log.debug("consuming %s again (%d bulk tasks held)", self.queue, self.held)
        elif not room and consuming:
            tasks.cancel_by_queue(self.queue)
            log.debug("paused %s: bulk tasks hold %d slots, deep=%s", self.queue, self.held, self.deep())
