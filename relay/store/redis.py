"""The store on Redis (7.0 or newer), for relays that share one store across replicas.

Every write is one Lua script, which Redis runs atomically: an `accept()` claims its ids,
stores its events and queues their deliveries in one step, or (Redis unreachable, out of
memory, read-only) in none, and the caller gets StoreUnavailable. Scripts that may grow
the store carry `#!lua` so that Redis refuses them up front at maxmemory instead of
failing them half-way; those that only move, end or delete work (claims, settlements,
prune, heartbeats) carry `flags=allow-oom`, so a full Redis still drains. Durability is
Redis's: run it with `appendonly yes` (`appendfsync everysec` or `always`) and with
`maxmemory-policy noeviction`, since an evicted key is a lost event; warnings() and
health() say when it is not so.

Times are the callers' (`now`), never Redis's clock: leases and schedules are judged by
the relays' clocks (keep them in sync), and the tests can drive time. Timestamps are
stored as Python's `repr` of the float, which reads back exactly.

Key layout. Every key starts with `{<prefix>}:` (default `{relay}:`): one hash tag, so on
Redis Cluster all keys share a slot and every script can touch any of them. The scripts
get that tag as their only KEYS entry and build the other names from it. `<d>` is a
delivery id zero-padded to 16 digits, so that members of equal score sort by id; `<t>`
is a relay's token (RedisStore.token, one per process and store).

    meta                    hash: schema version; its existence means "a store is here"
    seq:delivery            INCR counter of delivery ids
    event:<id>              hash: source, envelope, received_at, expires_at (dedupe claim)
    events                  zset: event id by expires_at (prune, counts, export)
    event_deliveries:<id>   set: the <d> of the event's deliveries
    delivery:<d>            hash: event_id, sink, state (pending|done|dead|coalesced),
                            attempts, next_at, created_at, updated_at, last_status?,
                            last_error?, holder? (the <t> whose claim it is, or was
                            last); for a sink with `order: per_key` also order_key,
                            order_at, blocking_since? (its first failed attempt),
                            released? (when a claim reported that it stopped blocking)
    sinks                   set: sink names that have (had) deliveries
    pending:<sink>          zset: every pending <d> of the sink by created_at
    queue:<sink>            zset: pending, unclaimed <d> by next_at (what claim takes)
    claimed:<sink>          zset: pending, claimed <d> by lease end
    dead:<sink>             zset: dead <d> by updated_at
    done                    zset: done and coalesced <d> (all sinks) by updated_at,
                            for prune
    coalesced:<sink>        zset: coalesced <d> by updated_at (sink_stats)
    key:<sink>:<k>          zset: the pending <d> of one object (order_key <k>) by
                            order_at: its events in order (ties: by <d>, acceptance)
    late:<sink>:<k>         zset: its done <d> by order_at (is a claim late?)
    consumer:<sink>         hash: holder <t>, until: a paced sink's one consumer
    replicas                zset: <t> by its last heartbeat
    replica:<t>             set: the sinks that relay runs
    sinkstates              set: sinks with a saved state
    sinkstate:<sink>        hash: <t> -> "circuit open_until gone", each relay's own
    minutes                 zset: minutes (unix time // 60) with receipts
    received:<minute>       hash: source -> events received that minute
    duplicates:<minute>     hash: source -> of which duplicates
    seq:quarantine          INCR counter of quarantine ids
    quarantine              zset: <q> (padded id) by id
    quarantine:<q>          hash: source, digest, received_at, repeats, error, reason,
                            content_type, size, body
    quarantine_index        hash: "<sha256>:<source>" -> <q>, a body kept once
    work                    pub/sub channel: the sinks an accept() queued for

A pending delivery is in `pending:<sink>` and in exactly one of `queue:<sink>` and
`claimed:<sink>`; one with an order_key also in its `key:<sink>:<k>`, and a done one
in its `late:<sink>:<k>` until prune drops it. Queues are sorted sets, not a Stream
with a consumer group: claim() must hand out work by next_at (retries are scheduled
into the future, and move_schedule_back() reschedules them), which a stream's arrival
order cannot express without a second structure beside it; and XAUTOCLAIM judges
idleness by Redis's clock, not the callers'. A sorted set scored by lease end gives
XAUTOCLAIM's "take over what a dead holder left" with a range query, and the `holder`
field XCLAIM's ownership: a late settle from a holder whose claim was taken over is
ignored. Claims live in Redis, so several relays share a prefix: `open(exclusive=True)`
takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from relay.config import RedisStoreConfig, redacted_url
from relay.errors import StoreTooNew, StoreUnavailable
from relay.models import Delivery
from relay.store.contract import Store
from relay.store.types import (
    AcceptResult,
    DeadLetter,
    DeliveryRecord,
    EventRecord,
    EventSummary,
    MovedDelivery,
    MovedEvent,
    NewEvent,
    Ordering,
    Quarantined,
    RecentEvents,
    Selection,
    Settlement,
    SinkStats,
)

# 2: per-object ordering (the order fields, `key:`, `late:`, `coalesced:`, the state
# coalesced). A store of version 1 opens as it is: its deliveries have no order_key, so
# no claim holds them; the serving relay then marks it 2, which older relays refuse.
SCHEMA_VERSION = 2

# Receipts older than this are pruned; `relay status` looks back one hour.
RECEIPTS_KEPT = 86400.0

# Finished deliveries one prune script deletes at most (a few milliseconds of Redis).
PRUNE_ROUND = 2000

# A relay that sent no heartbeat (Housekeeping.heartbeat) for this long is taken for
# gone: its sinks may be retired, its circuit states no longer shown.
REPLICA_TTL = 60.0


def _pad(delivery_id: int) -> str:
    return f"{delivery_id:016d}"


def _num(value: float) -> str:
    # repr round-trips: what Redis stores reads back as the very same float.
    return repr(float(value))


def _str(value: bytes) -> str:
    return value.decode("utf-8")


def _fix_for(exc: Exception) -> str:
    """What an operator does about a Redis error whose own words do not say."""
    text = str(exc)
    if any(m in text for m in ("NOAUTH", "HELLO must be called", "Authentication required")):
        return " (Redis asks for a password: put it in the url, redis://:PASSWORD@host:6379/0)"
    if "invalid username-password pair" in text or "WRONGPASS" in text:
        return (
            " (check the url's user and password: redis://:PASSWORD@host for the default"
            " user, redis://USER:PASSWORD@host for an ACL user)"
        )
    if "MOVED" in text:
        return " (a Redis Cluster: set store.cluster: true)"
    return ""


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _opt_str(value: list[bytes]) -> str | None:
    """The scripts return an optional field as [] or [value]."""
    return _str(value[0]) if value else None


def _opt_int(value: list[bytes]) -> int | None:
    return int(value[0]) if value else None


# --- scripts ---------------------------------------------------------------------------

# Shared by the scripts. Those that end claims get ARGV[1] = this holder's token and
# ARGV[2] = how many claims it gives back, which follow from ARGV[3]: `release_claims`
# applies them; `expire_claims` returns claims whose lease ended to the queue (their
# `holder` stays: a late settle from that holder still counts unless another claimed
# the delivery since).
_COMMON = """
local P = KEYS[1]
local function dkey(m) return P .. 'delivery:' .. m end
local function opt(v) if v then return {v} end return {} end
-- One object's pending deliveries to a sink, in its events' order; and its done ones.
local function okeys(sink, k) return P .. 'key:' .. sink .. ':' .. k end
local function olate(sink, k) return P .. 'late:' .. sink .. ':' .. k end
-- A pending, unclaimed delivery waits in its sink's queue; one of an object in `kqueue:`
-- instead, where an ordered claim does not have to read past every waiting event of a
-- busy object: it goes by the objects (`okeyq:`) and reads each one's `key:` set.
local function enqueue(sink, m, next_at, k)
  if k then
    redis.call('ZADD', P .. 'kqueue:' .. sink, next_at, m)
    -- Its object may have something to send now: the next ordered claim looks.
    redis.call('ZADD', P .. 'okeyq:' .. sink, 'LT', 0, k)
  else
    redis.call('ZADD', P .. 'queue:' .. sink, next_at, m)
  end
