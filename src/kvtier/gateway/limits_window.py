"""The sliding window of one scope (a tenant or an API key), as plain arithmetic.

A scope's window is a log of the requests it admitted in the last `window_us` microseconds,
each with the tokens it is charged (its reservation, later its real usage), and their running
total. A request is admitted when, after dropping the entries at or before `now - window_us`,
one more request stays within `rpm` and its reservation within `tpm`. The Redis Lua script
(`limits_lua.py`) does the same sums; this module serves the in-memory limiter and the
WATCH/MULTI fallback, and states what the script must compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple


class ScopeState(NamedTuple):
    """A scope's window at a decision: `requests` and `tokens` in it (the new request
    included when admitted), microseconds until the whole window has expired (`reset_us`),
    and, where a limit refused the request, the exact wait until enough of the window has
    expired for it (None where that limit did not refuse)."""

    requests: int
    tokens: int
    reset_us: int
    requests_wait_us: int | None
    tokens_wait_us: int | None

    @property
    def refuses(self) -> bool:
        return self.requests_wait_us is not None or self.tokens_wait_us is not None


def requests_wait_us(oldest_first: Sequence[int], rpm: int, now_us: int, window_us: int) -> int:
    """With len(oldest_first) live entries (their admission times, oldest first) and no room,
    the wait until one more fits: until entry number len - rpm (0-based) expires."""
    at = oldest_first[len(oldest_first) - rpm]
    return at + window_us - now_us


def tokens_wait_us(
    oldest_first: Iterable[tuple[int, int]],
    total: int,
    tpm: int,
    reserve: int,
    now_us: int,
    window_us: int,
) -> int:
    """The wait until entries (admission time, tokens), expiring oldest first, free enough of
    `total` for `reserve` to fit under `tpm` (reserve <= tpm, or it never fits)."""
    assert reserve <= tpm
    freed = 0
    for at, tokens in oldest_first:
        freed += tokens
        if total - freed + reserve <= tpm:
            return at + window_us - now_us
    return 0  # the log is empty of anything that matters: room now


class LogSummary(NamedTuple):
    """What an admission reads of a scope's log after dropping the expired entries: how
    many are live, their token total, and the newest one's admission time (None if empty)."""

    live: int
    total: int
    newest_us: int | None


def scope_state(
    log: LogSummary,
    oldest_first: Callable[[], Sequence[tuple[int, int]]],
    limits: tuple[int | None, int | None],
    reserve: int,
    now_us: int,
    window_us: int,
) -> ScopeState:
    """The state of a scope before the request is added (a caller that admits it then takes
    `admitted_state`). `oldest_first()` lists the live entries (admission time, tokens),
    oldest first; it is called only when a limit refuses."""
    rpm, tpm = limits
    reset = 0 if log.newest_us is None else log.newest_us + window_us - now_us
    request_wait = token_wait = None
    if rpm is not None and log.live + 1 > rpm:
        times = [at for at, _ in oldest_first()]
        request_wait = requests_wait_us(times, rpm, now_us, window_us)
    if tpm is not None and log.total + reserve > tpm:
        token_wait = 0  # never fits: the caller says so
        if reserve <= tpm:
            token_wait = tokens_wait_us(oldest_first(), log.total, tpm, reserve, now_us, window_us)
    return ScopeState(log.live, log.total, reset, request_wait, token_wait)


def admitted_state(state: ScopeState, reserve: int, window_us: int) -> ScopeState:
    """The state after the request was added at the decision's time."""
    return state._replace(
        requests=state.requests + 1, tokens=state.tokens + reserve, reset_us=window_us
    )
