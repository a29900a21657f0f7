"""The dispatcher's reply reading: the notices of our reply stream placed in the rows that wait for them."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from embq.producer import protocol
from embq.producer.call import Call
from embq.producer.codec import unpack_concat
from embq.producer.contract import root_task_id
from embq.producer.ops import Op, Redis
from embq.producer.pending import OURS

if TYPE_CHECKING:
    from embq.producer.dispatcher import Dispatcher

#: The dispatcher's logger: one name for all the dispatcher says, whichever module of it says it.
log = logging.getLogger("embq.producer.dispatcher")


class Replies:
    """Reading notices and placing vectors, for ``embq.producer.dispatcher.Dispatcher``."""

    def _deliver(self: Dispatcher, digests: list[str], matrix: Any, valid: Any, how: str | None = None) -> list[str]:
        """Place vectors in the rows that wait for them; returns the digests whose vector is invalid."""
        placed: dict[tuple[Call, str], tuple[list[int], list[int], set[str]]] = {}
        bad: list[str] = []
        slots = self.entries.slots
        if self.l1 is not None:  # before any row: a vector of a new dimension empties the L1 first
            good = [j for j, ok in enumerate(valid) if ok and digests[j] in slots]
            self.l1.put([digests[j] for j in good], matrix, good)
        for j, digest in enumerate(digests):
            if digest not in slots:
                continue
            if not valid[j]:
                bad.append(digest)
                continue
            state, waiters = self.entries.take(digest)  # type: ignore[misc]
            kind = how or ("computed" if state == OURS else "waited")
            for call, row in waiters:
                rows, picks, distinct = placed.setdefault((call, kind), ([], [], set()))
                rows.append(row)
                picks.append(j)
                distinct.add(digest)
        for (call, kind), (rows, picks, distinct) in placed.items():
            # The whole matrix in order, or a gather: a text two rows wait for is picked twice, so that the
            # length and the ends alone would take a matrix with a vector missing for one in order.
            everything = len(picks) == len(matrix) and picks == list(range(len(picks)))
            call.place(rows, matrix if everything else matrix[picks], kind, len(distinct))
        if placed:
            self.last_progress = time.monotonic()
        return bad

    def _fail(self: Dispatcher, digest: str, reason: str) -> None:
        taken = self.entries.take(digest)
        if taken is None:
            return
        rows: dict[Call, list[int]] = {}
        for call, row in taken[1]:
            rows.setdefault(call, []).append(row)
        for call, failed in rows.items():
            call.fail_rows(failed, reason)
        self.last_progress = time.monotonic()

    def _on_read(self: Dispatcher, response: Any) -> Generator[Op, Any, None]:
        notices: list[dict[bytes, bytes]] = []
        read = False
        for _stream, entries in stream_entries(response):
            for entry_id, fields in entries:
                self.last_id = entry_id
                read = True
                if b"d" in fields:
                    notices.append(fields)
        if read:
            yield Redis("cache", [("XTRIM", self.reply, "MINID", self.last_id)])
        for fields in notices:
            notice = protocol.read_notice(fields)
            if notice.done:
                matrix, valid = unpack_concat(notice.values, len(notice.done), self.dim)
                self.recheck.update(self._deliver(notice.done, matrix, valid))
            task = root_task_id(notice.task) if notice.task else ""
            for digest, reason in notice.failed.items():
                # From the task we wait for, or (for a text another producer computes) from its worker;
                # a failure of a task we gave up on must not fail the text sent again since.
                if self.entries.carried_by(digest, task) or (not task and self._watching(digest)):
                    self._fail(digest, reason)
            self.recheck.update(d for d in notice.released if d in self.entries)


def stream_entries(response: Any) -> list[tuple[Any, list[tuple[Any, dict[bytes, bytes]]]]]:
    """XREAD's reply as ``[(stream, [(id, fields), ...])]``, whether RESP2 (list) or RESP3 (map)."""
    if not response:
        return []
    if isinstance(response, dict):
        return [
            (name, entries[0] if entries and isinstance(entries[0], list) else entries)
            for name, entries in response.items()
        ]
    return [(name, entries) for name, entries in response]