end
local function dequeue(sink, m)
  redis.call('ZREM', P .. 'queue:' .. sink, m)
  redis.call('ZREM', P .. 'kqueue:' .. sink, m)
end
local TOKEN = ARGV[1]
-- Claims this holder gives back: <d>s from ARGV[first]; a claim since taken over by
-- another holder is left alone.
local function release_claims(first, count)
  for i = first, first + count - 1 do
    local m = ARGV[i]
    local d = redis.call('HMGET', dkey(m), 'sink', 'state', 'next_at', 'holder', 'order_key')
    if d[1] and d[4] == TOKEN then
      redis.call('HDEL', dkey(m), 'holder')
      if redis.call('ZREM', P .. 'claimed:' .. d[1], m) == 1 and d[2] == 'pending' then
        enqueue(d[1], m, d[3], d[5])
      end
    end
  end
  return first + count
end
local function expire_claims(sink, now)
  local claimed = P .. 'claimed:' .. sink
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', claimed, '-inf', now)) do
    redis.call('ZREM', claimed, m)
    local d = redis.call('HMGET', dkey(m), 'state', 'next_at', 'order_key')
    if d[1] == 'pending' then enqueue(sink, m, d[2], d[3]) end
  end
end
-- Relays that sent no heartbeat since `cutoff` are gone (stopped, or killed): their
-- sinks and their circuit states no longer count.
local function forget_gone_replicas(cutoff)
  local gone = redis.call('ZRANGEBYSCORE', P .. 'replicas', '-inf', '(' .. cutoff)
  if #gone == 0 then return end
  local states = redis.call('SMEMBERS', P .. 'sinkstates')
  for _, t in ipairs(gone) do
    redis.call('ZREM', P .. 'replicas', t)
    redis.call('DEL', P .. 'replica:' .. t)
    for _, s in ipairs(states) do redis.call('HDEL', P .. 'sinkstate:' .. s, t) end
  end
  for _, s in ipairs(states) do
    if redis.call('EXISTS', P .. 'sinkstate:' .. s) == 0 then
      redis.call('SREM', P .. 'sinkstates', s)
    end
  end
end
local function heartbeat(now, first)
  redis.call('ZADD', P .. 'replicas', now, TOKEN)
  local rk = P .. 'replica:' .. TOKEN
  redis.call('DEL', rk)
  for j = first, #ARGV do redis.call('SADD', rk, ARGV[j]) end
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
# order_key ('' for none), order_at, number of sinks, then per sink: its name and
# whether it orders by object ('1'|'0'). Returns 1 (duplicate) or 0 (accepted) per
# event.
_ACCEPT = (
    _WRITES
    + """
local now, expires, source, minute = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local at, n = tonumber(now), tonumber(ARGV[5])
local i, out, taken, dups, queued = 6, {}, {}, 0, {}
for e = 1, n do
  local id, src, envelope, okey, order_at = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  local nsinks = tonumber(ARGV[i + 5])
  local first_sink = i + 6
  i = first_sink + 2 * nsinks
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
    for j = first_sink, first_sink + 2 * nsinks - 1, 2 do
      local sink = ARGV[j]
      if not has[sink] then
        has[sink] = true
        local m = string.format('%016d', redis.call('INCR', P .. 'seq:delivery'))
        redis.call('HSET', dkey(m), 'event_id', id, 'sink', sink, 'state', 'pending',
          'attempts', 0, 'next_at', now, 'created_at', now, 'updated_at', now)
        redis.call('SADD', P .. 'event_deliveries:' .. id, m)
        redis.call('ZADD', P .. 'pending:' .. sink, now, m)
        if ARGV[j + 1] == '1' then
          redis.call('HSET', dkey(m), 'order_key', okey, 'order_at', order_at)
          redis.call('ZADD', okeys(sink, okey), order_at, m)
          enqueue(sink, m, now, okey)
        else
          enqueue(sink, m, now)
        end
        redis.call('SADD', P .. 'sinks', sink)
        queued[sink] = true
      end
    end
  end
end
local woken = {}
for sink in pairs(queued) do woken[#woken + 1] = sink end
if #woken > 0 then
  -- The relays' lanes for these sinks look now, not at their next poll.
  redis.call('PUBLISH', P .. 'work', table.concat(woken, ' '))
end
if n > 0 then
  redis.call('HINCRBY', P .. 'received:' .. minute, source, n)
  redis.call('HINCRBY', P .. 'duplicates:' .. minute, source, dups)
  redis.call('ZADD', P .. 'minutes', minute, minute)
end
return out
"""
)

