"""The cache-side protocol: two server-side scripts, one round trip per batch of texts, and the notices.

A text's cache key holds either its vector or, while it is being computed, a
claim: ``b"EQ\\x00"``, a flag byte (``W`` once someone watches it, else ``-``)
and the token of the producer that claimed it. Producers claim many texts in
one ``CLAIM`` call (one MGET, then a ``SET NX`` per missing text); a worker
stores a task's vectors over their claims and notifies in one pipeline (one
``SET ... EX ... GET`` per text: the claim it replaces says whether anyone
watches, then the owner's notice), and deletes the claims of texts it could not
embed with ``RELEASE`` on behalf of the task's producer, as a producer that
gives up releases its own. Scripts and single commands run atomically, so a text is cached,
claimed by exactly one producer, or free, and every change wakes whoever waits:

- the producer that claimed a text (its owner) put its reply stream in the task,
  and the worker adds one notice per task to it, after the vectors and carrying
  them: the owner never reads the cache for its own texts;
- a producer that finds a text claimed by another live producer adds its reply
  stream to the text's watch set and flags the claim, in the same script; the
  ``SET ... GET`` that replaces a flagged claim returns the flag, and the worker
  sends the watchers the vectors. A watcher that comes later finds the vector.
  Watch sets exist only for texts two producers want at once;
- a claim's owner is alive while its ``embq:alive:{token}`` key is: one key per
  producer process, renewed every tick, not one renewal per text. A claim whose
  owner is not alive is taken over by the next producer that meets it.

Keys touched (all in the cache Redis; see ``embq.producer.keys`` for the full table):

=========================  ======  ==============================================
key                        type    CLAIM / RELEASE / worker's store
=========================  ======  ==============================================
``embq:v:{digest}``        string  read, claimed (SET NX PX), flagged, taken over
                                   / deleted if our claim / vector written over
                                   the claim (SET EX GET)
``embq:alive:{token}``     string  read (the owner's liveness) / - / -
``embq:watch:{embq:v:D}``  set     watcher added / read, deleted / read, deleted
``embq:reply:{token}``     stream  - / - / owner's notice added (NOMKSTREAM)
``embq:stats:{model}``     hash    hits, misses / - / tasks, texts, failed
=========================  ======  ==============================================

(``D``: the text's digest; the braces make its vector key the watch set's hash
tag, so that both share a slot on a Redis Cluster.)

Scripts build key names from digests themselves. On one Redis a call covers
a whole batch; on a Redis Cluster ``embq.producer.cluster`` runs the ``*_ON_NODE``
variants once per node over the texts of that node's slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from embq.producer import keys
from embq.producer.codec import CLAIM_PREFIX

#: CLAIM reply codes for a text that is not cached.
WATCHING = 0  # claimed by another live producer: we watch it
CLAIMED = 1  # claimed now by us (or taken over): send it
OURS = 2  # already claimed by us: a task of ours is on its way


def claim_value(token: str, watched: bool = False) -> bytes:
    """The value of a claimed text's key."""
    return CLAIM_PREFIX + (b"W" if watched else b"-") + token.encode()


#: Keys per variadic command inside a script (Lua's ``unpack`` has a stack limit).
_UNPACK = 4000
#: CLAIM_PREFIX as a Lua string literal.
_CLAIM = "'EQ\\0'"
_W = keys.DIGEST_HEX

#: The watch set of the text whose digest is ``d`` (a Lua expression): ``keys.watch_key``.
_WATCH_OF = f"'{keys.WATCH}{{{keys.VECTOR}' .. d .. '}}'"


