"""The texts a worker holds and has not yet put in a pass, grouped by their token count.

Every task the worker holds (up to its concurrency, of up to a thousand texts
each) lands here, so a pass can be formed from texts of one length across all
of them: padding then costs little however mixed the workload, as when one
``encode`` call sorts all of its texts. A pass is formed around the oldest
waiting text (so every task keeps moving and a lone request goes at once),
then grows with the texts nearest in length, from any task, up to the budget.
The batcher keeps one backlog per lane (interactive, bulk).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

#: A waiting text: ``(task's job, row in it)``. The job has ``tokens`` (a list of ints).
Entry = tuple[Any, int]


class Backlog:
    """Waiting texts by token count; FIFO within one count."""

    def __init__(self) -> None:
        self._by_length: dict[int, dict[tuple[int, int], Entry]] = {}
        self._lengths: list[int] = []  # sorted, each with a non-empty group

    def add(self, job: Any, rows: range | list[int]) -> None:
        groups, tokens = self._by_length, job.tokens
        for row in rows:
            length = tokens[row]
            group = groups.get(length)
            if group is None:
                group = groups[length] = {}
                insort(self._lengths, length)
            group[(id(job), row)] = (job, row)

    def remove(self, job: Any, row: int) -> None:
        length = job.tokens[row]
        group = self._by_length[length]
        del group[(id(job), row)]
        if not group:
            del self._by_length[length]
            del self._lengths[bisect_left(self._lengths, length)]

    def discard(self, job: Any, rows: range | list[int]) -> None:
        for row in rows:
            if (id(job), row) in self._by_length.get(job.tokens[row], {}):
                self.remove(job, row)

    def clear(self) -> None:
        self._by_length.clear()
        self._lengths.clear()

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