# ARGV: token, n releases, releases..., sink, now, lease end, limit, exclusive ('1'|'0'),
# ordered ('1'|'0'), order timeout, coalesce ('1'|'0'). A row per delivery taken: <d>,
# event id, attempts, created_at, envelope; ordered, one with an order_key adds late
# ('1'|'0'), the event ids it supersedes, and {event id, blocking_since} per delivery
# it overtakes.
_CLAIM = (
    _SHRINKS
    + """
local i = release_claims(3, tonumber(ARGV[2]))
local sink, now, lease_end, limit = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
if ARGV[i + 4] == '1' then
  -- One consumer at a time for this sink (a paced one), whoever holds `consumer:`.
  local ck = P .. 'consumer:' .. sink
  local c = redis.call('HMGET', ck, 'holder', 'until')
  if c[1] and c[1] ~= TOKEN and tonumber(c[2]) > tonumber(now) then return {} end
  redis.call('HSET', ck, 'holder', TOKEN, 'until', lease_end)
end
expire_claims(sink, now)
local at = tonumber(now)
local queue, kqueue, claimed = P .. 'queue:' .. sink, P .. 'kqueue:' .. sink,
  P .. 'claimed:' .. sink
local out = {}
-- Hands out `m`, already out of its queue, unless there is nothing to send; `ordered`:
-- with what an ordered claim adds.
local function take(m, ordered, supersedes, overtakes)
  local d = redis.call('HMGET', dkey(m), 'event_id', 'attempts', 'created_at', 'order_at',
    'order_key', 'released')
  local envelope = d[1] and redis.call('HGET', P .. 'event:' .. d[1], 'envelope')
  if not d[1] then
    -- Its record is gone (deleted by hand, or evicted): nothing to send or to keep.
    redis.call('ZREM', P .. 'pending:' .. sink, m)
    return false
  elseif envelope then
    redis.call('ZADD', claimed, lease_end, m)
    redis.call('HSET', dkey(m), 'holder', TOKEN)
    local row = {m, d[1], d[2], d[3], envelope}
    if ordered and d[5] then
      -- Late: a later event of its object was delivered before it.
      local later = redis.call('ZRANGEBYSCORE', olate(sink, d[5]), '(' .. d[4], '+inf',
        'LIMIT', 0, 1)
      row[6], row[7], row[8] = #later > 0 and '1' or '0', supersedes, overtakes
      -- Released by order_timeout: it holds its object no more.
      row[9] = d[6] and '1' or '0'
    end
    out[#out + 1] = row
    return true
  else
    -- Nothing to send (an event deleted by hand): a dead letter that says so, not an
    -- empty body sent as if it were the event.
    redis.call('HSET', dkey(m), 'state', 'dead', 'last_error', 'its event is missing',
      'updated_at', now)
    redis.call('ZREM', P .. 'pending:' .. sink, m)
    redis.call('ZADD', P .. 'dead:' .. sink, now, m)
    if d[5] then redis.call('ZREM', okeys(sink, d[5]), m) end
    return false
  end
end
if ARGV[i + 5] ~= '1' then
  -- Both queues as one: by next_at, then id.
  local a = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  local b = redis.call('ZRANGEBYSCORE', kqueue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  local x, y = 1, 1
  for _ = 1, limit do
    local sa, sb = tonumber(a[x + 1]), tonumber(b[y + 1])
    if sa and (not sb or sa < sb or (sa == sb and a[x] < b[y])) then
      redis.call('ZREM', queue, a[x])
      take(a[x])
      x = x + 2
    elseif sb then
      redis.call('ZREM', kqueue, b[y])
      take(b[y])
      y = y + 2
    else
      break
    end
  end
  return out
end

-- In order (order: per_key): of each object, only the delivery its events' order allows,
-- and none while one of the object is claimed, by this relay or another. Objects are
-- read from `okeyq:`, scored by when a claim must look at them again (0: at once);
-- each object read is scored anew below.
local function time(v)
  if v == math.huge then return '+inf' end
  return string.format('%.17g', v)
end
local cutoff, coalesce = at - tonumber(ARGV[i + 6]), ARGV[i + 7] == '1'
local okeyq = P .. 'okeyq:' .. sink
-- Those scores hold for one timeout and mode: after a change (a reload), look at all.
local mode = ARGV[i + 6] .. ' ' .. ARGV[i + 7]
if redis.call('HGET', P .. 'ordering', sink) ~= mode then
  redis.call('HSET', P .. 'ordering', sink, mode)
  if redis.call('EXISTS', okeyq) == 1 then
    redis.call('ZUNIONSTORE', okeyq, 1, okeyq, 'WEIGHTS', 0)
  end
end
-- An object with a claim out goes again once that claim ends (settled, released or run
-- out: each puts its object back to 0).
local busy = {}
local out_now = redis.call('ZRANGE', claimed, 0, -1, 'WITHSCORES')
for j = 1, #out_now, 2 do
  local k = redis.call('HGET', dkey(out_now[j]), 'order_key')
  if k then busy[k] = out_now[j + 1] end
end
-- The object's first events up to the first that still blocks it (pending, not yet
-- failed, or failed less than the timeout ago, and not reported released): of those,
-- the one due first goes, past the ones before it that held the object too long.
-- Returns when to look at the object again, or nil when it has nothing pending.
local function first(k)
  local ks = okeys(sink, k)
  local best, best_at, best_place, passed, stale = nil, 0, 0, {}, {}
  local again, start, walking, seen = math.huge, 0, true, 0
  while walking do
    local members = redis.call('ZRANGE', ks, start, start + 15)
    if #members == 0 then break end
    start = start + #members
    for _, p in ipairs(members) do
      local h = redis.call('HMGET', dkey(p), 'state', 'next_at', 'blocking_since', 'released',
        'event_id')
      if h[1] ~= 'pending' then
        stale[#stale + 1] = p  -- ended by a relay that keeps no `key:` sets
      else
        seen = seen + 1
        local next_at = tonumber(h[2])
        if next_at > at then
          again = math.min(again, next_at)
        elseif not best or next_at < best_at or (next_at == best_at and p < best) then
          best, best_at, best_place = p, next_at, #passed
        end
        if not h[4] then
          local since = h[3] and tonumber(h[3])
          if since and since <= cutoff then
            passed[#passed + 1] = {p, h[5], h[3]}
          else
            if since then again = math.min(again, since + at - cutoff) end
            walking = false
            break
          end
        end
      end
    end
  end
  for _, p in ipairs(stale) do redis.call('ZREM', ks, p) end
  if seen == 0 then return nil end
  if not best then return time(again) end
  local overtakes = {}
  for j = 1, best_place do overtakes[j] = {passed[j][2], passed[j][3]} end
  redis.call('ZREM', kqueue, best)
  if not take(best, true, {}, overtakes) then return '0' end
  -- Reported once: from now on they hold nothing up, and are not reported again.
  for j = 1, best_place do redis.call('HSET', dkey(passed[j][1]), 'released', now) end
  return lease_end
end
-- coalesce: the object's newest event, if due, stands in for all its others.
local function newest(k)
  local ks = okeys(sink, k)
  local live = {}
  for _, p in ipairs(redis.call('ZRANGE', ks, 0, -1)) do
    local h = redis.call('HMGET', dkey(p), 'state', 'next_at', 'event_id')
    if h[1] == 'pending' then live[#live + 1] = {p, h[2], h[3]}
    else redis.call('ZREM', ks, p) end
  end
  local top = live[#live]
  if not top then return nil end
  if tonumber(top[2]) > at then return top[2] end
  local supersedes = {}
  for j = 1, #live - 1 do supersedes[j] = live[j][3] end
  redis.call('ZREM', kqueue, top[1])
  if not take(top[1], true, supersedes, {}) then return '0' end
  for j = 1, #live - 1 do
    local p = live[j][1]
    redis.call('HSET', dkey(p), 'state', 'coalesced', 'updated_at', now,
      'last_error', 'coalesced: a newer event of its object went instead')
    redis.call('HDEL', dkey(p), 'holder')
    redis.call('ZREM', P .. 'pending:' .. sink, p)
    redis.call('ZREM', kqueue, p)
    redis.call('ZREM', ks, p)
    redis.call('ZADD', P .. 'done', now, p)
    redis.call('ZADD', P .. 'coalesced:' .. sink, now, p)
  end
  return lease_end
end
-- Deliveries without an object and objects due for a look, merged by time; the objects
-- are scored anew after the walk, so that its pages stay put.
local plain = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local page, offset, x, y = 256, 0, 1, 1
local keys = redis.call('ZRANGEBYSCORE', okeyq, '-inf', now, 'WITHSCORES', 'LIMIT', 0, page)
local rescored = {}
while #out < limit do
  if y > #keys and #keys == 2 * page then
    offset = offset + page
    keys = redis.call('ZRANGEBYSCORE', okeyq, '-inf', now, 'WITHSCORES', 'LIMIT', offset, page)
    y = 1
  end
  local sa, sb = tonumber(plain[x + 1]), tonumber(keys[y + 1])
  if sa and (not sb or sa <= sb) then
    redis.call('ZREM', queue, plain[x])
    take(plain[x])
    x = x + 2
  elseif sb then
    local k = keys[y]
    y = y + 2
    local again = busy[k]
    if not again then
      if coalesce then again = newest(k) else again = first(k) end
    end
    rescored[#rescored + 1] = {k, again}
  else
    break
  end
end
for _, r in ipairs(rescored) do
  if r[2] then redis.call('ZADD', okeyq, r[2], r[1])
  else redis.call('ZREM', okeyq, r[1]) end
end
return out
"""
)

