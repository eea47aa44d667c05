"""The store on Redis (7.0 or newer), for relays that share one store across replicas.

Every write is one Lua script, which Redis runs atomically: an `accept()` claims its ids,
stores its events and queues their deliveries in one step, or (Redis unreachable, out of
memory, read-only) in none, and the caller gets StoreUnavailable. The scripts carry a
`#!lua` shebang so that Redis refuses a writing script up front when it is out of memory
instead of failing it half-way. Durability is Redis's: run it with `appendonly yes` and
`appendfsync always` for an acknowledged event to survive a power cut, and with
`maxmemory-policy noeviction`, since an evicted key is a lost event (health() says so).

Times are the callers' (`now`), never Redis's clock. Timestamps are stored as Python's
`repr` of the float, which reads back exactly.

Key layout. Every key starts with `{<prefix>}:` (default `{relay}:`): one hash tag, so on
Redis Cluster all keys share a slot and every script can touch any of them. The scripts
get that tag as their only KEYS entry and build the other names from it. `<d>` is a
delivery id zero-padded to 16 digits, so that members of equal score sort by id.

    meta                    hash: schema version; its existence means "a store is here"
    seq:delivery            INCR counter of delivery ids
    event:<id>              hash: source, envelope, received_at, expires_at (dedupe claim)
    events                  zset: event id by expires_at (prune, counts)
    event_deliveries:<id>   set: the <d> of the event's deliveries
    delivery:<d>            hash: event_id, sink, state (pending|done|dead), attempts,
                            next_at, created_at, updated_at, last_status?, last_error?
    sinks                   set: sink names that have (had) deliveries
    pending:<sink>          zset: every pending <d> of the sink by created_at
    queue:<sink>            zset: pending, unclaimed <d> by next_at (what claim takes)
    claimed:<sink>          zset: pending, claimed <d> by lease end
    dead:<sink>             zset: dead <d> by updated_at
    done                    zset: done <d> (all sinks) by updated_at, for prune
    sinkstates              set: sinks with a saved state
    sinkstate:<sink>        hash: circuit, open_until, gone, updated_at
    minutes                 zset: minutes (unix time // 60) with receipts
    received:<minute>       hash: source -> events received that minute
    duplicates:<minute>     hash: source -> of which duplicates
    seq:quarantine          INCR counter of quarantine ids
    quarantine              zset: <q> (padded id) by id
    quarantine:<q>          hash: source, digest, received_at, repeats, error, reason,
                            content_type, size, body
    quarantine_index        hash: "<sha256>:<source>" -> <q>, a body kept once

A pending delivery is in `pending:<sink>` and in exactly one of `queue:<sink>` and
`claimed:<sink>`. Queues are sorted sets, not a Stream with a consumer group: claim()
must hand out work by next_at (retries are scheduled into the future, and
move_schedule_back() reschedules them), which a stream's arrival order cannot express;
a sorted set scored by lease end gives XAUTOCLAIM's "take over what a dead holder
left" with a range query. Claims live in Redis, so several relays can share a prefix:
`open(exclusive=True)` takes no lock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from relay.errors import StoreTooNew, StoreUnavailable
from relay.models import Delivery
from relay.store.contract import Store
from relay.store.types import (
    AcceptResult,
    DeadLetter,
    DeliveryRecord,
    EventRecord,
    NewEvent,
    Quarantined,
    Selection,
    Settlement,
    SinkStats,
)

SCHEMA_VERSION = 1

# Receipts older than this are pruned; `relay status` looks back one hour.
RECEIPTS_KEPT = 86400.0


class RedisStoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "redis://127.0.0.1:6379/0"
    # Becomes the hash tag `{prefix}` of every key; braces would end the tag early.
    prefix: str = Field("relay", min_length=1, pattern=r"^[^{}]+$")
    # A call that takes longer fails as StoreUnavailable (the sender retries).
    socket_timeout: float = Field(10.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)


def _pad(delivery_id: int) -> str:
    return f"{delivery_id:016d}"


def _num(value: float) -> str:
    # repr round-trips: what Redis stores reads back as the very same float.
    return repr(float(value))


def _str(value: bytes) -> str:
    return value.decode("utf-8")


def _opt_str(value: list[bytes]) -> str | None:
    """The scripts return an optional field as [] or [value]."""
    return _str(value[0]) if value else None


def _opt_int(value: list[bytes]) -> int | None:
    return int(value[0]) if value else None


def _redacted(url: str) -> str:
    """The URL as messages and logs may show it: scheme, host, port and database only.
    A password travels in the user info or in a `?password=` query, both dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return f"{url.partition(':')[0]}://[unparseable url]"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


# --- scripts ---------------------------------------------------------------------------

