"""`RedisLimiter`: limits shared by every gateway replica through one Redis (see `limits.py`).

One round trip per admission: EVALSHA of the admission script (`limits_lua.py`), which reads
the server's clock, drops expired entries, checks every scope and charges all of them or none.
On NOSCRIPT the script is loaded (SCRIPT LOAD) and the call repeated. Where SCRIPT or EVALSHA
is refused (a proxy such as twemproxy, a renamed command) the limiter uses plain EVAL; where
scripting is refused altogether, WATCH/MULTI transactions (`limits_watch.py`). The mode only
ever steps down, and `stats().mode` says which one is in use.

Redis unreachable (or failing): the limits file's `redis_down` policy - admit, or refuse with
503 - counted in `stats().redis_down`, never a silent per-replica limit.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from kvtier.gateway import limits_watch
from kvtier.gateway.affinity import redis_client
from kvtier.gateway.limits import (
    WINDOW_S,
    Admitted,
    LimiterStats,
    RateHeaders,
    Refused,
    Scope,
    decide,
    scopes_for,
)
from kvtier.gateway.limits_config import LimitsConfig, RedisDown
from kvtier.gateway.limits_lua import ADMIT, SETTLE
from kvtier.gateway.limits_window import ScopeState

MODES = ("evalsha", "eval", "watch")
_BLOCKED = ("unknown command", "unsupported", "not allowed", "disabled", "noperm", "not support")


def _blocked(exc: ResponseError) -> bool:
    """Whether an error says the command is unavailable (rather than the script failing)."""
    text = str(exc).lower()
    return any(word in text for word in _BLOCKED)


class _Scripts:
    """Runs a script by EVALSHA, then EVAL, stepping down when a mode is refused; None once
    scripting is refused altogether (the caller then uses a transaction)."""

    def __init__(self, redis: aioredis.Redis, mode: str = "evalsha") -> None:
        self._redis = redis
        self.mode = mode
        self._sha = {s: hashlib.sha1(s.encode()).hexdigest() for s in (ADMIT, SETTLE)}

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        if self.mode == "evalsha":
            try:
                return await self._evalsha(script, keys, args)
            except ResponseError as exc:
                if not _blocked(exc):
                    raise
                self.mode = "eval"
        if self.mode == "eval":
            try:
                return await self._redis.eval(script, len(keys), *keys, *args)
            except ResponseError as exc:
                if not _blocked(exc):
                    raise
                self.mode = "watch"
        return None

    async def _evalsha(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._redis.evalsha(self._sha[script], len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(script)
            return await self._redis.evalsha(self._sha[script], len(keys), *keys, *args)


def _keys(scopes: tuple[Scope, ...]) -> list[str]:
    return [key for s in scopes for key in (f"{s.name}:log", f"{s.name}:tot")]


def _states(reply: list[Any], count: int) -> list[ScopeState]:
    states = []
    for i in range(count):
        requests, tokens, reset, rwait, twait = (int(v) for v in reply[2 + 5 * i : 7 + 5 * i])
        states.append(ScopeState(requests, tokens, reset, rwait if rwait >= 0 else None,
                                 twait if twait >= 0 else None))  # fmt: skip
    return states


class RedisLimiter:
    """A `Limiter` in Redis, exact across gateway replicas. `mode` starts lower than evalsha
    only to test the fallbacks."""

    def __init__(
        self, url: str, config: LimitsConfig, window_s: float = WINDOW_S,
        prefix: str = "kvtier:lim:", mode: str = "evalsha",
    ) -> None:  # fmt: skip
        assert mode in MODES
        self._redis = redis_client(url)
        self._config = config
        self._window_us = round(window_s * 1e6)
        self._prefix = prefix
        self._scripts = _Scripts(self._redis, mode)
        self._admitted = self._refused = self._down = self._errors = 0

    def _scopes(self, tenant: str, key: str | None) -> tuple[Scope, ...]:
        scopes = scopes_for(self._config, tenant, key)
        return tuple(Scope(self._prefix + s.name, s.label, s.rpm, s.tpm) for s in scopes)

    async def admit(
        self, tenant: str, key: str | None, prompt_tokens: int, max_tokens: int
    ) -> Admitted | Refused:
        scopes = self._scopes(tenant, key)
        reserve = max(0, prompt_tokens) + max(0, max_tokens)
        admission_id = os.urandom(8).hex()
        if not scopes:
            return self._count(Admitted(admission_id, (), reserve, 0, RateHeaders()))
        try:
            now_us, states = await self._check(scopes, admission_id, reserve)
        except (RedisError, OSError):
            self._down += 1
            return self._count(self._unavailable(admission_id, reserve))
        return self._count(decide(admission_id, scopes, states, reserve, now_us))

    async def _check(
        self, scopes: tuple[Scope, ...], admission_id: str, reserve: int
    ) -> tuple[int, list[ScopeState]]:
        limits = [int(v or 0) for s in scopes for v in (s.rpm, s.tpm)]
        args = [self._window_us, admission_id, reserve, *limits]
        reply = await self._scripts.run(ADMIT, _keys(scopes), args)
        if reply is None:
            member = f"{admission_id}:{reserve}"
            answer = await limits_watch.admit(self._redis, scopes, self._window_us, member, reserve)
            return answer.now_us, answer.states
        return int(reply[1]), _states(reply, len(scopes))

    def _unavailable(self, admission_id: str, reserve: int) -> Admitted | Refused:
        if self._config.redis_down is RedisDown.OPEN:
            return Admitted(admission_id, (), reserve, 0, RateHeaders(), degraded=True)
        message = (
            "the rate-limit state (Redis) cannot be reached and the limits policy is "
            'redis_down = "closed": retry shortly'
        )
        return Refused(503, message, 1, 1.0, RateHeaders())

    def _count(self, answer: Admitted | Refused) -> Admitted | Refused:
        if isinstance(answer, Admitted):
            self._admitted += 1
        else:
            self._refused += 1
        return answer

    async def settle(self, admitted: Admitted, used_tokens: int) -> None:
        await self._recharge(admitted, f"{admitted.id}:{max(0, used_tokens)}")

    async def release(self, admitted: Admitted) -> None:
        await self._recharge(admitted, "")

    async def _recharge(self, admitted: Admitted, new: str) -> None:
        if not admitted.scopes:
            return
        old = f"{admitted.id}:{admitted.reserved_tokens}"
        try:
            done = await self._scripts.run(SETTLE, _keys(admitted.scopes), [old, new])
            if done is None:
                await limits_watch.settle(self._redis, admitted.scopes, old, new)
        except (RedisError, OSError):
            self._errors += 1

    def stats(self) -> LimiterStats:
        return LimiterStats(
            self._admitted, self._refused, self._down, self._errors, self._scripts.mode
        )

    async def close(self) -> None:
        await self._redis.aclose()
