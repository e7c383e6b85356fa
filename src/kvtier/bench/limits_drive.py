"""Demand against `RedisLimiter` from several OS processes (each one a gateway replica), and
the sliding-window arithmetic that checks what they were admitted.

Each process paces admissions open loop at its rate for each tenant, holds every admitted
request for a while (a stream), then settles it to a usage of at most its reservation, and
checks every refusal's headers and Retry-After. Admission times are Redis's (`at_us`), so the
windows are counted on the limiter's own clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from kvtier.gateway.limits import Admitted, Refused
from kvtier.gateway.limits_config import parse_limits
from kvtier.gateway.limits_redis import RedisLimiter

HEADERS = tuple(
    f"x-ratelimit-{what}-{dim}"
    for what in ("limit", "remaining", "reset")
    for dim in ("requests", "tokens")
)


@dataclass(frozen=True, slots=True)
class Demand:
    """One process's load: `rates` admissions per second per tenant, for `duration_s` from
    wall time `start_at`; each request reserves prompt + max_tokens and holds up to
    `hold_s` before settling."""

    url: str
    limits: Mapping[str, Any]  # the limits file, as parsed TOML
    window_s: float
    duration_s: float
    rates: Mapping[str, float]
    start_at: float
    prompt_tokens: int = 100
    max_tokens: int = 200
    hold_s: float = 0.5
    seed: int = 0
    mode: str = "evalsha"


class Outcome(NamedTuple):
    """One process's record: per tenant, its admissions' (Redis time, settled tokens) and
    the Redis times of its refusals."""

    admitted: dict[str, list[tuple[int, int]]]
    refused_at: dict[str, list[int]]
    refused: int
    refused_with_headers: int
    retry_after_short: int  # refusals whose Retry-After was below their exact wait
    redis_down: int


@dataclass
class _Tally:
    admitted: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    refused_at: dict[str, list[int]] = field(default_factory=dict)
    refused: int = 0
    with_headers: int = 0
    short: int = 0


async def _tenant_loop(
    limiter: RedisLimiter, demand: Demand, tenant: str, tally: _Tally, rng: random.Random
) -> list[asyncio.Task[None]]:
    interval = 1.0 / demand.rates[tenant]
    due = demand.start_at + rng.random() * interval
    end = demand.start_at + demand.duration_s
    holds: list[asyncio.Task[None]] = []
    records = tally.admitted.setdefault(tenant, [])
    refusals = tally.refused_at.setdefault(tenant, [])
    while due < end:
        await asyncio.sleep(max(0.0, due - time.time()))
        due += interval
        answer = await limiter.admit(tenant, None, demand.prompt_tokens, demand.max_tokens)
        if isinstance(answer, Refused):
            tally.refused += 1
            refusals.append(answer.at_us)
            tally.with_headers += all(h in answer.headers.as_dict() for h in HEADERS)
            tally.short += answer.retry_after_s < answer.wait_s
            continue
        used = demand.prompt_tokens + rng.randint(0, demand.max_tokens)
        holds.append(
            asyncio.create_task(_hold(limiter, answer, used, rng.random() * demand.hold_s))
        )
        records.append((answer.at_us, used))
    return holds


async def _hold(limiter: RedisLimiter, admitted: Admitted, used: int, hold_s: float) -> None:
    await asyncio.sleep(hold_s)
    await limiter.settle(admitted, used)


async def _drive(demand: Demand) -> Outcome:
    limiter = RedisLimiter(
        demand.url, parse_limits(demand.limits), window_s=demand.window_s, mode=demand.mode
    )
    tally = _Tally()
    rng = random.Random(demand.seed)
    try:
        loops = [_tenant_loop(limiter, demand, t, tally, rng) for t in demand.rates]
        holds = [task for tasks in await asyncio.gather(*loops) for task in tasks]
        await asyncio.gather(*holds)
    finally:
        await limiter.close()
    down = limiter.stats().redis_down
    return Outcome(
        tally.admitted, tally.refused_at, tally.refused, tally.with_headers, tally.short, down
    )


def drive(demand: Demand) -> Outcome:
    """One process's run (the entry point of each child)."""
    return asyncio.run(_drive(demand))


def run_processes(demands: Sequence[Demand]) -> list[Outcome]:
    """Each demand in its own spawned process, all at once."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(demands)) as pool:
        return pool.map(drive, demands)


class WindowExtremes(NamedTuple):
    """The most admitted (or charged) in any window, and the least in any window that lies
    wholly inside the steady state (from one window after the first admission)."""

    max: int
    min: int


def window_extremes(
    records: Sequence[tuple[int, int]], window_us: int, weighted: bool
) -> WindowExtremes:
    """Over windows (t - window, t]: counts (or sums of the second field when `weighted`).
    The maximum is taken at every admission time (a window's count only rises there); the
    minimum just before each admission at least a window after the first."""
    if not records:
        return WindowExtremes(0, 0)
    data = np.array(sorted(records), dtype=np.int64)  # (N, 2)
    times = data[:, 0]
    weights = data[:, 1] if weighted else np.ones(len(data), dtype=np.int64)
    sums = np.concatenate(([0], np.cumsum(weights)))
    first_in = np.searchsorted(times, times - window_us, side="right")
    upto = np.arange(1, len(times) + 1)
    inclusive = sums[upto] - sums[first_in]
    before = sums[upto - 1] - sums[first_in]  # (t - window, t), t itself excluded
    steady = times >= times[0] + window_us
    low = int(before[steady].min()) if steady.any() else 0
    return WindowExtremes(int(inclusive.max()), low)


def refused_with_room(
    admitted_us: Sequence[int], refused_us: Sequence[int], window_us: int, limit: int
) -> int:
    """How many refusals came while the window (r - window, r] held fewer than `limit`
    admissions: an exact limiter refuses only a full window (0, whatever the demand)."""
    times = np.sort(np.asarray(admitted_us, dtype=np.int64))
    refused = np.asarray(refused_us, dtype=np.int64)
    held = np.searchsorted(times, refused, side="right") - np.searchsorted(
        times, refused - window_us, side="right"
    )
    return int((held < limit).sum())
