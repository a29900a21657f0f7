"""The texts a worker holds and has not yet put in a pass, grouped by their token count.

Every task the worker holds (up to its concurrency, of up to a thousand texts
each) lands here, so a pass can be formed from texts of one length across all
of them: padding then costs little however mixed the workload, as when one
``encode`` call sorts all of its texts. Two ways to form a pass:

- ``pass_around`` an anchor (the oldest waiting text: a query goes at once, a
  text past its deadline goes now), growing with the texts nearest in length;
- ``densest_pass``, for padded engines with many passes' worth of texts: the run
  of lengths whose pass does the most real work for the device time it costs.
  Anchoring every pass on the oldest text lands it on orphan lengths whose
  neighbours were taken, and such passes span wide ranges of length (0.66
  real/padded with 4 passes' worth waiting, 0.89 with 36); the densest run
  keeps passes near-equal in length with a few passes' worth.

The batcher keeps one backlog per lane (interactive, bulk). Each also finds the
waiting copies of a text (``twins``): a text that two tasks carry (a task sent
again, a retry's) is computed once, and its copies take that vector.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

import numpy as np

#: A waiting text: ``(task's job, row in it)``. The job has ``tokens`` (a list of ints).
Entry = tuple[Any, int]


class Backlog:
    """Waiting texts by token count; FIFO within one count."""

    def __init__(self) -> None:
        self._by_length: dict[int, dict[tuple[int, int], Entry]] = {}
        self._lengths: list[int] = []  # sorted, each with a non-empty group
        self._by_text: dict[str, dict[tuple[int, int], Entry]] = {}  # the waiting copies of each text
        #: Waiting texts, and their tokens.
        self.texts = 0
        self.tokens = 0

    def add(self, job: Any, rows: range | list[int]) -> None:
        groups, tokens = self._by_length, job.tokens
        for row in rows:
            length = tokens[row]
            group = groups.get(length)
            if group is None:
                group = groups[length] = {}
                insort(self._lengths, length)
            group[(id(job), row)] = (job, row)
            self._by_text.setdefault(job.texts[row], {})[(id(job), row)] = (job, row)
            self.texts += 1
            self.tokens += length

    def remove(self, job: Any, row: int) -> None:
        length = job.tokens[row]
        group = self._by_length[length]
        del group[(id(job), row)]
        copies = self._by_text[job.texts[row]]
        del copies[(id(job), row)]
        if not copies:
            del self._by_text[job.texts[row]]
        self.texts -= 1
        self.tokens -= length
        if not group:
            del self._by_length[length]
            del self._lengths[bisect_left(self._lengths, length)]

    def discard(self, job: Any, rows: range | list[int]) -> None:
        for row in rows:
            if (id(job), row) in self._by_length.get(job.tokens[row], {}):
                self.remove(job, row)

    def twins(self, text: str) -> list[Entry]:
        """The waiting copies of ``text``, in any task. Nothing is removed."""
        return list(self._by_text.get(text, {}).values())

    def clear(self) -> None:
        self._by_text.clear()
        self._by_length.clear()
        self._lengths.clear()
        self.texts = self.tokens = 0

    def densest_pass(self, budget: int, most: int, overhead: int) -> list[Entry]:
        """The padded pass (at most ``most`` texts, longest x texts at most ``budget``, a lone text over it
        alone) of the most real tokens per unit of its cost, padded tokens plus ``overhead`` (what a pass
        costs whatever its size, in tokens). Its texts are the longest below its longest one, oldest first
        within a length. Nothing is removed."""
        if not self._lengths:
            return []
        lengths = np.asarray(self._lengths, dtype=np.int64)
        counts = np.fromiter((len(self._by_length[n]) for n in self._lengths), dtype=np.int64, count=len(lengths))
        before = np.concatenate(([0], np.cumsum(counts)))  # texts shorter than each length, then all
        tokens_before = np.concatenate(([0], np.cumsum(counts * lengths)))
        # A pass topped by length k takes the ``size[k]`` longest texts up to that length.
        size = np.maximum(1, np.minimum(np.minimum(most, budget // lengths), before[1:]))
        first = before[1:] - size  # rank, among all waiting texts by length, of the pass's shortest text
        group = np.searchsorted(before, first, side="right") - 1  # the length that text has
        real = tokens_before[1:] - tokens_before[group] - (first - before[group]) * lengths[group]
        top = int(np.argmax(real / (size * lengths + overhead)))
        chosen: list[Entry] = []
        for index in range(top, -1, -1):
            for entry in self._by_length[self._lengths[index]].values():
                chosen.append(entry)
                if len(chosen) == size[top]:
                    return chosen
        return chosen

    def pass_around(self, anchor: Entry, budget: int, most: int, padded: bool) -> list[Entry]:
        """The anchor and the waiting texts nearest to it in length, up to ``most`` texts and ``budget``
        tokens: padded (longest x texts) or summed. Nothing is removed."""
        job, row = anchor
        length = job.tokens[row]
        chosen: list[Entry] = [anchor]
        longest = total = length
        lengths = self._lengths
        middle = bisect_left(lengths, length)
        below, above = middle - 1, middle + (1 if middle < len(lengths) and lengths[middle] == length else 0)
        candidates = iter(self._by_length.get(length, {}).values())
        up_open = True
        while len(chosen) < most:
            entry = next(candidates, None)
            if entry is None:  # this length is used up: the nearest other length next
                go_down = below >= 0 and (
                    not up_open or above >= len(lengths) or length - lengths[below] <= lengths[above] - length
                )
                if go_down:
                    candidates, below = iter(self._by_length[lengths[below]].values()), below - 1
                elif up_open and above < len(lengths):
                    candidates, above = iter(self._by_length[lengths[above]].values()), above + 1
                else:
                    break
                continue
            if entry[0] is job and entry[1] == row:
                continue
            size = entry[0].tokens[entry[1]]
            cost = max(longest, size) * (len(chosen) + 1) if padded else total + size
            if cost > budget:
                if size > longest and below >= 0:  # longer texts no longer fit; shorter ones may
                    up_open = False
                    candidates = iter(())
                    continue
                break
            chosen.append(entry)
            longest, total = max(longest, size), total + size
        return chosen


class Shares:
    """The bulk lane's backlog: every text in one ``Backlog`` (``all``), and each producer's in one of its
    own, with the work each has had while waiting (``served``, in passes). Passes are formed over all texts,
    as dense as the backlog allows, until a producer falls ``lag`` passes behind another: then the next
    pass is its texts first. Start-time fair queueing: a producer that comes starts level with the least
    served of those waiting, so a small job is served within a few passes however long another's backfill
    has run, and a backfill that comes does not take over the engine to catch up with an older one. The
    same surface as ``Backlog`` for what it holds; jobs name their producer in ``owner``."""

    def __init__(self) -> None:
        self.all = Backlog()
        self._owners: dict[str, Backlog] = {}
        self.served: dict[str, float] = {}

    @property
    def texts(self) -> int:
        return self.all.texts

    @property
    def tokens(self) -> int:
        return self.all.tokens

    def add(self, job: Any, rows: range | list[int]) -> None:
        backlog = self._owners.get(job.owner)
        if backlog is None:
            self.served[job.owner] = min(self.served.values(), default=0.0)
            backlog = self._owners[job.owner] = Backlog()
        backlog.add(job, rows)
        self.all.add(job, rows)

    def remove(self, job: Any, row: int) -> None:
        self.all.remove(job, row)
        self._owners[job.owner].remove(job, row)
        self._forget_if_done(job.owner)

    def discard(self, job: Any, rows: range | list[int]) -> None:
        self.all.discard(job, rows)
        backlog = self._owners.get(job.owner)
        if backlog is not None:
            backlog.discard(job, rows)
            self._forget_if_done(job.owner)

    def twins(self, text: str) -> list[Entry]:
        return self.all.twins(text)

    def clear(self) -> None:
        self.all.clear()
        self._owners.clear()
        self.served.clear()

    def behind(self, lag: float) -> tuple[str, Backlog] | None:
        """The producer served least, with its backlog, if it is more than ``lag`` passes behind another."""
        if len(self.served) < 2:
            return None
        least = min(self.served, key=self.served.__getitem__)
        if max(self.served.values()) - self.served[least] <= lag:
            return None
        return least, self._owners[least]

    def charge(self, owner: str, passes: float) -> None:
        """``owner``'s texts took ``passes`` of the engine."""
        if owner in self.served:
            self.served[owner] += passes

    def _forget_if_done(self, owner: str) -> None:
        if not self._owners[owner].texts:
            del self._owners[owner]
            del self.served[owner]