# ARGV: token, n releases, releases..., sink, now, lease end, <d>... Extends this
# holder's claims among the <d>s (and its hold on the sink's consumer); returns the <d>s
# another holder has claimed since.
_RENEW = (
    _SHRINKS
    + """
local i = release_claims(3, tonumber(ARGV[2]))
local sink, lease_end = ARGV[i], ARGV[i + 2]
local claimed, lost = P .. 'claimed:' .. sink, {}
for j = i + 3, #ARGV do
  local m = ARGV[j]
  local d = redis.call('HMGET', dkey(m), 'holder', 'state')
  if d[1] == TOKEN and redis.call('ZSCORE', claimed, m) then
    redis.call('ZADD', claimed, 'XX', lease_end, m)
  elseif d[2] == 'pending' and d[1] and d[1] ~= TOKEN then
    -- Another relay holds it now: this send is a second one. (Settled meanwhile, or
    -- back in the queue unclaimed, is nothing lost.)
    lost[#lost + 1] = m
  end
end
local ck = P .. 'consumer:' .. sink
if redis.call('HGET', ck, 'holder') == TOKEN then redis.call('HSET', ck, 'until', lease_end) end
return lost
"""
)

# ARGV: token, n releases, releases..., sinks whose consumer this holder gives up...
# (applied alone, at close).
_RELEASE = (
    _SHRINKS
    + """
local i = release_claims(3, tonumber(ARGV[2]))
for j = i, #ARGV do
  local ck = P .. 'consumer:' .. ARGV[j]
  if redis.call('HGET', ck, 'holder') == TOKEN then redis.call('DEL', ck) end
end
return 0
"""
)

# ARGV: token, n releases, releases..., sink, now.
_NEXT_DUE = (
    _SHRINKS
    + """
local i = release_claims(3, tonumber(ARGV[2]))
expire_claims(ARGV[i], ARGV[i + 1])
local first = redis.call('ZRANGE', P .. 'queue:' .. ARGV[i], 0, 0, 'WITHSCORES')[2]
local keyed = redis.call('ZRANGE', P .. 'kqueue:' .. ARGV[i], 0, 0, 'WITHSCORES')[2]
if keyed and (not first or tonumber(keyed) < tonumber(first)) then return keyed end
return first
"""
)