# Shared by the scripts that end claims: `release_claims` applies the claims this process
# gave back (pairs of <d> and lease end: a claim since taken over by another holder,
# whose lease end differs, is left alone); `expire_claims` returns claims whose lease
# ended to the queue.
_COMMON = """
local P = KEYS[1]
local function dkey(m) return P .. 'delivery:' .. m end
local function opt(v) if v then return {v} end return {} end
local function release_claims(first, count)
  for i = first, first + 2 * count - 1, 2 do
    local m, lease_end = ARGV[i], ARGV[i + 1]
    local d = redis.call('HMGET', dkey(m), 'sink', 'state', 'next_at')
    if d[1] then
      local claimed = P .. 'claimed:' .. d[1]
      local held = redis.call('ZSCORE', claimed, m)
      if held and tonumber(held) == tonumber(lease_end) then
        redis.call('ZREM', claimed, m)
        if d[2] == 'pending' then redis.call('ZADD', P .. 'queue:' .. d[1], d[3], m) end
      end
    end
  end
  return first + 2 * count
end
local function expire_claims(sink, now)
  local claimed = P .. 'claimed:' .. sink
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', claimed, '-inf', now)) do
    redis.call('ZREM', claimed, m)
    local d = redis.call('HMGET', dkey(m), 'state', 'next_at')
    if d[1] == 'pending' then redis.call('ZADD', P .. 'queue:' .. sink, d[2], m) end
  end
end
-- The dead letters a Selection picks, as {<d>, sink} pairs; ARGV from `a`:
-- has_sink, sink, n, event ids...
local function selected(a)
  local has_sink, sink, n = ARGV[a] == '1', ARGV[a + 1], tonumber(ARGV[a + 2])
  local out, seen = {}, {}
  if n > 0 then
    for j = a + 3, a + 2 + n do
      for _, m in ipairs(redis.call('SMEMBERS', P .. 'event_deliveries:' .. ARGV[j])) do
        local d = redis.call('HMGET', dkey(m), 'sink', 'state')
        if not seen[m] and d[2] == 'dead' and (not has_sink or d[1] == sink) then
          seen[m] = true
          out[#out + 1] = {m, d[1]}
        end
      end
    end
  else
    local sinks = {sink}
    if not has_sink then sinks = redis.call('SMEMBERS', P .. 'sinks') end
    for _, s in ipairs(sinks) do
      for _, m in ipairs(redis.call('ZRANGE', P .. 'dead:' .. s, 0, -1)) do
        out[#out + 1] = {m, s}
      end
    end
  end
  return out
end
"""

_WRITES = "#!lua\n" + _COMMON
# Writes that never grow the store (they move, end or delete): still allowed when Redis
# is at maxmemory, or relay could neither deliver nor free memory until an operator came.
_SHRINKS = "#!lua flags=allow-oom\n" + _COMMON
_READS = "#!lua flags=no-writes\n" + _COMMON

# ARGV: now, expires_at, source, minute, n, then per event: id, source, envelope,
# number of sinks, sinks... Returns 1 (duplicate) or 0 (accepted) per event.
_ACCEPT = (
    _WRITES
    + """
local now, expires, source, minute = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local at, n = tonumber(now), tonumber(ARGV[5])
local i, out, taken, dups = 6, {}, {}, 0
for e = 1, n do
  local id, src, envelope, nsinks = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local first_sink = i + 4
  i = first_sink + nsinks
  local ek = P .. 'event:' .. id
  local expires_at = redis.call('HGET', ek, 'expires_at')
  if taken[id] or (expires_at and tonumber(expires_at) > at) then
    out[e] = 1
    dups = dups + 1
  else
    out[e] = 0
    taken[id] = true
    redis.call('HSET', ek, 'source', src, 'envelope', envelope, 'received_at', now,
      'expires_at', expires)
    redis.call('ZADD', P .. 'events', expires, id)
    -- A claim taken again after its window may still have a delivery pending from the
    -- first: one pending delivery per event and sink is enough.
    local has = {}
    if expires_at then
      for _, m in ipairs(redis.call('SMEMBERS', P .. 'event_deliveries:' .. id)) do
        local d = redis.call('HMGET', dkey(m), 'sink', 'state')
        if d[2] == 'pending' then has[d[1]] = true end
      end
    end
    for j = first_sink, first_sink + nsinks - 1 do
      local sink = ARGV[j]
      if not has[sink] then
        has[sink] = true
        local m = string.format('%016d', redis.call('INCR', P .. 'seq:delivery'))
        redis.call('HSET', dkey(m), 'event_id', id, 'sink', sink, 'state', 'pending',
          'attempts', 0, 'next_at', now, 'created_at', now, 'updated_at', now)
        redis.call('SADD', P .. 'event_deliveries:' .. id, m)
        redis.call('ZADD', P .. 'queue:' .. sink, now, m)
        redis.call('ZADD', P .. 'pending:' .. sink, now, m)
        redis.call('SADD', P .. 'sinks', sink)
      end
    end
  end
end
if n > 0 then
  redis.call('HINCRBY', P .. 'received:' .. minute, source, n)
  redis.call('HINCRBY', P .. 'duplicates:' .. minute, source, dups)
  redis.call('ZADD', P .. 'minutes', minute, minute)
end
return out
"""
)

