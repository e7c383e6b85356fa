"""Rate limits per tenant and per API key: requests (RPM) and tokens (TPM) per sliding window.

Why a sliding log (a sorted set of admissions per scope, plus a running token total) rather
than a fixed window, a sliding-window counter or GCRA: the target is *exact* - admitted
requests in any 60 s window <= the limit - and only a log of admission times gives that
(a fixed window admits 2x across a boundary, the two-bucket counter estimates, GCRA spaces
requests evenly and refuses bursts the window allows). TPM needs per-request entries anyway:
a reservation (prompt + max_tokens) is settled to real usage later, and a reservation whose
gateway died must leave with the window. The cost stays O(expired) per admission, not
O(window): expired entries are read and dropped from the old end (each once), the count is
ZCARD and the token total a counter. Only a refusal walks the log, from the old end, to find
its exact wait.

A key's limits apply on top of its tenant's: a request is admitted only when every scope
admits it, and then it is charged to every scope. Implementations: `RedisLimiter`
(`limits_redis.py`, exact across any number of gateway replicas, one round trip per
admission) and `MemoryLimiter` (`limits_memory.py`, one gateway).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kvtier.gateway.limits_config import LimitsConfig
from kvtier.gateway.limits_window import ScopeState

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits a request is checked against; `name` is its storage key (the
    tenant's or key's digest, never the API key itself)."""

    name: str
    label: str  # for messages: "tenant 'acme'" or "API key sk-a…"
    rpm: int | None
    tpm: int | None


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def scopes_for(config: LimitsConfig, tenant: str, key: str | None) -> tuple[Scope, ...]:
    """The scopes with a limit that a request of `tenant` with API `key` is checked against.
    Names share the tenant's `{hash tag}`, so a Redis Cluster keeps them on one slot."""
    tag = "{" + _digest(tenant) + "}"
    found = []
    quota = config.tenants.get(tenant)
    if quota is not None and (quota.rpm or quota.tpm):
        found.append(Scope(f"{tag}:t", f"tenant {tenant!r}", quota.rpm, quota.tpm))
    quota = config.keys.get(key) if key is not None else None
    if key is not None and quota is not None and (quota.rpm or quota.tpm):
        found.append(Scope(f"{tag}:k:{_digest(key)}", f"API key {key[:5]}…", quota.rpm, quota.tpm))
    return tuple(found)