# ARGV: token, n releases, releases..., now, then per settlement: <d>, state, next_at,
# attempted, has_status, status, has_error, error, attempts before ('' for any). A
# settlement applies to a pending delivery that no other holder has claimed since: what
# another holder sends now, or has settled already, is theirs to record.
_SETTLE = (
    _SHRINKS
    + """
local i = release_claims(3, tonumber(ARGV[2]))
local now = ARGV[i]
i = i + 1
while i <= #ARGV do
  local m, state, next_at, attempted = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local has_status, status, has_error, err = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local expected = ARGV[i + 8]
  i = i + 9
  local k = dkey(m)
  local d = redis.call('HMGET', k, 'sink', 'created_at', 'state', 'holder', 'attempts',
    'order_key', 'order_at')
  local sink = d[1]
  local ours = d[4] == TOKEN or not (d[4] and redis.call('ZSCORE', P .. 'claimed:' .. sink, m))
  -- The attempts the settlement counts from: a settlement run twice (its answer lost,
  -- the call retried) finds them moved on and changes nothing the second time.
  local current = expected == '' or d[5] == expected
  if sink and d[3] == 'pending' and ours and current then
    redis.call('HDEL', k, 'holder')
    redis.call('ZREM', P .. 'claimed:' .. sink, m)
    dequeue(sink, m)
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
      enqueue(sink, m, next_at, d[6])
      redis.call('ZADD', P .. 'pending:' .. sink, d[2], m)
      if d[6] and attempted == '1' then
        -- A failed attempt holds its object's later events from the first failure on,
        -- for the ordered claims' timeout.
        redis.call('HSETNX', k, 'blocking_since', now)
      end
    else
      if d[6] then
        redis.call('ZREM', okeys(sink, d[6]), m)
        -- What it held up may go now.
        redis.call('ZADD', P .. 'okeyq:' .. sink, 'LT', 0, d[6])
      end
      if state == 'dead' then
        redis.call('ZADD', P .. 'dead:' .. sink, now, m)
      else
        redis.call('ZADD', P .. 'done', now, m)
        if d[6] then redis.call('ZADD', olate(sink, d[6]), d[7], m) end
      end
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
  -- A fresh start: it holds its object again until it fails, and for order_timeout.
  redis.call('HDEL', dkey(m), 'holder', 'blocking_since', 'released')
  redis.call('ZADD', P .. 'pending:' .. sink, now, m)
  local o = redis.call('HMGET', dkey(m), 'order_key', 'order_at')
  if o[1] then redis.call('ZADD', okeys(sink, o[1]), o[2], m) end
  enqueue(sink, m, now, o[1])
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

# ARGV: token (unused), cutoff. A sink's circuit as the worst any running relay
# reports (open, then half_open, then closed); gone if any says so.
_SINK_STATS = (
    _READS
    + """
local cutoff = tonumber(ARGV[2])
local stats, states = {}, {}
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  local pending = redis.call('ZCARD', P .. 'pending:' .. s)
  local dead = redis.call('ZCARD', P .. 'dead:' .. s)
  local coalesced = redis.call('ZCARD', P .. 'coalesced:' .. s)
  if pending > 0 or dead > 0 or coalesced > 0 then
    local oldest = redis.call('ZRANGE', P .. 'pending:' .. s, 0, 0, 'WITHSCORES')
    stats[#stats + 1] = {s, pending, dead, opt(oldest[2]), coalesced}
  end
end
local rank = {closed = 0, half_open = 1, open = 2}
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinkstates')) do
  local h = redis.call('HGETALL', P .. 'sinkstate:' .. s)
  local circuit, open_until, gone, found = 'closed', 0, '0', false
  for j = 1, #h, 2 do
    local seen = redis.call('ZSCORE', P .. 'replicas', h[j])
    if seen and tonumber(seen) >= cutoff then
      found = true
      local c, u, g = string.match(h[j + 1], '^(%S+) (%S+) (%S+)')
      if (rank[c] or 0) > (rank[circuit] or 0) then circuit = c end
      if tonumber(u) > open_until then open_until = tonumber(u) end
      if g == '1' then gone = '1' end
    end
  end
  if found then states[#states + 1] = {s, circuit, tostring(open_until), gone} end
end
return {stats, states}
"""
)

# ARGV: token, sink, state, now. (Allowed at maxmemory: a replica that cannot record a
# lane's state must still be able to start it.)
_SAVE_STATE = (
    _SHRINKS
    + """
redis.call('HSET', P .. 'sinkstate:' .. ARGV[2], TOKEN, ARGV[3])
redis.call('SADD', P .. 'sinkstates', ARGV[2])
redis.call('ZADD', P .. 'replicas', ARGV[4], TOKEN)
return 0
"""
)

# ARGV: token, now, cutoff, sinks this relay runs... (allowed at maxmemory: a relay that
# cannot say it is alive would have its sinks retired by the others)
_HEARTBEAT = (
    _SHRINKS
    + """
heartbeat(ARGV[2], 4)
forget_gone_replicas(ARGV[3])
return 0
"""
)

_COUNTS = (
    _READS
    + """
local pending, dead, coalesced = 0, 0, 0
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  pending = pending + redis.call('ZCARD', P .. 'pending:' .. s)
  dead = dead + redis.call('ZCARD', P .. 'dead:' .. s)
  coalesced = coalesced + redis.call('ZCARD', P .. 'coalesced:' .. s)
end
-- `done` holds the coalesced ones too (prune drops both alike).
return {redis.call('ZCARD', P .. 'events'), pending, redis.call('ZCARD', P .. 'done') - coalesced,
  dead, coalesced}
"""
)

# ARGV: first minute.
_RECEIPTS = (
    _READS
    + """
local out = {}
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'minutes', ARGV[1], '+inf')) do
  out[#out + 1] = {minute, redis.call('HGETALL', P .. 'received:' .. minute),
    redis.call('HGETALL', P .. 'duplicates:' .. minute)}
end
return out
"""
)

# ARGV: token (unused), cursor score ('+inf' for the newest), cursor id ('' for none),
# limit. Events newest first by claim (score, then id, both descending), each with its
# deliveries' sinks and states.
_RECENT = (
    _READS
    + """
local max_score, after, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local out, count = {}, 0
-- Ties (one request's events share a score) are passed by id, so a page never drops
-- the rest of a batch; ask for enough to get past them.
local extra = 0
if after ~= '' then extra = 1000 end
local batch = redis.call('ZREVRANGEBYSCORE', P .. 'events', max_score, '-inf', 'WITHSCORES',
  'LIMIT', 0, limit + extra)
local cursor_score = tonumber(max_score)
for j = 1, #batch, 2 do
  local id, score = batch[j], batch[j + 1]
  local passed = after == '' or tonumber(score) < cursor_score or id < after
  if passed and count < limit then
    local e = redis.call('HMGET', P .. 'event:' .. id, 'source', 'envelope', 'received_at')
    if e[1] then
      local states = {}
      for _, m in ipairs(redis.call('SMEMBERS', P .. 'event_deliveries:' .. id)) do
        local d = redis.call('HMGET', dkey(m), 'sink', 'state')
        if d[1] then states[#states + 1] = {d[1], d[2]} end
      end
      out[#out + 1] = {id, e[1], e[2], e[3], score, states}
      count = count + 1
    end
  end
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

# ARGV: token, now, cutoff, sinks this relay runs... A sink is retired only when no
# running relay runs it: during a rolling deploy, a relay whose config lacks a sink
# must not dead-letter the work of a sink a newer relay's config just added.
_RETIRE = (
    _SHRINKS
    + """
local now, count = ARGV[2], 0
heartbeat(now, 4)
forget_gone_replicas(ARGV[3])
local keep = {}
for _, t in ipairs(redis.call('ZRANGE', P .. 'replicas', 0, -1)) do
  for _, s in ipairs(redis.call('SMEMBERS', P .. 'replica:' .. t)) do keep[s] = true end
end
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  if not keep[s] then
    for _, m in ipairs(redis.call('ZRANGE', P .. 'pending:' .. s, 0, -1)) do
      redis.call('HSET', dkey(m), 'state', 'dead', 'last_error', 'sink removed',
        'updated_at', now)
      redis.call('HDEL', dkey(m), 'holder')
      redis.call('ZADD', P .. 'dead:' .. s, now, m)
      local k = redis.call('HGET', dkey(m), 'order_key')
      if k then redis.call('ZREM', okeys(s, k), m) end
      count = count + 1
    end
    redis.call('DEL', P .. 'pending:' .. s, P .. 'queue:' .. s, P .. 'claimed:' .. s,
      P .. 'consumer:' .. s, P .. 'kqueue:' .. s, P .. 'okeyq:' .. s)
    redis.call('HDEL', P .. 'ordering', s)
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

# ARGV: done before, now, first minute kept, at most this many deliveries: one script
# must not hold Redis for long, so a large backlog of finished work goes in rounds.
_PRUNE = (
    _SHRINKS
    + """
local deliveries, events = 0, 0
local done = redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[4])
for _, m in ipairs(done) do
  local d = redis.call('HMGET', dkey(m), 'event_id', 'sink', 'state', 'order_key')
  if d[1] then redis.call('SREM', P .. 'event_deliveries:' .. d[1], m) end
  if d[3] == 'coalesced' then redis.call('ZREM', P .. 'coalesced:' .. d[2], m)
  elseif d[4] then redis.call('ZREM', olate(d[2], d[4]), m) end
  redis.call('DEL', dkey(m))
  redis.call('ZREM', P .. 'done', m)
  deliveries = deliveries + 1
end
-- Events whose dedupe window has passed and that no delivery still needs: a round of
-- at most ARGV[4] from where the last round stopped, so that events kept for their dead
-- letters are not read again by every prune.
local cursor = tonumber(redis.call('GET', P .. 'prune:offset') or '0')
local expired = redis.call('ZRANGEBYSCORE', P .. 'events', '-inf', '(' .. ARGV[2], 'LIMIT',
  cursor, ARGV[4])
for _, id in ipairs(expired) do
  if redis.call('SCARD', P .. 'event_deliveries:' .. id) == 0 then
    redis.call('DEL', P .. 'event:' .. id)
    redis.call('ZREM', P .. 'events', id)
    events = events + 1
  end
end
if #expired < tonumber(ARGV[4]) then
  redis.call('DEL', P .. 'prune:offset')
else
  redis.call('SET', P .. 'prune:offset', cursor + #expired - events)
end
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'minutes', '-inf', '(' .. ARGV[3])) do
  redis.call('DEL', P .. 'received:' .. minute, P .. 'duplicates:' .. minute)
  redis.call('ZREM', P .. 'minutes', minute)
end
-- A sink with nothing left in its sets is forgotten; accept() names it again if need be.
for _, s in ipairs(redis.call('SMEMBERS', P .. 'sinks')) do
  if redis.call('EXISTS', P .. 'pending:' .. s, P .. 'queue:' .. s, P .. 'claimed:' .. s,
      P .. 'dead:' .. s, P .. 'coalesced:' .. s, P .. 'kqueue:' .. s,
      P .. 'okeyq:' .. s) == 0 then
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
  for _, queue in ipairs({P .. 'queue:' .. s, P .. 'kqueue:' .. s}) do
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', queue, '(' .. ARGV[2], '+inf')) do
      local value = moved(m)
      if value then redis.call('ZADD', queue, value, m) end
    end
  end
  -- When to look at each object again was judged by the clock before the step.
  local okeyq = P .. 'okeyq:' .. s
  if redis.call('EXISTS', okeyq) == 1 then
    redis.call('ZUNIONSTORE', okeyq, 1, okeyq, 'WEIGHTS', 0)
  end
  -- Claimed ones go back to the queue at their new time when their claim ends.
  for _, m in ipairs(redis.call('ZRANGE', P .. 'claimed:' .. s, 0, -1)) do moved(m) end
end
return count
"""
)


# ARGV: token (unused), start, count, now. Events from the `events` index (by expiry)
# still claimed or with a pending or dead delivery, with those deliveries; then how
# many index entries were read (0: the end).
_EXPORT = (
    _READS
    + """
local start, count, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGE', P .. 'events', start, start + count - 1)
local out = {}
for _, id in ipairs(ids) do
  local e = redis.call('HMGET', P .. 'event:' .. id, 'source', 'envelope', 'received_at',
    'expires_at')
  if e[1] then
    local moved = {}
    for _, m in ipairs(redis.call('SMEMBERS', P .. 'event_deliveries:' .. id)) do
      local d = redis.call('HMGET', dkey(m), 'sink', 'state', 'attempts', 'next_at',
        'created_at', 'updated_at', 'last_status', 'last_error', 'order_key', 'order_at')
      if d[2] == 'pending' or d[2] == 'dead' then
        moved[#moved + 1] = {m, d[1], d[2], d[3], d[4], d[5], d[6], opt(d[7]), opt(d[8]),
          opt(d[9]), d[10] or '0'}
      end
    end
    if #moved > 0 or tonumber(e[4]) > now then
      out[#out + 1] = {id, e[1], e[2], e[3], e[4], moved}
    end
  end
end
return {#ids, out}
"""
)

# ARGV: token (unused), n events, then per event: id, source, envelope, received_at,
# expires_at, n deliveries, then per delivery: sink, state, attempts, next_at,
# created_at, updated_at, has_status, status, has_error, error, has_order_key, order_key,
# order_at. An event already here
# is skipped with its deliveries. Returns the ids added.
_IMPORT = (
    _WRITES
    + """
local i, added = 3, {}
for _ = 1, tonumber(ARGV[2]) do
  local id, source, envelope, received, expires = ARGV[i], ARGV[i + 1], ARGV[i + 2],
    ARGV[i + 3], ARGV[i + 4]
  local n = tonumber(ARGV[i + 5])
  i = i + 6
  local ek = P .. 'event:' .. id
  -- Idempotent per event and sink: what a run before moved is not added twice, and an
  -- expired claim of the same id left here takes the moved work.
  local has = {}
  for _, m in ipairs(redis.call('SMEMBERS', P .. 'event_deliveries:' .. id)) do
    local s = redis.call('HGET', dkey(m), 'sink')
    if s then has[s] = true end
  end
  local fresh = redis.call('EXISTS', ek) == 0
  local any = fresh
  if fresh then
    redis.call('HSET', ek, 'source', source, 'envelope', envelope, 'received_at', received,
      'expires_at', expires)
    redis.call('ZADD', P .. 'events', expires, id)
  elseif tonumber(redis.call('HGET', ek, 'expires_at') or '0') < tonumber(expires) then
    redis.call('HSET', ek, 'expires_at', expires)
    redis.call('ZADD', P .. 'events', expires, id)
  end
  for _ = 1, n do
    local sink, state = ARGV[i], ARGV[i + 1]
    if not has[sink] then
      has[sink] = true
      any = true
      local m = string.format('%016d', redis.call('INCR', P .. 'seq:delivery'))
      redis.call('HSET', dkey(m), 'event_id', id, 'sink', sink, 'state', state,
        'attempts', ARGV[i + 2], 'next_at', ARGV[i + 3], 'created_at', ARGV[i + 4],
        'updated_at', ARGV[i + 5])
      if ARGV[i + 6] == '1' then redis.call('HSET', dkey(m), 'last_status', ARGV[i + 7]) end
      if ARGV[i + 8] == '1' then redis.call('HSET', dkey(m), 'last_error', ARGV[i + 9]) end
      -- An ordered sink's delivery keeps its object and place.
      local okey = ARGV[i + 10] == '1' and ARGV[i + 11] or nil
      if okey then redis.call('HSET', dkey(m), 'order_key', okey, 'order_at', ARGV[i + 12]) end
      redis.call('SADD', P .. 'event_deliveries:' .. id, m)
      redis.call('SADD', P .. 'sinks', sink)
      if state == 'pending' then
        if okey then redis.call('ZADD', okeys(sink, okey), ARGV[i + 12], m) end
        enqueue(sink, m, ARGV[i + 3], okey)
        redis.call('ZADD', P .. 'pending:' .. sink, ARGV[i + 4], m)
      else
        redis.call('ZADD', P .. 'dead:' .. sink, ARGV[i + 5], m)
      end
    end
    i = i + 13
  end
  if any then added[#added + 1] = id end
end
return added
"""
)


def _moved(row: list[Any]) -> MovedDelivery:
    _, sink, state, attempts, next_at, created_at, updated_at, status, error, key, at = row
    return MovedDelivery(
        _str(sink),
        _str(state),  # type: ignore[arg-type]  # the script picks pending and dead only
        int(attempts),
        float(next_at),
        float(created_at),
        float(updated_at),
        _opt_int(status),
        _opt_str(error),
        _opt_str(key),
        float(at),
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
            config.url.get_secret_value(),
            prefix=config.prefix,
            dedupe_window=dedupe_window,
            socket_timeout=config.socket_timeout,
            connect_timeout=config.connect_timeout,
            lease=config.lease,
            cluster=config.cluster,
        )

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "relay",
        dedupe_window: float,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        lease: float = 30.0,
        cluster: bool = False,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis key prefix must be non-empty, without braces: {prefix!r}")
        self.url = url
        self.prefix = prefix
        self.dedupe_window = dedupe_window
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.lease = lease
        self.cluster = cluster
        self._tag = f"{{{prefix}}}:"
        self._where = f"{redacted_url(url)} (prefix {prefix!r})"
        self._client: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._closed = False
        # Who this store is among the relays sharing the prefix: the holder of its claims
        # and consumer holds, and the name of its heartbeat.
        self.token = secrets.token_hex(8)
        # Claims this store holds. release() moves them to _released, which the next
        # claim/next_due_at/settle/renew script applies first: the contract's release()
        # is synchronous and must count before the next claim.
        self._held: set[int] = set()
        self._released: set[int] = set()
        self._consuming: set[str] = set()  # sinks whose one consumer this store may be
        self._beating = False  # has announced itself (heartbeat) to the other relays

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self, *, exclusive: bool = False, create: bool = True) -> None:
        """Connect and check (or, with `create`, make) the store's marker. `exclusive`
        takes nothing: claims live in Redis, so relays sharing a prefix do not send the
        same delivery twice."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._client is not None:
            return
        # One retry, on a broken connection only: after Redis restarted, every pooled
        # connection fails its next call, and without it each would cost a 503 or an
        # unsettled send (delivered twice). A timeout is not retried: the script may still
        # be running. A script that ran before its connection broke and runs again does
        # no harm: accept() then answers duplicates (the events are stored), a claim is
        # held until its lease ends, a settlement of work no longer pending is ignored.
        options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "decode_responses": False,
        }
        client: Redis | RedisCluster
        if self.cluster:
            # Any node's address: the client learns the slots and follows MOVED, and all
            # of relay's keys sit in the one slot of `{prefix}`. No retry: the cluster
            # client would retry a timeout too, and run a script twice that may still run.
            client = RedisCluster.from_url(self.url, **{**options, "retry": Retry(NoBackoff(), 0)})
        else:
            client = Redis.from_url(self.url, retry_on_timeout=False, **options)
        try:
            meta = self._tag + "meta"
            version = await client.hget(meta, "schema")
            if version is None and create:
                # Only when missing: at maxmemory Redis refuses even this write, and a
                # relay restarting then must still be able to open the store it has.
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
            if int(version) < SCHEMA_VERSION and exclusive:
                # Nothing to convert (what it holds is valid as it is), only the marker,
                # so that an older relay no longer opens a store whose ordered
                # deliveries it would settle without their order sets. Refused at
                # maxmemory: tried again at the next start.
                with contextlib.suppress(ResponseError):
                    await client.hset(meta, "schema", str(SCHEMA_VERSION))
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
                "recent": _RECENT,
                "retire": _RETIRE,
                "heartbeat": _HEARTBEAT,
                "save_state": _SAVE_STATE,
                "renew": _RENEW,
                "export": _EXPORT,
                "import": _IMPORT,
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
            if self._released or self._consuming:
                # Given back before closing: due again now, not when their lease ends.
                releases = self._take_releases()
                await self._scripts["release"](
                    keys=[self._tag],
                    args=[self.token, str(len(releases)), *releases, *self._consuming],
                    client=client,
                )
            if self._beating:
                # Gone at once, not when the heartbeat runs out: a heartbeat at time 0
                # that the same script then finds older than the cutoff.
                await self._scripts["heartbeat"](
                    keys=[self._tag], args=[self.token, "0", "1"], client=client
                )
        except RedisError:
            pass  # then their leases run out; nothing is lost
        finally:
            await client.aclose()

    def _unavailable(self, exc: Exception) -> NoReturn:
        raise StoreUnavailable(f"redis at {self._where}: {exc}{_fix_for(exc)}") from exc

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
    def client(self) -> Redis | RedisCluster:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._client is None:
            raise StoreUnavailable("store is not open")
        return self._client

    async def _on_our_node(self, *command: str) -> Any:
        """A server command (INFO, CONFIG GET) to the node holding relay's keys: on a
        cluster, the one that owns the prefix's slot, whose memory and persistence are
        what matter."""
        client = self.client
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(self._tag + "meta")
            return await client.execute_command(*command, target_nodes=node)
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]

    def _take_releases(self) -> list[str]:
        releases = [_pad(i) for i in self._released]
        self._released = set()
        return releases

    async def _run_releasing(self, name: str, args: Sequence[str]) -> Any:
        """Run a script that applies the pending releases first; if it fails they stay
        pending for the next one."""
        taken = set(self._released)
        releases = self._take_releases()
        try:
            return await self._run(name, [self.token, str(len(releases)), *releases, *args])
        except BaseException:
            self._released |= taken
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
            key = event.order_key
            args += [event.id, event.source, event.envelope, key or "", _num(event.order_at)]
            args.append(str(len(event.sinks)))
            for sink in event.sinks:
                args += [sink, "1" if key is not None and sink in event.ordered else "0"]
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

    shared = True  # several relays may use one prefix at once

    async def claim(
        self,
        sink: str,
        limit: int,
        lease: float,
        now: float | None = None,
        *,
        exclusive: bool = False,
        order: Ordering | None = None,
    ) -> list[Delivery]:
        """Up to `limit` of `sink`'s due deliveries, oldest first (next_at, then id), held
        for `lease` seconds in `claimed:<sink>`, where anyone may take them over once the
        lease has run out. `exclusive`: only while no other relay is the sink's consumer
        (a paced sink: its pace holds across relays because one sends at a time).

        `order`: what the contract asks is decided in the one script, the `claimed:`
        set being every relay's claims, so two relays never send one object at once;
        coalesced deliveries and released objects are recorded by the same script."""
        at = time.time() if now is None else now
        if limit <= 0:
            return []
        if exclusive:
            self._consuming.add(sink)
        args = [sink, _num(at), _num(at + lease), str(limit), "1" if exclusive else "0"]
        if order is not None:
            args += ["1", _num(order.timeout), "1" if order.coalesce else "0"]
        else:
            args += ["0", "0", "0"]
        rows = await self._run_releasing("claim", args)
        taken = []
        for row in rows:
            member, event_id, attempts, created_at, envelope = row[:5]
            delivery = Delivery(
                int(member),
                _str(event_id),
                sink,
                int(attempts),
                float(created_at),
                _str(envelope),
            )
            if len(row) > 5:
                late, supersedes, overtakes, released = row[5:9]
                delivery = replace(
                    delivery,
                    keyed=released != b"1",
                    late=late == b"1",
                    supersedes=tuple(_str(e) for e in supersedes),
                    overtakes=tuple(
                        (_str(e), round(at - float(since), 3)) for e, since in overtakes
                    ),
                )
            self._held.add(delivery.id)
            taken.append(delivery)
        return taken

    def release(self, ids: Collection[int]) -> None:
        """Give back claims that will not be settled: the next claim, next_due_at, renew
        or settle of this store (or its close) returns them to the queue, before it does
        anything else. Only claims this store still holds are touched; a holder that
        dies before then leaves them to run out their lease."""
        for delivery_id in ids:
            if delivery_id in self._held:
                self._held.discard(delivery_id)
                self._released.add(delivery_id)

    async def renew(
        self, sink: str, ids: Collection[int], lease: float, now: float | None = None
    ) -> list[int]:
        """Extend this store's claims on `ids` (sends still running) and its hold on the
        sink's consumer by `lease` from now; returns those it no longer holds (its lease
        ran out and another relay took them over: the send is then a duplicate)."""
        at = time.time() if now is None else now
        args = [sink, _num(at), _num(at + lease), *(_pad(i) for i in ids)]
        lost = [int(m) for m in await self._run_releasing("renew", args)]
        self._held.difference_update(lost)
        return lost

    async def next_due_at(self, sink: str) -> float | None:
        """When `sink`'s next unclaimed pending delivery is due, if it has one."""
        due = await self._run_releasing("next_due", [sink, _num(time.time())])
        return None if due is None else float(due)

    async def settle(self, settlements: Sequence[Settlement], now: float | None = None) -> None:
        """Record what became of deliveries: of pending ones that no other relay has
        claimed since (what another relay sends now, or has settled, is its own)."""
        at = time.time() if now is None else now
        args: list[str] = [_num(at)]
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
                "" if s.attempts_before is None else str(s.attempts_before),
            ]
        await self._run_releasing("settle", args)
        # Recorded: whatever comes of them next is the store's, not the claim's.
        self._held.difference_update(s.delivery_id for s in settlements)

    async def save_sink_state(
        self, sink: str, circuit: str, open_until: float, gone: bool, now: float | None = None
    ) -> None:
        """This relay's view of the sink: each relay keeps its own circuit and 410 (it
        judges the sends it makes), and `sink_stats` shows the worst of the running
        relays' views."""
        at = time.time() if now is None else now
        state = f"{circuit} {_num(open_until)} {'1' if gone else '0'}"
        await self._run("save_state", [self.token, sink, state, _num(at)])

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
        per_sink, states = await self._run("sink_stats", [self.token, _num(at - REPLICA_TTL)])
        stats: dict[str, SinkStats] = {}
        for sink, pending, dead, oldest, coalesced in per_sink:
            stats[_str(sink)] = SinkStats(
                pending=int(pending),
                oldest_pending_s=at - float(oldest[0]) if oldest else 0.0,
                dead=int(dead),
                coalesced=int(coalesced),
            )
        for sink, circuit, open_until, gone in states:
            name = _str(sink)
            current = stats.get(name, SinkStats())
            stats[name] = replace(
                current,
                circuit=_str(circuit),
                open_until=float(open_until),
                gone=gone == b"1",
            )
        return stats

    async def receipts_since(self, since: float) -> dict[str, tuple[int, int]]:
        """Per source: (events received, of which duplicates) since `since`."""
        totals: dict[str, tuple[int, int]] = {}
        for source, minutes in (await self.receipts_by_minute(since)).items():
            totals[source] = (
                sum(r for r, _ in minutes.values()),
                sum(d for _, d in minutes.values()),
            )
        return totals

    async def receipts_by_minute(self, since: float) -> dict[str, dict[int, tuple[int, int]]]:
        rows = await self._run("receipts", [str(int(since // 60))])
        by: dict[str, dict[int, list[int]]] = {}
        for minute, received, duplicates in rows:
            for column, flat in ((0, received), (1, duplicates)):
                for source, count in zip(flat[::2], flat[1::2], strict=True):
                    cell = by.setdefault(_str(source), {}).setdefault(int(minute), [0, 0])
                    cell[column] += int(count)
        return {s: {m: (r, d) for m, (r, d) in ms.items()} for s, ms in by.items()}

    async def counts(self) -> dict[str, int]:
        """Events, and deliveries by state where there are any (as SQLite's GROUP BY)."""
        events, pending, done, dead, coalesced = await self._run("counts", [])
        result = {"events": int(events)}
        for state, n in (
            ("pending", pending),
            ("done", done),
            ("dead", dead),
            ("coalesced", coalesced),
        ):
            if n:
                result[state] = int(n)
        return result

    async def recent_events(self, cursor: str | None, limit: int) -> RecentEvents:
        """Newest first by dedupe claim (expires_at, then id), from the `events` index."""
        score, _, after = ("+inf", "", "") if cursor is None else cursor.partition(":")
        rows = await self._run("recent", [self.token, score, after, str(limit)])
        events = [
            EventSummary(
                _str(event_id),
                _str(source),
                _str(envelope),
                float(received_at),
                tuple(sorted((_str(sink), _str(state)) for sink, state in states)),
            )
            for event_id, source, envelope, received_at, _, states in rows
        ]
        last = rows[-1] if len(rows) == limit else None
        return RecentEvents(events, None if last is None else f"{_str(last[4])}:{_str(last[0])}")

    async def event(self, event_id: str) -> EventRecord | None:
        found = await self._run("event", [event_id])
        if found is None:
            return None
        source, envelope, received_at, rows = found
        deliveries: list[tuple[str, int, DeliveryRecord]] = []
        for member, sink, state, attempts, status, error, created, updated, next_at in rows:
            record = DeliveryRecord(
                _str(sink),
                _str(state),  # type: ignore[arg-type]  # the scripts write only the four states
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

    async def watch_work(self) -> AsyncIterator[set[str]]:
        """The sinks other relays (or this relay's workers) just queued work for, as
        accept() publishes them on `{prefix}:work`, so that lanes look at once rather
        than at their next poll. A lost subscription costs only that: the lanes poll."""
        channel = f"{self._tag}work"
        while not self._closed:
            try:
                async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    while not self._closed:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            yield set(_text(message["data"]).split())
            except (RedisError, StoreUnavailable, OSError):
                await asyncio.sleep(1.0)  # Redis away: the lanes' polls carry on

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
            memory = await self._on_our_node("INFO", "memory")
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
                return (
                    f"the store's memory is nearly full ({max(free, 0)} bytes free of"
                    f" redis's maxmemory {limit}): raise maxmemory, lower"
                    " store.min_free_bytes, or let the queues drain"
                )
        return None

    async def warnings(self) -> list[str]:
        """How safely Redis keeps what relay acknowledges, where it is less than an
        operator would assume: an acknowledged event is as durable as Redis's
        persistence. Asked at start-up; CONFIG may be refused (managed Redis), and then
        only what INFO shows is judged."""
        found: list[str] = []
        try:
            persistence = await self._on_our_node("INFO", "persistence")
            memory = await self._on_our_node("INFO", "memory")
        except RedisError as exc:
            self._unavailable(exc)
        config: dict[str, str] = {}
        try:
            for name in ("save", "appendfsync"):
                raw = await self._on_our_node("CONFIG", "GET", name)
                config.update({_text(k): _text(v) for k, v in raw.items()})
        except RedisError:
            pass
        if not int(persistence.get("aof_enabled", 0)):
            if config.get("save", "x").strip() == "":
                found.append(
                    f"redis at {self._where} persists nothing (no AOF, no RDB snapshots):"
                    " a restart of Redis loses every event relay acknowledged; set"
                    " appendonly yes and appendfsync everysec (or always)"
                )
            else:
                found.append(
                    f"redis at {self._where} has no AOF, only RDB snapshots: a crash of"
                    " Redis loses the events acknowledged since the last snapshot; set"
                    " appendonly yes and appendfsync everysec (or always)"
                )
        elif config.get("appendfsync") == "no":
            found.append(
                f"redis at {self._where} has appendfsync no: a power cut loses the events"
                " acknowledged in the last 30 s or so; set appendfsync everysec (up to a"
                " second lost) or always (none)"
            )
        policy = _text(memory.get("maxmemory_policy", "noeviction"))
        if policy != "noeviction":
            found.append(
                f"redis at {self._where} has maxmemory-policy {policy}: it may evict stored"
                " events; set it to noeviction"
            )
        return found

    # --- moving to another store -------------------------------------------------------

    async def export_work(
        self, now: float | None = None, batch: int = 500
    ) -> AsyncIterator[list[MovedEvent]]:
        """Every event still claimed for dedupe or with a pending or dead delivery, with
        those deliveries, in batches (read while nothing else writes: a migration)."""
        at = time.time() if now is None else now
        start = 0
        while True:
            read, rows = await self._run("export", [self.token, str(start), str(batch), _num(at)])
            start += int(read)
            events = [
                MovedEvent(
                    _str(event_id),
                    _str(source),
                    _str(envelope),
                    float(received_at),
                    float(expires_at),
                    tuple(_moved(row) for row in sorted(moved, key=lambda row: row[0])),
                )
                for event_id, source, envelope, received_at, expires_at, moved in rows
            ]
            if events:
                yield events
            if int(read) < batch:
                return

    async def import_work(self, events: Sequence[MovedEvent]) -> list[str]:
        """Store moved events as they were, in one script; one already here (a
        migration run twice) is left alone. Returns the ids added."""
        args: list[str] = [self.token, str(len(events))]
        for e in events:
            args += [e.id, e.source, e.envelope, _num(e.received_at), _num(e.expires_at)]
            args.append(str(len(e.deliveries)))
            for d in e.deliveries:
                args += [
                    d.sink,
                    d.state,
                    str(d.attempts),
                    _num(d.next_at),
                    _num(d.created_at),
                    _num(d.updated_at),
                    "0" if d.last_status is None else "1",
                    "" if d.last_status is None else str(d.last_status),
                    "0" if d.last_error is None else "1",
                    d.last_error or "",
                    "0" if d.order_key is None else "1",
                    d.order_key or "",
                    _num(d.order_at),
                ]
        return [_str(i) for i in await self._run("import", args)]

    # --- housekeeping ------------------------------------------------------------------

    async def retire_sinks(self, keep: Collection[str], now: float | None = None) -> int:
        """Dead-letter, with the reason `sink removed`, the pending deliveries of every
        sink that neither `keep` (this relay's sinks) nor any other running relay's
        sinks name, and forget those sinks' saved state. Also this relay's heartbeat."""
        at = time.time() if now is None else now
        args = [self.token, _num(at), _num(at - REPLICA_TTL), *keep]
        self._beating = True
        return int(await self._run("retire", args))

    async def heartbeat(self, sinks: Collection[str], now: float | None = None) -> None:
        """Tell the relays sharing this prefix that this one runs `sinks`: none of them
        retires those while it does. Sent every few seconds; a relay silent for
        REPLICA_TTL is taken for gone."""
        at = time.time() if now is None else now
        self._beating = True
        await self._run("heartbeat", [self.token, _num(at), _num(at - REPLICA_TTL), *sinks])

    async def prune(self, keep_done: float, now: float | None = None) -> tuple[int, int]:
        """Drop finished deliveries older than `keep_done`, then events whose dedupe
        window has passed and that no delivery still needs, and old receipts. Returns
        (deliveries, events)."""
        at = time.time() if now is None else now
        args = [_num(at - keep_done), _num(at), str(int((at - RECEIPTS_KEPT) // 60))]
        total = [0, 0]
        while True:
            deliveries, events = await self._run("prune", [*args, str(PRUNE_ROUND)])
            total[0] += int(deliveries)
            total[1] += int(events)
            if int(deliveries) < PRUNE_ROUND:
                return total[0], total[1]


def _meets_the_contract(store: RedisStore) -> Store:
    return store  # mypy checks here that RedisStore implements every protocol of Store