# ARGV: sink, now, lease end, limit, n releases, releases...
_CLAIM = (
    _SHRINKS
    + """
local sink, now, lease_end = ARGV[1], ARGV[2], ARGV[3]
release_claims(6, tonumber(ARGV[5]))
expire_claims(sink, now)
local queue, claimed = P .. 'queue:' .. sink, P .. 'claimed:' .. sink
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, ARGV[4])) do
  redis.call('ZREM', queue, m)
  redis.call('ZADD', claimed, lease_end, m)
  local d = redis.call('HMGET', dkey(m), 'event_id', 'attempts', 'created_at')
  local envelope = redis.call('HGET', P .. 'event:' .. d[1], 'envelope')
  out[#out + 1] = {m, d[1], d[2], d[3], envelope or ''}
end
return out
"""
)

# ARGV: n releases, releases... (applied alone, e.g. at close).
_RELEASE = (
    _SHRINKS
    + """
release_claims(2, tonumber(ARGV[1]))
return 0
"""
)

# ARGV: sink, now, n releases, releases...
_NEXT_DUE = (
    _SHRINKS
    + """
release_claims(4, tonumber(ARGV[3]))
expire_claims(ARGV[1], ARGV[2])
local first = redis.call('ZRANGE', P .. 'queue:' .. ARGV[1], 0, 0, 'WITHSCORES')
return first[2]
"""
)

# ARGV: now, n releases, releases..., then per settlement: <d>, state, next_at,
# attempted, has_status, status, has_error, error.
_SETTLE = (
    _SHRINKS
    + """
local now = ARGV[1]
local i = release_claims(3, tonumber(ARGV[2]))
while i <= #ARGV do
  local m, state, next_at, attempted = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local has_status, status, has_error, err = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  i = i + 8
  local k = dkey(m)
  local d = redis.call('HMGET', k, 'sink', 'created_at')
  if d[1] then
    local sink = d[1]
    redis.call('ZREM', P .. 'claimed:' .. sink, m)
    redis.call('ZREM', P .. 'queue:' .. sink, m)
    redis.call('ZREM', P .. 'pending:' .. sink, m)
    redis.call('ZREM', P .. 'dead:' .. sink, m)
    redis.call('ZREM', P .. 'done', m)
    redis.call('HSET', k, 'state', state, 'next_at', next_at, 'updated_at', now)
    if attempted == '1' then
      redis.call('HINCRBY', k, 'attempts', 1)
      if has_status == '1' then redis.call('HSET', k, 'last_status', status)
      else redis.call('HDEL', k, 'last_status') end
      if has_error == '1' then redis.call('HSET', k, 'last_error', err)
      else redis.call('HDEL', k, 'last_error') end
    end
    if state == 'pending' then
      redis.call('ZADD', P .. 'queue:' .. sink, next_at, m)
      redis.call('ZADD', P .. 'pending:' .. sink, d[2], m)
    elseif state == 'dead' then
      redis.call('ZADD', P .. 'dead:' .. sink, now, m)
    else
      redis.call('ZADD', P .. 'done', now, m)
    end
  end
end
return 0
"""
)

# ARGV: selection (see `selected`).
_DEAD_LETTERS = (
    _READS
    + """
local out = {}
for _, pick in ipairs(selected(1)) do
  local m = pick[1]
  local d = redis.call('HMGET', dkey(m), 'event_id', 'attempts', 'last_status', 'last_error',
    'updated_at')
  local envelope = redis.call('HGET', P .. 'event:' .. d[1], 'envelope')
  out[#out + 1] = {m, d[1], pick[2], d[2], opt(d[3]), opt(d[4]), d[5], envelope or ''}
end
return out
"""
)

# ARGV: now, selection.
_REPLAY = (
    _WRITES
    + """
local now = ARGV[1]
local picked = selected(2)
for _, pick in ipairs(picked) do
  local m, sink = pick[1], pick[2]
  redis.call('ZREM', P .. 'dead:' .. sink, m)
  redis.call('HSET', dkey(m), 'state', 'pending', 'attempts', 0, 'next_at', now,
    'created_at', now, 'updated_at', now)
  redis.call('ZADD', P .. 'queue:' .. sink, now, m)
  redis.call('ZADD', P .. 'pending:' .. sink, now, m)
end
return #picked
"""
)

# ARGV: selection.
_PURGE = (
    _SHRINKS
    + """
local picked = selected(1)
for _, pick in ipairs(picked) do
  local m, sink = pick[1], pick[2]
  local event_id = redis.call('HGET', dkey(m), 'event_id')
  redis.call('ZREM', P .. 'dead:' .. sink, m)
  if event_id then redis.call('SREM', P .. 'event_deliveries:' .. event_id, m) end
  redis.call('DEL', dkey(m))
end
return #picked
"""
)

_QUARANTINE_COMMON = """
local function qkey(q) return P .. 'quarantine:' .. q end
local function drop(q)
  local h = redis.call('HMGET', qkey(q), 'source', 'digest')
  if h[1] then redis.call('HDEL', P .. 'quarantine_index', h[2] .. ':' .. h[1]) end
  redis.call('DEL', qkey(q))
  return redis.call('ZREM', P .. 'quarantine', q)
end
"""