def _helpers(cluster: bool) -> str:
    """Lua shared by the scripts. On a Redis Cluster a script runs on one node over the texts of that
    node's slots: each command may name keys of one slot only (GET per key, not MGET), and the
    owners' liveness keys live on other nodes, so the caller says which owners it knows to be alive
    or dead (ARGV[7], ARGV[8]: tokens joined by spaces) and ``alive`` answers nil for the others."""
    if cluster:
        read = """
local function mget(names)
  local out = {}
  for i = 1, #names do
    out[i] = redis.call('GET', names[i])
  end
  return out
end
local known = {}
for owner in string.gmatch(ARGV[7] or '', '%S+') do known[owner] = true end
for owner in string.gmatch(ARGV[8] or '', '%S+') do known[owner] = false end
local function alive(owner)
  return known[owner]
end
"""
    else:
        read = f"""
local function mget(names)
  local out = {{}}
  for start = 1, #names, {_UNPACK} do
    for _, item in ipairs(redis.call('MGET', unpack(names, start, math.min(#names, start + {_UNPACK} - 1)))) do
      out[#out + 1] = item
    end
  end
  return out
end
local function alive(owner)
  return redis.call('EXISTS', '{keys.ALIVE}' .. owner) == 1
end
"""
    return (
        f"""
local function each_key(prefix, joined, from, to)
  local names = {{}}
  for i = from, to do
    names[#names + 1] = prefix .. string.sub(joined, (i - 1) * {_W} + 1, i * {_W})
  end
  return names
end
local function tell_watchers(d, i, out)
  local watch = {_WATCH_OF}
  for _, watcher in ipairs(redis.call('SMEMBERS', watch)) do
    out[#out + 1] = i
    out[#out + 1] = watcher
  end
  redis.call('DEL', watch)
end
"""
        + read
    )


def _claim(cluster: bool) -> str:
    return (
        _helpers(cluster)
        + f"""
-- ARGV: token, claim ttl ms, reply stream, watch ttl ms, stats key ('' = no counting),
--       digests ({_W} hex characters each, end to end)[, owners alive, owners dead (cluster)].
-- Returns one item per digest: the cached value, or CLAIMED, OURS or WATCHING; on a cluster, {{owner}}
-- for a text claimed by an owner whose liveness the caller did not say (it asks again, saying it).
local token, hold, reply, watch_ttl, stats, joined = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local count = #joined / {_W}
local names = each_key('{keys.VECTOR}', joined, 1, count)
local out = mget(names)
local mine = {_CLAIM} .. '-' .. token
local hits = 0
for i = 1, count do
  local value = out[i]
  if value and string.sub(value, 1, 3) ~= {_CLAIM} then
    hits = hits + 1
  else
    local key = names[i]
    if not value then
      redis.call('SET', key, mine, 'PX', hold)
      out[i] = {CLAIMED}
    else
      local flag, owner = string.sub(value, 4, 4), string.sub(value, 5)
      local live = owner == token or alive(owner)
      if owner == token then
        redis.call('PEXPIRE', key, hold)
        out[i] = {OURS}
      elseif live == nil then
        out[i] = {{owner}}
      elseif not live then
        redis.call('SET', key, {_CLAIM} .. flag .. token, 'PX', hold)
        out[i] = {CLAIMED}
      else
        local d = string.sub(joined, (i - 1) * {_W} + 1, i * {_W})
        local watch = {_WATCH_OF}
        redis.call('SADD', watch, reply)
        redis.call('PEXPIRE', watch, watch_ttl)
        if flag ~= 'W' then
          redis.call('SET', key, {_CLAIM} .. 'W' .. owner, 'KEEPTTL')
        end
        out[i] = {WATCHING}
      end
    end
  end
end
if stats ~= '' then
  redis.call('HINCRBY', stats, 'hits', hits)
  redis.call('HINCRBY', stats, 'misses', count - hits)
  redis.call('EXPIRE', stats, {keys.STATS_TTL})
end
return out
"""
    )


CLAIM = _claim(cluster=False)
#: CLAIM for one node of a Redis Cluster (``embq.producer.cluster``): stats '' (the caller counts).
CLAIM_ON_NODE = _claim(cluster=True)

