"""The dispatcher's recovery and giving up: lost tasks sent again, calls cancelled or timed out dropped
and their claims released, every call failed when no retry can help."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError

from embq.producer import protocol
from embq.producer.admission import CLAIM_CHUNK
from embq.producer.backend import BACKEND_ERRORS, redis_reason, unavailable
from embq.producer.broker import UNACKED_KEY, queue_lists, task_ids_held
from embq.producer.call import Call
from embq.producer.errors import BackendUnavailableError, EmbqError
from embq.producer.ops import Op, PerText, Read, Redis, script
from embq.producer.pending import OURS, THEIRS

if TYPE_CHECKING:
    from embq.producer.dispatcher import Dispatcher

#: The dispatcher's logger: one name for all the dispatcher says, whichever module of it says it.
log = logging.getLogger("embq.producer.dispatcher")


class Recovery:
    """Resending and giving up, for ``embq.producer.dispatcher.Dispatcher``."""

    def _watching(self: Dispatcher, digest: str) -> bool:
        return self.entries.state(digest) == THEIRS

    def _awaited(self: Dispatcher, task_id: str) -> list[str]:
        return [d for d in self.tasks[task_id] if self.entries.carried_by(d, task_id)]

    def _resend_lost(self: Dispatcher) -> Generator[Op, Any, None]:
        """Send again the texts of tasks the broker held at neither of two ticks (see ``embq.producer.broker``).

        Two looks apart, because a task is briefly in neither place while a worker
        moves it from the queue to its unacked hash; a task finished meanwhile has
        left its notice, which is read before anything is sent again."""
        self.tasks = {t: ds for t in self.tasks if (ds := self._awaited(t))}
        if not self.tasks or not self.broker_checks:
            self.suspects.clear()
            return
        try:
            lists = [name for queue in self.settings.queues for name in queue_lists(queue)]
            (raw,) = yield script("held", [UNACKED_KEY, *lists], [], "broker")
        except redis.exceptions.ResponseError as e:  # an ACL or a managed Redis without scripts
            log.warning("cannot look for lost tasks in the broker (%s); allow EVALSHA to have them found", e)
            self.broker_checks = False
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.info("broker unreachable while looking for lost tasks: %s", e)
            return
        held = task_ids_held(raw, self.tasks)
        if held is None:
            self.suspects.clear()
            return
        missing = set(self.tasks) - held
        if missing & self.suspects:
            yield from self._on_read((yield Read(self.last_id, 0)))
        lost = [t for t in missing & self.suspects if t in self.tasks and self._awaited(t)]
        self.suspects = missing - set(lost)
        if lost:
            digests = [d for t in lost for d in self._awaited(t)]
            for task_id in lost:
                del self.tasks[task_id]
            yield from self._send(digests, "their task left the broker unanswered (lost, or failed by a worker)")

    def _drop_cancelled(self: Dispatcher) -> Generator[Op, Any, None]:
        """Calls the caller gave up on: forget their rows, release what only they wanted."""
        cancelled = {c for c in self.calls if c.cancelled and not c.finished}
        if cancelled:
            for call in cancelled:
                call.finish()
            yield from self._release(self._forget(cancelled))

    def _drop_expired(self: Dispatcher, now: float) -> Generator[Op, Any, None]:
        """Calls past their deadline end with a timeout; texts only they wanted are released, as for
        a cancelled call: a worker skips them rather than compute what nobody waits for (what was
        computed before stays cached for a later call)."""
        expired = {c for c in self.calls if c.expire(now)}
        self.calls = [c for c in self.calls if not c.finished]
        if expired:
            yield from self._release(self._forget(expired))

    def _forget(self: Dispatcher, calls: set[Call]) -> list[str]:
        """Drop the rows of ``calls``; returns the digests of ours no row waits for any more."""
        orphans: list[str] = []
        pending = self.entries
        for digest, slot in list(pending.slots.items()):
            if pending.forget(slot, calls):
                state, _ = pending.take(digest)  # type: ignore[misc]
                if state == OURS:
                    orphans.append(digest)
        self.active = deque(c for c in self.active if c not in calls)
        return orphans

    def _release(self: Dispatcher, digests: list[str]) -> Generator[Op, Any, None]:
        """Delete our claims of ``digests`` and tell whoever watches them to claim them again."""
        for start in range(0, len(digests), CLAIM_CHUNK):
            part = digests[start : start + CLAIM_CHUNK]
            reply = yield PerText("release", [self.token], part)
            watchers = protocol.watchers_of(reply, part)
            if watchers:
                notices = {stream: protocol.notice_fields(released=ds) for stream, ds in watchers.items()}
                yield Redis("cache", [("XADD", s, "NOMKSTREAM", "*", *protocol.flat(n)) for s, n in notices.items()])

    def _abandon(self: Dispatcher, error: BaseException) -> Generator[Op, Any, None]:
        """A failure no retry here can fix: our claims are released, then every call ends with ``error``
        (in that order, so that a caller who retries at once finds nothing of ours in its way)."""
        # NEW too: a CLAIM cut short by the failure may have claimed some of them already.
        ours = [d for d in self.entries if self.entries.state(d) != THEIRS]
        try:
            yield from self._release(ours)
        except (*BACKEND_ERRORS, BackendUnavailableError) as e:
            log.info("could not release %d claims (%s); they lapse with our liveness", len(ours), e)
        for call in [*self.calls, *self.inbox]:
            call.fail(error)
        self.calls.clear()
        self.inbox.clear()
        self.active.clear()
        self.entries.clear()
        self.tasks.clear()
        self.suspects.clear()
        self.recheck.clear()

    def _backend_error(self: Dispatcher, error: BaseException) -> EmbqError:
        role = "broker" if isinstance(error, OperationalError) else "cache"
        url = self.settings.broker if role == "broker" else self.settings.cache
        return unavailable(role, url, self.settings.origin(role), error)


def describe(error: BaseException) -> str:
    """An error's reason without its payload: redis-py quotes a failed pipeline's commands, values included."""
    return (redis_reason(error) if isinstance(error, redis.exceptions.RedisError) else str(error))[:500]
