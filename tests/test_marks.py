"""Pass marks, the crash evidence of a worker: written in order by a thread of their own, never on a runner's path."""

from __future__ import annotations

from typing import cast

import numpy as np
import redis

from embq.producer import keys
from embq.worker.app import PassMarks
from embq.worker.local import wait_until


def rows_of(r: redis.Redis, task: str) -> dict[bytes, list[int]]:
    found = cast(dict[bytes, bytes], r.hgetall(keys.attempts_key(task)))
    return {field: np.frombuffer(value, dtype="<u4").tolist() for field, value in found.items()}


def test_marks_are_written_in_order_and_a_pass_that_left_alive_loses_its_mark(r: redis.Redis) -> None:
    """A pass's mark reaches Redis without a later call; the removal of a pass that left alive rides with the next
    pass's mark, after the mark it removes; ``stop`` writes what is still queued."""
    marks = PassMarks(lambda: r)
    marks.start()
    marks.enter("in:1", {"task-a": [0, 2], "task-b": [5]})
    wait_until(lambda: rows_of(r, "task-b") == {b"in:1": [5]}, 10, "the first pass's marks")
    assert rows_of(r, "task-a") == {b"in:1": [0, 2]}
    assert 0 < r.ttl(keys.attempts_key("task-a")) <= keys.ATTEMPTS_TTL
    marks.leave("in:1", {"task-a": [0, 2], "task-b": [5]})
    marks.enter("in:2", {"task-a": [1]})
    wait_until(lambda: rows_of(r, "task-a") == {b"in:2": [1]}, 10, "the second pass's mark, the first one's gone")
    assert rows_of(r, "task-b") == {}
    marks.enter("in:3", {"task-b": [6]})
    marks.leave("in:3", {"task-b": [6]})  # entered and left before the writer ran: nothing stays
    marks.leave("in:2", {"task-a": [1]})
    marks.stop(timeout=10)
    assert rows_of(r, "task-a") == {} and rows_of(r, "task-b") == {}


def test_a_pass_never_waits_for_redis_to_take_its_mark(r: redis.Redis, redis_url: str) -> None:
    """With the cache Redis holding its writes (CLIENT PAUSE), a pass entering the engine is marked at once
    (the call returns, the mark not yet in Redis), and the mark lands once Redis takes writes again."""
    marks = PassMarks(lambda: r)
    marks.start()
    reader = redis.Redis.from_url(redis_url)
    try:
        r.client_pause(60_000, all=False)  # writes wait; reads (this test's) go on
        marks.enter("in:7", {"task-c": [3]})
        assert rows_of(reader, "task-c") == {}
        reader.client_unpause()
        wait_until(lambda: rows_of(reader, "task-c") == {b"in:7": [3]}, 10, "the mark, once Redis writes again")
    finally:
        reader.client_unpause()
        marks.stop(timeout=10)
        reader.close()