#: The values of the texts' keys (ARGV[1]: digests end to end), on one node of a Redis Cluster,
#: where one MGET cannot name keys of several slots.
LOOK_ON_NODE = (
    _helpers(cluster=True)
    + """
return mget(each_key('"""
    + keys.VECTOR
    + """', ARGV[1], 1, #ARGV[1] / """
    + str(_W)
    + """))
"""
)

RELEASE = (
    _helpers(cluster=False)
    + f"""
-- ARGV: a producer's token, digests ({_W} hex each, end to end). Deletes the texts' claims that are
-- still that producer's (never a vector, never another's claim: a text may have been sent again since),
-- so that nobody waits for them any more. The producer calls it when it gives up; a worker calls it
-- with the task's producer token for texts it could not embed.
-- Returns the watchers of the released texts: {{index, watcher, index, watcher, ...}} (1-based).
local token, joined, out = ARGV[1], ARGV[2], {{}}
for i = 1, #joined / {_W} do
  local d = string.sub(joined, (i - 1) * {_W} + 1, i * {_W})
  local key = '{keys.VECTOR}' .. d
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, 3) == {_CLAIM} and string.sub(value, 5) == token then
    redis.call('DEL', key)
    if string.sub(value, 4, 4) == 'W' then
      tell_watchers(d, i, out)
    end
  end
end
return out
"""
)


def watched(old_value: bytes | None) -> bool:
    """Whether the value a vector replaced (``SET ... GET``) was a claim that someone watches."""
    return old_value is not None and old_value[:4] == CLAIM_PREFIX + b"W"


def watchers_of(reply: Sequence[Any], digests: Sequence[str]) -> dict[bytes, list[str]]:
    """RELEASE's ``{index, watcher, ...}`` reply as watcher -> digests (1-based indices)."""
    found: dict[bytes, list[str]] = {}
    for i in range(0, len(reply), 2):
        watcher = reply[i + 1]
        found.setdefault(watcher if isinstance(watcher, bytes) else str(watcher).encode(), []).append(
            digests[int(reply[i]) - 1]
        )
    return found


def notice_fields(
    done: Sequence[str] = (),
    values: bytes | memoryview = b"",
    failed: dict[str, str] | None = None,
    released: Sequence[str] = (),
    task: str = "",
) -> dict[str, bytes | memoryview]:
    """What lands in a producer's reply stream, as stream fields: ``d`` the digests done, end to end,
    ``v`` their packed values in the same order (each as ``embq.producer.codec.pack`` makes it), ``f`` the
    digests failed with why (msgpack), ``r`` the digests whose claim was released (whoever waits for
    them claims them again), ``t`` the task that did the work (a failure counts only if it comes from
    the task its producer waits for: an earlier, abandoned task may fail after the text was sent again)."""
    fields: dict[str, bytes | memoryview] = {
        "d": "".join(done).encode(),
        "v": values,
        "f": msgpack.packb(failed or {}, use_bin_type=True),
    }
    if released:
        fields["r"] = "".join(released).encode()
    if task:
        fields["t"] = task.encode()
    return fields


def flat(fields: dict[str, bytes | memoryview]) -> list[Any]:
    """Stream fields as XADD's arguments: name, value, name, value..."""
    return [item for pair in fields.items() for item in pair]


class Notice(NamedTuple):
    task: str
    done: list[str]
    values: bytes
    failed: dict[str, str]
    released: list[str]


def read_notice(fields: dict[bytes, bytes]) -> Notice:
    """``notice_fields`` back."""
    reasons = fields.get(b"f")
    return Notice(
        fields.get(b"t", b"").decode(),
        split_digests(fields.get(b"d", b"")),
        fields.get(b"v", b""),
        dict(msgpack.unpackb(reasons, raw=False)) if reasons else {},
        split_digests(fields.get(b"r", b"")),
    )


def split_digests(joined: bytes) -> list[str]:
    text = joined.decode("ascii")
    return [text[i : i + keys.DIGEST_HEX] for i in range(0, len(text), keys.DIGEST_HEX)]
