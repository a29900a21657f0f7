"""The dispatcher's placing of a notice's vectors in the rows that wait for them, without Redis."""

from __future__ import annotations

import numpy as np

from embq.producer.call import Call
from embq.producer.dispatcher import Dispatcher
from embq.producer.settings import Settings


def test_a_text_two_rows_wait_for_takes_its_own_vector_when_another_was_delivered_already() -> None:
    """A notice for digests a, b, c where b was delivered before (a retry's duplicate notice, another producer's)
    and a waits in two rows: three picks for three vectors, not the matrix in order."""
    dispatcher = Dispatcher(Settings(redis_url="redis://127.0.0.1:1/0", model="hash/replies", l1_bytes=0))
    call = Call(["text a", "text c", "text b", "text a"], "")
    digests = ["a", "b", "c"]
    for digest, text, row in (("a", "text a", 0), ("c", "text c", 1), ("b", "text b", 2), ("a", "text a", 3)):
        dispatcher.entries.add(digest, text, "", call, row)
    matrix = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    dispatcher._deliver(digests[1:2], matrix[1:2], np.array([True]))  # b, first
    dispatcher._deliver(digests, matrix, np.array([True, True, True]))  # then all three again
    assert call.matrix is not None
    np.testing.assert_array_equal(call.matrix, matrix[[0, 2, 1, 0]])