# ARGV: source, digest, received_at, error, reason, content_type, size, body,
# max_entries, max_bytes.
_QUARANTINE = (
    _WRITES
    + _QUARANTINE_COMMON
    + """
local index, field = P .. 'quarantine_index', ARGV[2] .. ':' .. ARGV[1]
local q = redis.call('HGET', index, field)
if q then
  redis.call('HSET', qkey(q), 'received_at', ARGV[3])
  redis.call('HINCRBY', qkey(q), 'repeats', 1)
else
  local id = redis.call('INCR', P .. 'seq:quarantine')
  q = string.format('%016d', id)
  redis.call('HSET', qkey(q), 'source', ARGV[1], 'digest', ARGV[2], 'received_at', ARGV[3],
    'repeats', 1, 'error', ARGV[4], 'reason', ARGV[5], 'content_type', ARGV[6],
    'size', ARGV[7], 'body', ARGV[8])
  redis.call('ZADD', P .. 'quarantine', id, q)
  redis.call('HSET', index, field, q)
end
-- The newest entry whose running total (newest first) passes a bound, and everything
-- older than it, goes.
local max_entries, max_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])
local n, total, cut = 0, 0, false
for _, kept in ipairs(redis.call('ZREVRANGE', P .. 'quarantine', 0, -1)) do
  if not cut then
    n = n + 1
    total = total + tonumber(redis.call('HGET', qkey(kept), 'size') or 0)
    cut = n > max_entries or total > max_bytes
  end
  if cut then drop(kept) end
end
return 0
"""
)

# ARGV: all ('1'|'0'), with_bodies ('1'|'0'), <q>... (sorted)
_QUARANTINED = (
    _READS
    + _QUARANTINE_COMMON
    + """
local wanted = {}
if ARGV[1] == '1' then
  wanted = redis.call('ZRANGE', P .. 'quarantine', 0, -1)
else
  for j = 3, #ARGV do wanted[#wanted + 1] = ARGV[j] end
end
local out = {}
for _, q in ipairs(wanted) do
  local h = redis.call('HMGET', qkey(q), 'source', 'received_at', 'error', 'reason',
    'content_type', 'repeats', 'size')
  if h[1] then
    local body = ''
    if ARGV[2] == '1' then body = redis.call('HGET', qkey(q), 'body') end
    out[#out + 1] = {h[1], h[2], h[3], h[4], h[5], body, q, h[6], h[7]}
  end
end
return out
"""
)

# ARGV: all ('1'|'0'), <q>...
_PURGE_QUARANTINE = (
    _SHRINKS
    + _QUARANTINE_COMMON
    + """
local count = 0
local wanted = {}
if ARGV[1] == '1' then
  wanted = redis.call('ZRANGE', P .. 'quarantine', 0, -1)
else
  for j = 2, #ARGV do wanted[#wanted + 1] = ARGV[j] end
end
for _, q in ipairs(wanted) do count = count + drop(q) end
return count
"""
)

_SINK_STATS = (
    _READS
    + """
local stats, states = {}, {}
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  local pending = redis.call('ZCARD', P .. 'pending:' .. s)
  local dead = redis.call('ZCARD', P .. 'dead:' .. s)
  if pending > 0 or dead > 0 then
    local oldest = redis.call('ZRANGE', P .. 'pending:' .. s, 0, 0, 'WITHSCORES')
    stats[#stats + 1] = {s, pending, dead, opt(oldest[2])}
  end
end
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinkstates')) do
  local h = redis.call('HMGET', P .. 'sinkstate:' .. s, 'circuit', 'open_until', 'gone')
  if h[1] then states[#states + 1] = {s, h[1], h[2], h[3]} end
end
return {stats, states}
"""
)

_COUNTS = (
    _READS
    + """
local pending, dead = 0, 0
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  pending = pending + redis.call('ZCARD', P .. 'pending:' .. s)
  dead = dead + redis.call('ZCARD', P .. 'dead:' .. s)
end
return {redis.call('ZCARD', P .. 'events'), pending, redis.call('ZCARD', P .. 'done'), dead}
"""
)

# ARGV: first minute.
_RECEIPTS = (
    _READS
    + """
local out = {}
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'minutes', ARGV[1], '+inf')) do
  out[#out + 1] = {redis.call('HGETALL', P .. 'received:' .. minute),
    redis.call('HGETALL', P .. 'duplicates:' .. minute)}
end
return out
"""
)

# ARGV: event id.
_EVENT = (
    _READS
    + """
local id = ARGV[1]
local e = redis.call('HMGET', P .. 'event:' .. id, 'source', 'envelope', 'received_at')
if not e[1] then return nil end
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', P .. 'event_deliveries:' .. id)) do
  local d = redis.call('HMGET', dkey(m), 'sink', 'state', 'attempts', 'last_status',
    'last_error', 'created_at', 'updated_at', 'next_at')
  if d[1] then
    out[#out + 1] = {m, d[1], d[2], d[3], opt(d[4]), opt(d[5]), d[6], d[7], d[8]}
  end
end
return {e[1], e[2], e[3], out}
"""
)

