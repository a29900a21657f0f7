"""The dispatcher's admission and claiming: calls admitted window by window (bulk and interactive
each through its own), their texts looked up (L1, MGET) and claimed, and what we now own sent as tasks."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from embq.producer import keys, protocol
from embq.producer.call import Call
from embq.producer.codec import unpack_many
from embq.producer.contract import EmbedPayload, make_payload
from embq.producer.keys import BULK, INTERACTIVE
from embq.producer.ops import Look, Op, PerText, Send
from embq.producer.pending import OURS, THEIRS

if TYPE_CHECKING:
    from embq.producer.dispatcher import Dispatcher

#: The dispatcher's logger: one name for all the dispatcher says, whichever module of it says it.
log = logging.getLogger("embq.producer.dispatcher")
#: Texts per CLAIM script call: bounds one round trip's reply (the cached vectors among them).
CLAIM_CHUNK = 1000
#: Above this recent hit rate, a window is read with a plain MGET before any claim: hits then cost
#: no script. Below it, most texts are new and the CLAIM script reads and claims in one go.
LOOK_FIRST_ABOVE = 0.3
#: Sends of one text before it fails: a task that keeps vanishing is not retried for ever.
MAX_ATTEMPTS = 3
#: Texts of one call admitted together: ``(call, their rows, texts, digests)``.
Piece = tuple[Call, range | list[int], list[str], list[str]]


class Admission:
    """Admitting, claiming and sending, for ``embq.producer.dispatcher.Dispatcher``."""

    def _interactive_in_flight(self: Dispatcher) -> int:
        """Rows of interactive calls admitted and not answered yet."""
        return sum(
            c.admitted - (len(c.texts) - c.remaining) for c in self.calls if c.lane == INTERACTIVE and not c.finished
        )

    def _room(self: Dispatcher, lane: str) -> int:
        """Texts the window of ``lane`` admits now: interactive calls have their own window
        (``interactive_cap_texts``), admitted past the bulk one, so that queries never wait for a
        backfill's window nor one caller's queries for everyone's."""
        if lane == BULK:
            return self.settings.inflight_texts - len(self.entries)
        return self.settings.interactive_cap_texts - self._interactive_in_flight()

    def _admissible(self: Dispatcher) -> bool:
        while self.active and self.active[0].finished:
            self.active.popleft()
        return bool(self.active) and self._room(self.active[0].lane) > 0

    def _admit(self: Dispatcher) -> Generator[Op, Any, None]:
        """The next texts of the active calls: those cached are placed at once (one MGET, no script);
        the others wait in entries, and those no entry had yet are claimed."""
        lane = self.active[0].lane
        budget = min(CLAIM_CHUNK, self._room(lane))
        pieces: list[Piece] = []
        while self.active and budget > 0:
            call = self.active[0]
            if call.finished:
                self.active.popleft()
                continue
            if call.lane != lane:  # the other window: the next round
                break
            start = call.admitted
            end = min(len(call.texts), start + budget)
            texts = call.texts[start:end]
            digests = keys.text_digests(self.model, self.namespace, call.instruction, texts, truncate=call.truncate)
            piece: Piece = (call, range(start, end), texts, digests)
            budget -= end - start
            call.admitted = end
            if end == len(call.texts):
                self.active.popleft()
            piece = self._from_l1(*piece) if self.l1 is not None else piece
            if piece[1]:
                pieces.append(piece)
        if not pieces:
            return
        fresh: list[str] = []
        if any(call.truncate for call, _, _, _ in pieces):
            pieces = yield from self._look_cut(pieces, fresh)
        if not pieces:
            yield from self._claim(fresh, count=True)
            return
        if self.hit_rate < LOOK_FIRST_ABOVE:  # mostly new texts: CLAIM finds the cached ones itself
            for call, rows, texts, digests in pieces:
                for row, digest, text in zip(rows, digests, texts, strict=True):
                    if self.entries.add(digest, text, call.instruction, call, row):
                        fresh.append(digest)
            yield from self._claim(fresh, count=True)
            return
        looked = [d for _, _, _, digests in pieces for d in digests]
        values = yield Look(looked)
        self._place_cached(pieces, looked, values, fresh)
        yield from self._claim(fresh, count=True)

    def _look_cut(self: Dispatcher, pieces: list[Piece], fresh: list[str]) -> Generator[Op, Any, list[Piece]]:
        """The pieces of calls that ask for the cut (``truncate``), in one MGET of their cut keys and their
        whole texts' keys: a vector under either is theirs (a text cached whole fit the context, so its cut
        is itself; a text over it has none there, since a call without the cut fails it). The rest wait in
        entries, under their cut keys, and those no entry had yet join ``fresh``, to be claimed. Returns the
        other pieces."""
        cut = [piece for piece in pieces if piece[0].truncate]
        whole = [keys.text_digests(self.model, self.namespace, call.instruction, texts) for call, _, texts, _ in cut]
        looked = [d for _, _, _, digests in cut for d in digests]
        values = yield Look(looked + [d for digests in whole for d in digests])
        self._place_cached(cut, looked, values, fresh)
        return [piece for piece in pieces if not piece[0].truncate]

    def _place_cached(
        self: Dispatcher, pieces: list[Piece], looked: list[str], values: list[Any], fresh: list[str]
    ) -> None:
        """Place the rows whose vector ``values`` holds (read for ``looked``, and, past those, for a second key
        of each, which serves where the first has none); the others wait in entries, and those no entry had
        yet join ``fresh``. Cached vectors go into the L1 under their first key."""
        matrix, valid = unpack_many(values, self.dim)
        add, position, hits, second = self.entries.add, 0, 0, len(values) > len(looked)
        for call, rows, texts, digests in pieces:
            found: list[int] = []
            picks: list[int] = []
            for row, digest, text in zip(rows, digests, texts, strict=True):
                pick = position + len(looked) if second and not valid[position] else position
                if valid[pick]:
                    found.append(row)
                    picks.append(pick)
                elif add(digest, text, call.instruction, call, row):
                    fresh.append(digest)
                position += 1
            if found:
                vectors = matrix[picks]
                cached = [looked[pick % len(looked)] for pick in picks]
                if self.l1 is not None:
                    self.l1.put(cached, vectors)
                distinct = len(set(cached))
                call.place(found, vectors, "cached", distinct)
                self.unreported_hits += distinct
                hits += len(found)
        self._learn_hit_rate(hits, len(looked))

    def _from_l1(self: Dispatcher, call: Call, rows: range | list[int], texts: list[str], digests: list[str]) -> Piece:
        """Place the rows the L1 holds (``self.l1``); the piece of the rest, for Redis."""
        assert self.l1 is not None
        found = self.l1.take(digests, self.dim)
        held = [j for j, vector in enumerate(found) if vector is not None]
        if not held:
            return call, rows, texts, digests
        vectors = np.stack([found[j] for j in held])  # type: ignore[misc]
        call.place([rows[j] for j in held], vectors, "cached", len({digests[j] for j in held}))
        rest = [j for j, vector in enumerate(found) if vector is None]
        return call, [rows[j] for j in rest], [texts[j] for j in rest], [digests[j] for j in rest]

    def _learn_hit_rate(self: Dispatcher, hits: int, looked: int) -> None:
        if looked:
            self.hit_rate = 0.8 * self.hit_rate + 0.2 * hits / looked

    def _hits_to_report(self: Dispatcher) -> list[tuple[Any, ...]]:
        """Commands adding the hits found by MGET, and the L1's, to the model's counters (CLAIM counts its own)."""
        l1_hits = self.l1.take_unreported() if self.l1 is not None else 0
        if not self.unreported_hits and not l1_hits:
            return []
        hits, self.unreported_hits = self.unreported_hits, 0
        commands: list[tuple[Any, ...]] = [("HINCRBY", self.stats, "hits", hits)] if hits else []
        if l1_hits:
            commands.append(("HINCRBY", self.stats, "l1_hits", l1_hits))
        return [*commands, ("EXPIRE", self.stats, keys.STATS_TTL)]

    def _claim(self: Dispatcher, digests: list[str], *, count: bool) -> Generator[Op, Any, None]:
        """CLAIM ``digests`` (entries that exist); resolve the cached, send what we now own."""
        for start in range(0, len(digests), CLAIM_CHUNK):
            part = digests[start : start + CLAIM_CHUNK]
            args = [self.token, self.hold_ms, self.reply, 2 * self.lease_ms, self.stats if count else ""]
            reply = yield PerText("claim", args, part)
            send: list[str] = []
            hit_digests: list[str] = []
            hit_values: list[bytes] = []
            slots, states = self.entries.slots, self.entries.states
            for digest, item in zip(part, reply, strict=True):
                slot = slots.get(digest)
                if slot is None:
                    continue
                if isinstance(item, bytes):
                    hit_digests.append(digest)
                    hit_values.append(item)
                elif item == protocol.CLAIMED:
                    states[slot] = OURS
                    send.append(digest)
                elif item == protocol.OURS:
                    states[slot] = OURS
                    if not self.entries.sent[slot]:  # ours from a call that failed before sending: send it now
                        send.append(digest)
                else:
                    states[slot] = THEIRS
            if count:
                self._learn_hit_rate(len(hit_digests), len(part))
            if hit_digests:  # found at a first claim they were cached; found later, a worker made them for us
                matrix, valid = unpack_many(hit_values, self.dim)
                bad = self._deliver(hit_digests, matrix, valid, "cached" if count else None)
                # Invalid cached values: compute them again (once: not at every look while their
                # task is queued); the worker overwrites them.
                for digest in bad:
                    states[slots[digest]] = OURS
                    if not self.entries.sent[slots[digest]]:
                        send.append(digest)
            yield from self._send(send)

    def _send(self: Dispatcher, digests: list[str], why: str = "") -> Generator[Op, Any, None]:
        """Send ``digests`` (ours) as tasks of at most ``task_max_texts`` texts and ``task_max_chars`` characters."""
        pending = self.entries
        groups: dict[tuple[int, str, int], list[tuple[str, int]]] = {}  # by (bulk, instruction, cut)
        given_up: list[str] = []
        for digest in digests:
            slot = pending.slots[digest]
            if pending.attempts[slot] >= MAX_ATTEMPTS:
                given_up.append(digest)
                continue
            pending.attempts[slot] += 1
            key = (pending.bulk[slot], pending.instructions[slot], pending.cut[slot])
            groups.setdefault(key, []).append((digest, slot))
        if why and groups:
            log.warning("sending %d texts again: %s", sum(map(len, groups.values())), why)
        tasks: list[tuple[str, EmbedPayload]] = []
        most_chars = self.settings.task_max_chars
        for (bulk, instruction, cut), group in groups.items():
            lane = BULK if bulk else INTERACTIVE
            most_texts = self.bulk_task_texts if bulk else self.settings.task_max_texts
            batch: list[str] = []
            texts: list[str] = []
            chars = 0
            for digest, slot in [*group, ("", -1)]:
                text = pending.texts[slot] if slot >= 0 else ""
                if batch and (slot < 0 or len(batch) >= most_texts or chars + len(text) > most_chars):
                    task_id = uuid.uuid4().hex
                    payload = make_payload(self.settings, instruction, texts, self.reply, lane, truncate=bool(cut))
                    tasks.append((task_id, payload))
                    self.tasks[task_id] = batch
                    for sent in batch:
                        pending.sent[pending.slots[sent]] = task_id
                    batch, texts, chars = [], [], 0
                if slot < 0:
                    break
                batch.append(digest)
                texts.append(text)
                chars += len(text)
        if tasks:
            yield Send(tasks)
        if given_up:  # failed here: our claims go, so that nobody waits for them (a later call tries again)
            for digest in given_up:
                self._fail(digest, f"gave up after {MAX_ATTEMPTS} attempts" + (f": {why}" if why else ""))
            yield from self._release(given_up)
