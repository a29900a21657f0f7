"""Which of a producer's tasks the broker still holds: queued, or taken by a worker and not yet acked.

Kombu's Redis transport moves a message from the queue list (BRPOP) to its
``unacked`` hash in a second step: a worker killed between the two loses the
message, and so does a broker Redis that restarts without persistence. Neither
leaves a trace that redelivery could follow, so the producer that sent the
task, and still waits for it, looks for it here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from embq.producer.contract import root_task_id

#: Kombu's defaults: the hash of delivered, unacked messages, and the separator
#: and steps of its per-priority queue lists (``queue``, ``queue\x06\x163``, ...).
UNACKED_KEY = "unacked"
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)

#: KEYS[1]: the unacked hash, KEYS[2..]: the queue's lists. Returns the task
#: ids of the unacked messages, or false when the queue is not empty (reading
#: it would cost as much as it holds) or a message cannot be read. One script:
#: a message moving between the two places is seen in one of them. It runs in
#: Redis so that message bodies never cross the network, and the unacked hash
#: holds only what workers have taken (prefetch x concurrency each).
HELD_SCRIPT = """
for i = 2, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then
    return false
  end
end
local ids = {}
for _, message in ipairs(redis.call('HVALS', KEYS[1])) do
  local ok, decoded = pcall(cjson.decode, message)
  if not ok or type(decoded[1]) ~= 'table' or type(decoded[1].headers) ~= 'table' then
    return false
  end
  ids[#ids + 1] = tostring(decoded[1].headers.id)
end
return ids
"""


def queue_lists(queue: str) -> list[str]:
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def task_ids_held(reply: Any, task_ids: Iterable[str]) -> set[str] | None:
    """The ids among ``task_ids`` that ``HELD_SCRIPT`` found unacked; None when it could not tell."""
    if reply is None:
        return None
    ids = {root_task_id(item.decode() if isinstance(item, bytes) else str(item)) for item in reply}
    return ids.intersection(task_ids)