# ARGV: now, n, sinks to keep...
_RETIRE = (
    _SHRINKS
    + """
local now, keep, count = ARGV[1], {}, 0
for j = 3, 2 + tonumber(ARGV[2]) do keep[ARGV[j]] = true end
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  if not keep[s] then
    for _, m in ipairs(redis.call('ZRANGE', P .. 'pending:' .. s, 0, -1)) do
      redis.call('HSET', dkey(m), 'state', 'dead', 'last_error', 'sink removed',
        'updated_at', now)
      redis.call('ZADD', P .. 'dead:' .. s, now, m)
      count = count + 1
    end
    redis.call('DEL', P .. 'pending:' .. s, P .. 'queue:' .. s, P .. 'claimed:' .. s)
  end
end
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinkstates')) do
  if not keep[s] then
    redis.call('DEL', P .. 'sinkstate:' .. s)
    redis.call('SREM', P .. 'sinkstates', s)
  end
end
return count
"""
)

# ARGV: done before, now, first minute kept.
_PRUNE = (
    _SHRINKS
    + """
local deliveries, events = 0, 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', '(' .. ARGV[1])) do
  local event_id = redis.call('HGET', dkey(m), 'event_id')
  if event_id then redis.call('SREM', P .. 'event_deliveries:' .. event_id, m) end
  redis.call('DEL', dkey(m))
  redis.call('ZREM', P .. 'done', m)
  deliveries = deliveries + 1
end
-- Events whose dedupe window has passed and that no delivery still needs.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'events', '-inf', '(' .. ARGV[2])) do
  if redis.call('SCARD', P .. 'event_deliveries:' .. id) == 0 then
    redis.call('DEL', P .. 'event:' .. id)
    redis.call('ZREM', P .. 'events', id)
    events = events + 1
  end
end
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'minutes', '-inf', '(' .. ARGV[3])) do
  redis.call('DEL', P .. 'received:' .. minute, P .. 'duplicates:' .. minute)
  redis.call('ZREM', P .. 'minutes', minute)
end
-- A sink with nothing left in its sets is forgotten; accept() names it again if need be.
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  if redis.call('EXISTS', P .. 'pending:' .. s, P .. 'queue:' .. s, P .. 'claimed:' .. s,
      P .. 'dead:' .. s) == 0 then
    redis.call('SREM', P .. 'sinks', s)
  end
end
return {deliveries, events}
"""
)

# ARGV: seconds, now.
_MOVE_BACK = (
    _SHRINKS
    + """
local seconds, at, count = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
local function moved(m)
  local next_at = tonumber(redis.call('HGET', dkey(m), 'next_at'))
  if not next_at or next_at <= at then return nil end
  local value = math.max(next_at - seconds, at)
  redis.call('HSET', dkey(m), 'next_at', value)
  count = count + 1
  return value
end
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  local queue = P .. 'queue:' .. s
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', queue, '(' .. ARGV[2], '+inf')) do
    local value = moved(m)
    if value then redis.call('ZADD', queue, value, m) end
  end
  -- Claimed ones go back to the queue at their new time when their claim ends.
  for _, m in ipairs(redis.call('ZRANGE', P .. 'claimed:' .. s, 0, -1)) do moved(m) end
end
return count
"""
)


def _selection_args(selection: Selection) -> list[str]:
    if not (selection.everything or selection.sink is not None or selection.event_ids):
        raise ValueError("select --all, a sink, or event ids")
    return [
        "1" if selection.sink is not None else "0",
        selection.sink or "",
        str(len(selection.event_ids)),
        *selection.event_ids,
    ]


