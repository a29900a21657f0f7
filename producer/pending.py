"""The texts a dispatcher is resolving, as parallel lists indexed by slot.

No object per text: a window of tens of thousands of texts is a handful of
lists and one dict of strings to ints, which the garbage collector never has to
walk. (An object, a list and a tuple per text cost the producer a third of its
CPU in collections.)
"""

from __future__ import annotations

from collections.abc import Iterator

from embq.producer.call import Call
from embq.producer.keys import BULK

#: Who computes a text.
NEW, OURS, THEIRS = 0, 1, 2


class Pending:
    """digest -> slot; per slot: text, instruction, whether it is cut at the engine's context, state,
    sends so far, the task that carries it now (``""`` before its first send), and the rows that wait for it."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.texts: list[str] = []
        self.instructions: list[str] = []
        #: 1 for a text its calls want cut at the engine's context (``truncate=True``; its digest says so).
        self.cut = bytearray()
        self.states = bytearray()
        self.attempts = bytearray()
        self.sent: list[str] = []
        #: 1 for a text only bulk calls wait for, 0 once an interactive call waits for it too.
        self.bulk = bytearray()
        self._calls: list[Call | None] = []
        self._rows: list[int] = []
        self._more: dict[int, list[tuple[Call, int]]] = {}  # further rows, for texts asked for twice
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, digest: object) -> bool:
        return digest in self.slots

    def __iter__(self) -> Iterator[str]:
        return iter(self.slots)

    def add(self, digest: str, text: str, instruction: str, call: Call, row: int) -> bool:
        """Another row waits for ``digest``; True if it is a text no row waited for yet."""
        slot = self.slots.get(digest)
        bulk = call.lane == BULK
        if slot is not None:
            self._more.setdefault(slot, []).append((call, row))
            if not bulk:
                self.bulk[slot] = 0
            return False
        if self._free:
            slot = self._free.pop()
            self.texts[slot], self.instructions[slot], self._calls[slot], self._rows[slot] = (
                text,
                instruction,
                call,
                row,
            )
            self.cut[slot] = call.truncate
            self.states[slot] = NEW
            self.attempts[slot] = 0
            self.sent[slot] = ""
            self.bulk[slot] = bulk
        else:
            slot = len(self.texts)
            self.texts.append(text)
            self.instructions.append(instruction)
            self.cut.append(call.truncate)
            self._calls.append(call)
            self._rows.append(row)
            self.states.append(NEW)
            self.attempts.append(0)
            self.sent.append("")
            self.bulk.append(bulk)
        self.slots[digest] = slot
        return True

    def waiters(self, slot: int) -> list[tuple[Call, int]]:
        first = self._calls[slot]
        found = [(first, self._rows[slot])] if first is not None else []
        return found + self._more.get(slot, [])

    def forget(self, slot: int, cancelled: set[Call]) -> bool:
        """Drop the rows of ``cancelled`` calls; True if no row waits any more."""
        rows = [(c, r) for c, r in self.waiters(slot) if c not in cancelled]
        self._calls[slot], self._rows[slot] = rows[0] if rows else (None, 0)
        if len(rows) > 1:
            self._more[slot] = rows[1:]
        else:
            self._more.pop(slot, None)
        return not rows

    def take(self, digest: str) -> tuple[int, list[tuple[Call, int]]] | None:
        """Stop tracking ``digest``: its state and the rows that waited for it, or None if untracked."""
        slot = self.slots.pop(digest, None)
        if slot is None:
            return None
        found = self.states[slot], self.waiters(slot)
        self._calls[slot] = None
        self._more.pop(slot, None)
        self._free.append(slot)
        return found

    def state(self, digest: str) -> int:
        slot = self.slots.get(digest)
        return NEW if slot is None else self.states[slot]

    def carried_by(self, digest: str, task_id: str) -> bool:
        """Whether ``task_id`` is the task we wait for with ``digest`` (not one given up on before)."""
        slot = self.slots.get(digest)
        return slot is not None and self.states[slot] == OURS and self.sent[slot] == task_id

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]
