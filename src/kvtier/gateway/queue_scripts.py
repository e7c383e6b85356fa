"""The queue worker's Redis steps, each one Lua script, so each is atomic (Redis 7.0).

- `begin`: a delivery starts. If the task's once-only marker exists it already ended: ack,
  skip. Else `attempts += 1`; past `max_deliveries` (the earlier deliveries died with their
  workers) it ends as failed (dead letter); else state `running`.
- `finish`: the one terminal write. `SET done NX`; only if that set it, the record becomes
  `done` with the completion (or `failed` with the error, plus `XADD {stream}:dlq`); in
  every case `XACK`. A redelivered task that already ended is acked with no second effect.
- `hand_back`: a retryable failure, or shutdown. Owner-checked, the entry's idle time is set
  to the claim threshold (`XCLAIM … IDLE ms JUSTID`: the delivery count stays) so the next
  janitor pass of any worker takes it at once. On shutdown the attempt is refunded.
- `heartbeat`: for each running entry still owned by this consumer, `XCLAIM … 0 id JUSTID`
  resets its idle time (so no janitor steals a live task); returns the ids no longer owned.
- `tidy`: when the stream is longer than `max_len`, `XTRIM MINID` at the smallest of every
  group's oldest pending id and last-delivered id, so no unacknowledged or undelivered entry
  is ever trimmed; then `XGROUP DELCONSUMER` of consumers idle past a bound *with no pending
  entries* (deleting one with pending entries would orphan them).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from kvtier.gateway.taskqueue import QueueKeys

_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS: stream, status, done, dlq. ARGV: group, entry, ttl_ms, worker, ok, result, task,
# tenant, body. Returns 1 if this call made the terminal write, else 0.
_FINISH_BODY = """
local function finish(ok, result)
  local first = redis.call('SET', KEYS[3], ok, 'NX', 'PX', ARGV[3])
  if first then
    if ok == 'done' then
      redis.call('HSET', KEYS[2], 'state', 'done', 'completion', result, 'finished_at_ms', now,
                 'worker', ARGV[4])
    else
      local attempts = redis.call('HGET', KEYS[2], 'attempts') or '0'
      redis.call('HSET', KEYS[2], 'state', 'failed', 'error', result, 'finished_at_ms', now,
                 'worker', ARGV[4])
      redis.call('XADD', KEYS[4], '*', 'task', ARGV[7], 'tenant', ARGV[8], 'body', ARGV[9],
                 'error', result, 'attempts', attempts, 'entry', ARGV[2])
    end
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  if first then return 1 end
  return 0
end
"""

_FINISH = _NOW + _FINISH_BODY + "return finish(ARGV[5], ARGV[6])\n"

# As FINISH, plus ARGV[10] = max_deliveries. Returns {code, attempts}: code 0 already ended
# (acked), 1 running, 2 gave up now (dead-lettered).
_BEGIN = (
    _NOW
    + _FINISH_BODY
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return {0, 0}
end
local n = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
if n > tonumber(ARGV[10]) then
  n = redis.call('HINCRBY', KEYS[2], 'attempts', -1)
  local last = redis.call('HGET', KEYS[2], 'error') or 'its worker died each time'
  finish('failed', 'gave up after ' .. n .. ' deliveries; the last: ' .. last)
  return {2, n}
end
redis.call('HSET', KEYS[2], 'state', 'running', 'started_at_ms', now, 'worker', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {1, n}
"""
)

# KEYS: stream, status, done. ARGV: group, entry, worker, idle_ms, error ('' for none),
# refund ('1' to give the attempt back). Returns 1 if handed back, 0 if not ours/ended.
_HAND_BACK = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if p[1] == nil or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
redis.call('HSET', KEYS[2], 'state', 'queued')
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[5]) end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[2], 'attempts', -1) end
return 1
"""

# KEYS: stream. ARGV: group, worker, entry ids... Returns the ids not owned by worker.
_HEARTBEAT = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# KEYS: stream. ARGV: group, max_len, prune_idle_ms. Returns {trimmed, consumers deleted}.
_TIDY = """
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function before(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local trimmed = 0
if redis.call('XLEN', KEYS[1]) > tonumber(ARGV[2]) then
  local minid = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = fields(g)
    local low = info['last-delivered-id']
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    if summary[1] > 0 and before(summary[2], low) then low = summary[2] end
    if minid == nil or before(low, minid) then minid = low end
  end
  if minid ~= nil then trimmed = redis.call('XTRIM', KEYS[1], 'MINID', minid) end
end
local pruned = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = fields(c)
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[3]) then
    pruned = pruned + redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
  end
end
return {trimmed, pruned}
"""


class Entry(NamedTuple):
    """One stream entry as a worker reads it."""

    id: str
    task: str
    tenant: str
    body: str


class Began(NamedTuple):
    """`begin`'s answer: `run` the task (this is delivery `attempts`), or not."""

    run: bool
    attempts: int


class Tidied(NamedTuple):
    trimmed: int
    consumers_deleted: int


class QueueScripts:
    """The five steps above, for one consumer `worker` of one queue."""

    def __init__(self, client: aioredis.Redis, keys: QueueKeys, worker: str, ttl_s: int) -> None:
        self.client, self.keys, self.worker = client, keys, worker
        self.ttl_ms = ttl_s * 1000
        reg = client.register_script
        self._begin, self._finish = reg(_BEGIN), reg(_FINISH)
        self._hand_back, self._heartbeat, self._tidy = reg(_HAND_BACK), reg(_HEARTBEAT), reg(_TIDY)

    def _keys(self, e: Entry) -> list[str]:
        k = self.keys
        return [k.stream, k.status(e.tenant, e.task), k.done(e.task), k.dlq]

    def _args(self, e: Entry, ok: str, result: str) -> list[str | int]:
        k = self.keys
        return [k.group, e.id, self.ttl_ms, self.worker, ok, result, e.task, e.tenant, e.body]

    async def begin(self, e: Entry, max_deliveries: int) -> Began:
        code, attempts = await self._begin(
            self._keys(e), [*self._args(e, "failed", ""), max_deliveries]
        )
        return Began(int(code) == 1, int(attempts))

    async def done(self, e: Entry, completion: dict[str, Any]) -> bool:
        """Record the completion once and ack; True if this call wrote it."""
        args = self._args(e, "done", json.dumps(completion))
        return int(await self._finish(self._keys(e), args)) == 1

    async def failed(self, e: Entry, error: str) -> bool:
        """Record the failure once, dead-letter the task and ack; True if this call did."""
        return int(await self._finish(self._keys(e), self._args(e, "failed", error))) == 1

    async def hand_back(self, e: Entry, idle_ms: int, error: str, refund: bool) -> bool:
        k = self.keys
        keys = [k.stream, k.status(e.tenant, e.task), k.done(e.task)]
        args: list[str | int] = [k.group, e.id, self.worker, idle_ms, error, "1" if refund else "0"]
        return int(await self._hand_back(keys, args)) == 1

    async def heartbeat(self, entry_ids: list[str]) -> list[str]:
        """Reset the idle time of the entries still ours; the ids that are not."""
        if not entry_ids:
            return []
        lost = await self._heartbeat([self.keys.stream], [self.keys.group, self.worker, *entry_ids])
        return [x.decode() if isinstance(x, bytes) else str(x) for x in lost]

    async def tidy(self, max_len: int, prune_idle_ms: int) -> Tidied:
        args: list[str | int] = [self.keys.group, max_len, prune_idle_ms]
        trimmed, pruned = await self._tidy([self.keys.stream], args)
        return Tidied(int(trimmed), int(pruned))