def format_duration(us: int) -> str:
    """A wait as OpenAI writes it in x-ratelimit-reset-*: `20ms`, `1.5s`, `6m0s`, `1h2m3s`
    (rounded up to the millisecond, so it never understates)."""
    ms = max(0, math.ceil(us / 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest_ms = divmod(ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


class RateHeaders(NamedTuple):
    """OpenAI's `x-ratelimit-*` headers for the tightest scope; a dimension no scope limits
    (no rpm, or no tpm) has no headers."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: str | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {
            "x-ratelimit-" + name.replace("_", "-"): str(value)
            for name, value in self._asdict().items()
            if value is not None
        }


def rate_headers(scopes: Sequence[Scope], states: Sequence[ScopeState]) -> RateHeaders:
    """The headers of the scope with the fewest requests left, and of the one with the fewest
    tokens left (they may differ)."""
    requests = [
        (s.rpm - st.requests, s.rpm, st) for s, st in zip(scopes, states, strict=True) if s.rpm
    ]
    tokens = [(s.tpm - st.tokens, s.tpm, st) for s, st in zip(scopes, states, strict=True) if s.tpm]
    headers = RateHeaders()
    if requests:
        left, limit, st = min(requests, key=lambda r: r[0])
        headers = headers._replace(
            limit_requests=limit, remaining_requests=max(0, left),
            reset_requests=format_duration(st.reset_us),
        )  # fmt: skip
    if tokens:
        left, limit, st = min(tokens, key=lambda r: r[0])
        headers = headers._replace(
            limit_tokens=limit, remaining_tokens=max(0, left),
            reset_tokens=format_duration(st.reset_us),
        )  # fmt: skip
    return headers


class Admitted(NamedTuple):
    """A request the limits let through; pass it to `settle` (or `release`) when it ends.
    `at_us` is when it was admitted (Redis's clock for RedisLimiter); `degraded` is true
    when it was admitted without a check because Redis was down and the policy is open."""

    id: str
    scopes: tuple[Scope, ...]
    reserved_tokens: int
    at_us: int
    headers: RateHeaders
    degraded: bool = False


class Refused(NamedTuple):
    """A request refused: answer `status` (429, or 503 while Redis is down and the policy is
    closed) with `message`, `Retry-After: retry_after_s` and `headers`. `wait_s` is the exact
    wait until the window has room for it (retry_after_s is that rounded up); `never` means
    its reservation alone exceeds a limit, so no wait helps (answer no Retry-After). `at_us`
    is when it was decided (Redis's clock for RedisLimiter; 0 when Redis was down)."""

    status: int
    message: str
    retry_after_s: int
    wait_s: float
    headers: RateHeaders
    never: bool = False
    at_us: int = 0


class LimiterStats(NamedTuple):
    """Counters for the gateway's metrics. `redis_down` counts admissions decided by the
    redis_down policy instead of Redis, `errors` settlements or releases that failed;
    `mode` is how the Redis limiter reaches Redis (evalsha, eval, watch, memory)."""

    admitted: int
    refused: int
    redis_down: int
    errors: int
    mode: str


class Limiter(Protocol):
    """Admits requests within every limit of their tenant and key.

    Contract: `admit` is atomic across every gateway sharing the limiter's state - admitted
    requests in any `window_s` window never exceed a scope's rpm, and their charged tokens
    never exceed its tpm, but for usage settled above a reservation. Each admitted request is
    settled or released exactly once; one that never is (its gateway died) leaves with the
    window. Failures of the backing store never raise: admit follows the redis_down policy
    and counts it, settle and release count it.
    """

    async def admit(
        self, tenant: str, key: str | None, prompt_tokens: int, max_tokens: int
    ) -> Admitted | Refused:
        """Check and, if every scope has room, charge `prompt_tokens + max_tokens`."""
        ...

    async def settle(self, admitted: Admitted, used_tokens: int) -> None:
        """Charge the request's real usage instead of its reservation."""
        ...

    async def release(self, admitted: Admitted) -> None:
        """Take back a request that never ran (its request and its tokens)."""
        ...

    def stats(self) -> LimiterStats: ...

    async def close(self) -> None: ...


def decide(
    admission_id: str,
    scopes: tuple[Scope, ...],
    states: Sequence[ScopeState],
    reserve: int,
    now_us: int,
) -> Admitted | Refused:
    """The answer for states computed at `now_us` (admitted states when no scope refuses)."""
    headers = rate_headers(scopes, states)
    if not any(st.refuses for st in states):
        return Admitted(admission_id, scopes, reserve, now_us, headers)
    for scope in scopes:
        if scope.tpm is not None and reserve > scope.tpm:
            message = (
                f"this request needs {reserve} tokens (prompt + max_tokens) but {scope.label} "
                f"is limited to {scope.tpm} tokens per window: lower max_tokens or the prompt"
            )
            return Refused(429, message, 0, 0.0, headers, never=True, at_us=now_us)
    waits = [w for st in states for w in (st.requests_wait_us, st.tokens_wait_us) if w is not None]
    wait_us = max(1, *waits)
    blocked = [s.label for s, st in zip(scopes, states, strict=True) if st.refuses]
    retry = math.ceil(wait_us / 1e6)
    message = f"rate limit reached for {', '.join(blocked)}: retry in {retry} s"
    return Refused(429, message, retry, wait_us / 1e6, headers, at_us=now_us)
