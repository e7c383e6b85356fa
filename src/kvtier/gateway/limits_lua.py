"""The Redis scripts of `RedisLimiter` (Redis 7.0; time from the server's TIME, so the clocks
of gateway replicas never matter). Each scope has two keys: `<scope>:log`, a sorted set of
admissions scored by admission time in microseconds, each member `"<id>:<tokens>"` (its
current charge), and `<scope>:tot`, the running total of those charges. Both expire one
window after the newest admission. The arithmetic is `limits_window.py`'s.
"""

from __future__ import annotations

# KEYS: log, tot per scope. ARGV: window_us, id, reserve, then rpm, tpm per scope (0: none).
# Reply: admitted (1/0), now_us, then per scope: requests, tokens, reset_us, requests_wait_us,
# tokens_wait_us (a wait of -1: that limit did not refuse). Counts include the new request
# when it was admitted.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local reserve = tonumber(ARGV[3])
local cutoff = now - window
local function charge(member) return tonumber(string.match(member, ':(%d+)$')) end
local function int(x) return string.format('%d', x) end  -- tostring keeps 14 digits only
local reply, admit = {1, now}, 1
for i = 1, #KEYS / 2 do
  local log, tot = KEYS[2 * i - 1], KEYS[2 * i]
  local rpm, tpm = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local stored = tonumber(redis.call('GET', tot) or '0')
  local total = stored
  local gone = redis.call('ZRANGEBYSCORE', log, '-inf', int(cutoff))
  if #gone > 0 then
    for _, m in ipairs(gone) do total = total - charge(m) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', int(cutoff))
  end
  local count = redis.call('ZCARD', log)
  if count == 0 then total = 0 end
  if total ~= stored then
    redis.call('SET', tot, int(total), 'PX', int(math.floor(window / 1000) + 1000))
  end
  local rwait, twait, reset = -1, -1, 0
  if count > 0 then
    local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
    reset = tonumber(newest[2]) + window - now
  end
  if rpm > 0 and count + 1 > rpm then
    local e = redis.call('ZRANGE', log, count - rpm, count - rpm, 'WITHSCORES')
    rwait = tonumber(e[2]) + window - now
  end
  if tpm > 0 and total + reserve > tpm then
    twait = 0
    local freed, start = 0, 0
    while reserve <= tpm and twait == 0 and start < count do
      local batch = redis.call('ZRANGE', log, start, start + 63, 'WITHSCORES')
      for j = 1, #batch, 2 do
        freed = freed + charge(batch[j])
        if total - freed + reserve <= tpm then
          twait = tonumber(batch[j + 1]) + window - now
          break
        end
      end
      start = start + 64
    end
  end
  if rwait >= 0 or twait >= 0 then admit = 0 end
  for _, v in ipairs({count, total, reset, rwait, twait}) do reply[#reply + 1] = v end
end
if admit == 1 then
  local member = ARGV[2] .. ':' .. ARGV[3]
  local ttl = int(math.floor(window / 1000) + 1000)
  for i = 1, #KEYS / 2 do
    redis.call('ZADD', KEYS[2 * i - 1], int(now), member)
    redis.call('INCRBY', KEYS[2 * i], ARGV[3])
    redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
    redis.call('PEXPIRE', KEYS[2 * i], ttl)
    local base = 2 + 5 * (i - 1)
    reply[base + 1] = reply[base + 1] + 1
    reply[base + 2] = reply[base + 2] + reserve
    reply[base + 3] = window
  end
else
  reply[1] = 0
end
return reply
"""

# KEYS: log, tot per scope. ARGV: the admission's member, its new member ("" to drop it).
# Changes the charge of an admission still in its window; one already expired is left alone.
SETTLE = """
local old = ARGV[1]
local old_tokens = tonumber(string.match(old, ':(%d+)$'))
for i = 1, #KEYS / 2 do
  local log, tot = KEYS[2 * i - 1], KEYS[2 * i]
  local at = redis.call('ZSCORE', log, old)
  if at then
    redis.call('ZREM', log, old)
    local new_tokens = 0
    if ARGV[2] ~= '' then
      redis.call('ZADD', log, at, ARGV[2])
      new_tokens = tonumber(string.match(ARGV[2], ':(%d+)$'))
    end
    redis.call('INCRBY', tot, string.format('%d', new_tokens - old_tokens))
  end
end
return 1
"""
