"""`MemoryLimiter`: the limits of one gateway process, with no Redis (see `limits.py`)."""

from __future__ import annotations

import os
import time
from collections import deque

from kvtier.gateway.limits import (
    WINDOW_S,
    Admitted,
    LimiterStats,
    Refused,
    decide,
    scopes_for,
)
from kvtier.gateway.limits_config import LimitsConfig
from kvtier.gateway.limits_window import LogSummary, ScopeState, admitted_state, scope_state


class _Log:
    """A scope's admissions, oldest first; a released one stays in `order` until it expires
    but leaves `tokens` (so it no longer counts)."""

    def __init__(self) -> None:
        self.order: deque[tuple[int, str]] = deque()
        self.tokens: dict[str, int] = {}
        self.total = 0

    def expire(self, cutoff_us: int) -> None:
        while self.order and self.order[0][0] <= cutoff_us:
            _, admission_id = self.order.popleft()
            self.total -= self.tokens.pop(admission_id, 0)

    def entries(self) -> list[tuple[int, int]]:
        return [(at, self.tokens[i]) for at, i in self.order if i in self.tokens]

    def add(self, at_us: int, admission_id: str, tokens: int) -> None:
        self.order.append((at_us, admission_id))
        self.tokens[admission_id] = tokens
        self.total += tokens

    def charge(self, admission_id: str, tokens: int | None) -> None:
        """Charge `tokens` instead (None: drop the entry); nothing if it already expired."""
        old = self.tokens.get(admission_id)
        if old is None:
            return
        if tokens is None:
            del self.tokens[admission_id]
            self.total -= old
        else:
            self.tokens[admission_id] = tokens
            self.total += tokens - old


class MemoryLimiter:
    """A `Limiter` in this process's memory: exact for one gateway, per process otherwise."""

    def __init__(self, config: LimitsConfig, window_s: float = WINDOW_S) -> None:
        self._config = config
        self._window_us = round(window_s * 1e6)
        self._logs: dict[str, _Log] = {}
        self._admitted = self._refused = 0

    async def admit(
        self, tenant: str, key: str | None, prompt_tokens: int, max_tokens: int
    ) -> Admitted | Refused:
        scopes = scopes_for(self._config, tenant, key)
        reserve = max(0, prompt_tokens) + max(0, max_tokens)
        now = time.monotonic_ns() // 1000
        states: list[ScopeState] = []
        for scope in scopes:
            log = self._logs.setdefault(scope.name, _Log())
            log.expire(now - self._window_us)
            newest = log.order[-1][0] if log.order else None
            summary = LogSummary(len(log.tokens), log.total, newest)
            limits = (scope.rpm, scope.tpm)
            states.append(scope_state(summary, log.entries, limits, reserve, now, self._window_us))
        admission_id = os.urandom(8).hex()
        if not any(st.refuses for st in states):
            for scope in scopes:
                self._logs[scope.name].add(now, admission_id, reserve)
            states = [admitted_state(st, reserve, self._window_us) for st in states]
        answer = decide(admission_id, scopes, states, reserve, now)
        if isinstance(answer, Admitted):
            self._admitted += 1
        else:
            self._refused += 1
        return answer

    async def settle(self, admitted: Admitted, used_tokens: int) -> None:
        for scope in admitted.scopes:
            log = self._logs.get(scope.name)
            if log is not None:
                log.charge(admitted.id, max(0, used_tokens))

    async def release(self, admitted: Admitted) -> None:
        for scope in admitted.scopes:
            log = self._logs.get(scope.name)
            if log is not None:
                log.charge(admitted.id, None)

    def stats(self) -> LimiterStats:
        return LimiterStats(self._admitted, self._refused, 0, 0, "memory")

    async def close(self) -> None:
        self._logs.clear()