class RedisStore:
    @classmethod
    def from_config(cls, config: RedisStoreConfig, *, dedupe_window: float) -> RedisStore:
        return cls(
            config.url,
            prefix=config.prefix,
            dedupe_window=dedupe_window,
            socket_timeout=config.socket_timeout,
            connect_timeout=config.connect_timeout,
        )

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "relay",
        dedupe_window: float,
        socket_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix must be non-empty, without braces: {prefix!r}")
        self.url = url
        self.prefix = prefix
        self.dedupe_window = dedupe_window
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._tag = f"{{{prefix}}}:"
        self._where = f"{_redacted(url)} (prefix {prefix!r})"
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._closed = False
        # Claims this process holds: delivery id -> lease end. release() moves them to
        # _released, which the next claim/next_due_at/settle script applies first: the
        # contract's release() is synchronous and must count before the next claim.
        self._held: dict[int, float] = {}
        self._released: dict[int, float] = {}

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self, *, exclusive: bool = False, create: bool = True) -> None:
        """Connect and check (or, with `create`, make) the store's marker. `exclusive`
        takes nothing: claims live in Redis, so relays sharing a prefix do not send the
        same delivery twice."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._client is not None:
            return
        # No retries inside redis-py: a script whose answer was lost may have run, and
        # running it again would, e.g., claim more. The caller's retry (a sender's, after
        # a 503) is safe: accept() deduplicates.
        client = Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        try:
            meta = self._tag + "meta"
            if create:
                await client.hsetnx(meta, "schema", SCHEMA_VERSION)
            version = await client.hget(meta, "schema")
            if version is None:
                raise StoreUnavailable(
                    f"no store at {self._where} (is --config, or RELAY_CONFIG, the"
                    " service's config file?)"
                )
            if int(version) > SCHEMA_VERSION:
                raise StoreTooNew(
                    f"the store at {self._where} has schema version {int(version)} but"
                    f" this relay knows up to {SCHEMA_VERSION}: it was written by a newer"
                    " relay; upgrade relay"
                )
        except BaseException as exc:
            await client.aclose()
            if isinstance(exc, RedisError):
                self._unavailable(exc)
            raise
        self._client = client
        self._scripts = {
            name: client.register_script(text)
            for name, text in {
                "accept": _ACCEPT,
                "claim": _CLAIM,
                "release": _RELEASE,
                "next_due": _NEXT_DUE,
                "settle": _SETTLE,
                "dead_letters": _DEAD_LETTERS,
                "replay": _REPLAY,
                "purge": _PURGE,
                "quarantine": _QUARANTINE,
                "quarantined": _QUARANTINED,
                "purge_quarantine": _PURGE_QUARANTINE,
                "sink_stats": _SINK_STATS,
                "counts": _COUNTS,
                "receipts": _RECEIPTS,
                "event": _EVENT,
                "retire": _RETIRE,
                "prune": _PRUNE,
                "move_back": _MOVE_BACK,
            }.items()
        }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._released:
                # Given back before closing: due again now, not when their lease ends.
                releases = self._take_releases()
                await self._scripts["release"](
                    keys=[self._tag], args=[str(len(releases) // 2), *releases], client=client
                )
        except RedisError:
            pass  # then their leases run out; nothing is lost
        finally:
            await client.aclose()

    def _unavailable(self, exc: Exception) -> NoReturn:
        raise StoreUnavailable(f"redis at {self._where}: {exc}") from exc

    async def _run(self, name: str, args: Sequence[str | bytes]) -> Any:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._client is None:
            raise StoreUnavailable("store is not open")
        try:
            return await self._scripts[name](keys=[self._tag], args=args)
        except RedisError as exc:
            # Unreachable, out of memory, a read-only replica: Redis ran none of it.
            self._unavailable(exc)

    @property
    def client(self) -> Redis:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._client is None:
            raise StoreUnavailable("store is not open")
        return self._client

    def _take_releases(self) -> list[str]:
        releases = [x for i, end in self._released.items() for x in (_pad(i), _num(end))]
        self._released = {}
        return releases

    async def _run_releasing(self, name: str, before: Sequence[str], after: Sequence[str]) -> Any:
        """Run a script that applies the pending releases first; if it fails they stay
        pending for the next one."""
        taken = dict(self._released)
        releases = self._take_releases()
        try:
            return await self._run(name, [*before, str(len(taken)), *releases, *after])
        except BaseException:
            self._released = {**taken, **self._released}
            raise

    # --- ingest ------------------------------------------------------------------------

    async def accept(self, events: Sequence[NewEvent], now: float | None = None) -> AcceptResult:
        """Claim each id for the dedupe window and enqueue its deliveries, in one script:
        all of it is stored, or (StoreUnavailable) none of it."""
        at = time.time() if now is None else now
        args: list[str] = [
            _num(at),
            _num(at + self.dedupe_window),
            events[0].source if events else "",
            str(int(at // 60)),
            str(len(events)),
        ]
        for event in events:
            args += [event.id, event.source, event.envelope, str(len(event.sinks)), *event.sinks]
        flags = await self._run("accept", args)
        accepted: list[str] = []
        duplicates: list[str] = []
        for event, duplicate in zip(events, flags, strict=True):
            (duplicates if duplicate else accepted).append(event.id)
        return AcceptResult(accepted, duplicates)

    async def seen(self, ids: Sequence[str], now: float | None = None) -> set[str]:
        """Which of `ids` are claimed within their dedupe window: would be duplicates."""
        at = time.time() if now is None else now
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for event_id in ids:
                    pipe.hget(f"{self._tag}event:{event_id}", "expires_at")
                found = await pipe.execute()
        except RedisError as exc:
            self._unavailable(exc)
        return {i for i, expires in zip(ids, found, strict=True) if expires and float(expires) > at}

    async def queued(self, sinks: Collection[str]) -> dict[str, int]:
        names = list(sinks)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for sink in names:
                    pipe.zcard(f"{self._tag}pending:{sink}")
                counts = await pipe.execute()
        except RedisError as exc:
            self._unavailable(exc)
        return dict(zip(names, (int(n) for n in counts), strict=True))

    # --- dispatch ----------------------------------------------------------------------

    async def claim(
        self, sink: str, limit: int, lease: float, now: float | None = None
    ) -> list[Delivery]:
        """Up to `limit` of `sink`'s due deliveries, oldest first (next_at, then id), held
        for `lease` seconds in `claimed:<sink>`, where anyone may take them over once the
        lease has run out."""
        at = time.time() if now is None else now
        if limit <= 0:
            return []
        until = at + lease
        rows = await self._run_releasing("claim", [sink, _num(at), _num(until), str(limit)], [])
        # Forget claims whose lease ended: another holder may have them now.
        self._held = {i: end for i, end in self._held.items() if end > at}
        taken = []
        for member, event_id, attempts, created_at, envelope in rows:
            delivery_id = int(member)
            self._held[delivery_id] = until
            taken.append(
                Delivery(
                    delivery_id,
                    _str(event_id),
                    sink,
                    int(attempts),
                    float(created_at),
                    _str(envelope),
                )
            )
        return taken

    def release(self, ids: Collection[int]) -> None:
        """Give back claims that will not be settled: the next claim, next_due_at or
        settle of this store (or its close) returns them to the queue, before it does
        anything else. Only claims still held under the lease this store gave them are
        touched; a holder that dies before then leaves them to run out their lease."""
        for delivery_id in ids:
            end = self._held.pop(delivery_id, None)
            if end is not None:
                self._released[delivery_id] = end

    async def next_due_at(self, sink: str) -> float | None:
        """When `sink`'s next unclaimed pending delivery is due, if it has one."""
        due = await self._run_releasing("next_due", [sink, _num(time.time())], [])
        return None if due is None else float(due)

    async def settle(self, settlements: Sequence[Settlement], now: float | None = None) -> None:
        at = time.time() if now is None else now
        args: list[str] = []
        for s in settlements:
            if s.state not in ("pending", "done", "dead"):
                raise ValueError(f"no such delivery state: {s.state!r}")
            args += [
                _pad(s.delivery_id),
                s.state,
                _num(s.next_at),
                "1" if s.attempted else "0",
                "0" if s.status is None else "1",
                "" if s.status is None else str(int(s.status)),
                "0" if s.error is None else "1",
                s.error or "",
            ]
        await self._run_releasing("settle", [_num(at)], args)
        # Recorded: whatever comes of them next is the store's, not the claim's.
        for s in settlements:
            self._held.pop(s.delivery_id, None)

    async def save_sink_state(
        self, sink: str, circuit: str, open_until: float, gone: bool, now: float | None = None
    ) -> None:
        at = time.time() if now is None else now
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    f"{self._tag}sinkstate:{sink}",
                    mapping={
                        "circuit": circuit,
                        "open_until": _num(open_until),
                        "gone": "1" if gone else "0",
                        "updated_at": _num(at),
                    },
                )
                pipe.sadd(f"{self._tag}sinkstates", sink)
                await pipe.execute()
        except RedisError as exc:
            self._unavailable(exc)

    async def move_schedule_back(self, seconds: float, now: float | None = None) -> int:
        """After the wall clock stepped back by `seconds`: pending deliveries scheduled
        for later are due that much sooner, but no sooner than now."""
        at = time.time() if now is None else now
        return int(await self._run("move_back", [_num(seconds), _num(at)]))

    # --- dead letters ------------------------------------------------------------------

    async def dead_letters(self, selection: Selection) -> list[DeadLetter]:
        """Oldest first: by the time they died (updated_at), then id."""
        rows = await self._run("dead_letters", _selection_args(selection))
        letters = [
            DeadLetter(
                int(member),
                _str(event_id),
                _str(sink),
                int(attempts),
                _opt_int(status),
                _opt_str(error),
                float(updated_at),
                _str(envelope),
            )
            for member, event_id, sink, attempts, status, error, updated_at, envelope in rows
        ]
        letters.sort(key=lambda x: (x.dead_since, x.delivery_id))
        return letters

    async def replay(self, selection: Selection, now: float | None = None) -> int:
        """Make dead letters pending again, due now, with a fresh attempt budget."""
        at = time.time() if now is None else now
        return int(await self._run("replay", [_num(at), *_selection_args(selection)]))

    async def purge(self, selection: Selection) -> int:
        """Delete dead letters; their events go with the next prune once unreferenced."""
        return int(await self._run("purge", _selection_args(selection)))

    # --- quarantine --------------------------------------------------------------------

    async def quarantine(self, entry: Quarantined, max_entries: int, max_bytes: int) -> None:
        """Keep an unusable body (a body already kept is counted again, not stored
        twice), then drop the oldest entries beyond `max_entries` or `max_bytes`."""
        await self._run(
            "quarantine",
            [
                entry.source,
                hashlib.sha256(entry.body).hexdigest(),
                _num(entry.received_at),
                entry.error,
                entry.reason,
                entry.content_type,
                str(len(entry.body)),
                entry.body,
                str(max_entries),
                str(max_bytes),
            ],
        )

    async def quarantined(
        self, ids: Sequence[int] | None = None, *, with_bodies: bool = True
    ) -> list[Quarantined]:
        """Entries oldest first: all (`ids` None), or those with these ids."""
        wanted = [] if ids is None else [_pad(i) for i in sorted(set(ids))]
        rows = await self._run(
            "quarantined", ["1" if ids is None else "0", "1" if with_bodies else "0", *wanted]
        )
        return [
            Quarantined(
                _str(source),
                float(received_at),
                _str(error),
                _str(reason),
                _str(content_type),
                bytes(body),
                int(member),
                int(repeats),
                int(size),
            )
            for (source, received_at, error, reason, content_type, body, member, repeats, size) in (
                rows
            )
        ]

    async def purge_quarantine(self, ids: Sequence[int] | None) -> int:
        """Delete quarantined bodies: those with these ids, or every one (`ids` None)."""
        wanted = [] if ids is None else [_pad(i) for i in set(ids)]
        return int(await self._run("purge_quarantine", ["1" if ids is None else "0", *wanted]))

    # --- what operators look at --------------------------------------------------------

    async def sink_stats(self, now: float | None = None) -> dict[str, SinkStats]:
        at = time.time() if now is None else now
        per_sink, states = await self._run("sink_stats", [])
        stats: dict[str, SinkStats] = {}
        for sink, pending, dead, oldest in per_sink:
            stats[_str(sink)] = SinkStats(
                pending=int(pending),
                oldest_pending_s=at - float(oldest[0]) if oldest else 0.0,
                dead=int(dead),
            )
        for sink, circuit, open_until, gone in states:
            name = _str(sink)
            current = stats.get(name, SinkStats())
            stats[name] = SinkStats(
                pending=current.pending,
                oldest_pending_s=current.oldest_pending_s,
                dead=current.dead,
                circuit=_str(circuit),
                open_until=float(open_until),
                gone=gone == b"1",
            )
        return stats

    async def receipts_since(self, since: float) -> dict[str, tuple[int, int]]:
        """Per source: (events received, of which duplicates) since `since`."""
        rows = await self._run("receipts", [str(int(since // 60))])
        totals: dict[str, list[int]] = {}
        for received, duplicates in rows:
            for column, flat in ((0, received), (1, duplicates)):
                for source, count in zip(flat[::2], flat[1::2], strict=True):
                    totals.setdefault(_str(source), [0, 0])[column] += int(count)
        return {source: (r, d) for source, (r, d) in totals.items()}

    async def counts(self) -> dict[str, int]:
        """Events, and deliveries by state where there are any (as SQLite's GROUP BY)."""
        events, pending, done, dead = await self._run("counts", [])
        result = {"events": int(events)}
        for state, n in (("pending", pending), ("done", done), ("dead", dead)):
            if n:
                result[state] = int(n)
        return result

    async def event(self, event_id: str) -> EventRecord | None:
        found = await self._run("event", [event_id])
        if found is None:
            return None
        source, envelope, received_at, rows = found
        deliveries: list[tuple[str, int, DeliveryRecord]] = []
        for member, sink, state, attempts, status, error, created, updated, next_at in rows:
            record = DeliveryRecord(
                _str(sink),
                _str(state),  # type: ignore[arg-type]  # the scripts write only the three states
                int(attempts),
                _opt_int(status),
                _opt_str(error),
                float(created),
                float(updated),
                float(next_at),
            )
            deliveries.append((record.sink, int(member), record))
        # As SQLite's ORDER BY sink, id.
        deliveries.sort(key=lambda row: (row[0], row[1]))
        return EventRecord(
            event_id,
            _str(source),
            _str(envelope),
            float(received_at),
            tuple(record for _, _, record in deliveries),
        )

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except RedisError as exc:
            self._unavailable(exc)

    async def health(self, min_free_bytes: int) -> str | None:
        """What keeps Redis from taking events soon: unreachable; a `maxmemory` with less
        than `min_free_bytes` left (Redis then refuses writes, as SQLite does on a full
        disk); or an eviction policy, under which Redis drops stored events to make
        room. Without `maxmemory`, Redis takes what the machine has and this says
        nothing of memory."""
        try:
            memory = await self.client.info("memory")
        except (RedisError, StoreUnavailable) as exc:
            return f"redis at {self._where} is unavailable: {exc}"
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        if policy != "noeviction":
            return (
                f"redis at {self._where} has maxmemory-policy {policy}: it may evict stored"
                " events; set it to noeviction"
            )
        limit = int(memory.get("maxmemory", 0))
        if limit:
            free = limit - int(memory.get("used_memory", 0))
            if free < min_free_bytes:
                return f"the store's memory is nearly full ({max(free, 0)} bytes free)"
        return None

    # --- housekeeping ------------------------------------------------------------------

    async def retire_sinks(self, keep: Collection[str], now: float | None = None) -> int:
        """Dead-letter the pending deliveries of every sink not in `keep`, with the reason
        `sink removed`, and forget those sinks' saved state."""
        at = time.time() if now is None else now
        names = list(keep)
        return int(await self._run("retire", [_num(at), str(len(names)), *names]))

    async def prune(self, keep_done: float, now: float | None = None) -> tuple[int, int]:
        """Drop finished deliveries older than `keep_done`, then events whose dedupe
        window has passed and that no delivery still needs, and old receipts. Returns
        (deliveries, events)."""
        at = time.time() if now is None else now
        deliveries, events = await self._run(
            "prune", [_num(at - keep_done), _num(at), str(int((at - RECEIPTS_KEPT) // 60))]
        )
        return int(deliveries), int(events)


def _meets_the_contract(store: RedisStore) -> Store:
    return store  # mypy checks here that RedisStore implements every protocol of Store
