"""The limiter's scripts as WATCH/MULTI optimistic transactions, for a Redis (or a proxy in
front of it) that refuses scripting altogether.

Same keys and arithmetic as the Lua (`limits_lua.py`), so replicas in either mode share
state. An admission WATCHes its scopes' logs, reads TIME (after WATCH: any admission that
commits in between aborts this one, so admission times stay in commit order) and each log,
and commits in one MULTI/EXEC; a conflict retries. It costs 3 + one round trip per scope and
reads the whole window (O(window)): this is the fallback, not the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

from redis import asyncio as aioredis
from redis.exceptions import WatchError

from kvtier.gateway.limits import Scope
from kvtier.gateway.limits_window import LogSummary, ScopeState, admitted_state, scope_state

MAX_RETRIES = 100


class WatchAnswer(NamedTuple):
    admitted: bool
    now_us: int
    states: list[ScopeState]


def _charge(member: bytes | str) -> int:
    text = member.decode() if isinstance(member, bytes) else member
    return int(text.rsplit(":", 1)[1])


def _ttl_ms(window_us: int) -> int:
    return window_us // 1000 + 1000


async def admit(
    redis: aioredis.Redis,
    scopes: Sequence[Scope],
    window_us: int,
    member: str,
    reserve: int,
) -> WatchAnswer:
    """Check and charge `member` ("<id>:<reserve>") to every scope, atomically."""
    logs = [f"{s.name}:log" for s in scopes]
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(MAX_RETRIES):
            try:
                return await _attempt(pipe, scopes, logs, window_us, member, reserve)
            except WatchError:
                continue
    raise WatchError(f"admission kept conflicting {MAX_RETRIES} times")


async def _attempt(
    pipe: Any, scopes: Sequence[Scope], logs: list[str], window_us: int, member: str, reserve: int
) -> WatchAnswer:
    await pipe.watch(*logs)
    seconds, micros = await pipe.time()
    now = int(seconds) * 1_000_000 + int(micros)
    cutoff = now - window_us
    states, totals = [], []
    for scope, log in zip(scopes, logs, strict=True):
        rows = await pipe.zrangebyscore(log, f"({cutoff}", "+inf", withscores=True)
        entries = [(int(score), _charge(m)) for m, score in rows]
        total = sum(tokens for _, tokens in entries)
        summary = LogSummary(len(entries), total, entries[-1][0] if entries else None)
        limits = (scope.rpm, scope.tpm)
        states.append(scope_state(summary, partial(list, entries), limits, reserve, now, window_us))
        totals.append(total)
    admitted = not any(st.refuses for st in states)
    pipe.multi()
    for scope, log, total in zip(scopes, logs, totals, strict=True):
        if admitted:  # a refusal writes nothing (so it aborts no one) but still checks WATCH
            pipe.zremrangebyscore(log, "-inf", cutoff)
            pipe.zadd(log, {member: now})
            pipe.set(f"{scope.name}:tot", total + reserve, px=_ttl_ms(window_us))
            pipe.pexpire(log, _ttl_ms(window_us))
    await pipe.execute()
    if admitted:
        states = [admitted_state(st, reserve, window_us) for st in states]
    return WatchAnswer(admitted, now, states)


async def settle(redis: aioredis.Redis, scopes: Sequence[Scope], old: str, new: str) -> None:
    """Replace the charge `old` by `new` ("" drops it) in every scope still holding it."""
    logs = [f"{s.name}:log" for s in scopes]
    pipe: Any
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(MAX_RETRIES):
            try:
                await pipe.watch(*logs)
                scores = [await pipe.zscore(log, old) for log in logs]
                pipe.multi()
                for scope, log, at in zip(scopes, logs, scores, strict=True):
                    if at is None:
                        continue
                    pipe.zrem(log, old)
                    if new:
                        pipe.zadd(log, {new: at})
                    pipe.incrby(f"{scope.name}:tot", (_charge(new) if new else 0) - _charge(old))
                await pipe.execute()
                return
            except WatchError:
                continue
    raise WatchError(f"settlement kept conflicting {MAX_RETRIES} times")
