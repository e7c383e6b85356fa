"""Rate limits: the limits file, RedisLimiter against a real redis-server (its fallbacks and a
Redis that is down), MemoryLimiter, and exactness across OS processes."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.bench.limits_drive import (
    HEADERS,
    Demand,
    refused_with_room,
    run_processes,
    window_extremes,
)
from kvtier.bench.remote_io import RedisProcess, free_port
from kvtier.errors import ConfigError
from kvtier.gateway.limits import Admitted, Limiter, Refused, format_duration
from kvtier.gateway.limits_config import RedisDown, load_limits, parse_limits
from kvtier.gateway.limits_memory import MemoryLimiter
from kvtier.gateway.limits_redis import RedisLimiter

WINDOW_S = 2.0
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


def config(**tables: Any) -> Any:
    return parse_limits(tables)


Run = Callable[[Awaitable[Any]], Any]


@pytest.fixture
def run() -> Iterator[Run]:
    """One event loop for the whole test (a Redis client's connections belong to one loop)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def admit(run: Run, limiter: Limiter, tenant: str, key: str | None = None, prompt: int = 10,
          max_tokens: int = 10) -> Admitted | Refused:  # fmt: skip
    answer: Admitted | Refused = run(limiter.admit(tenant, key, prompt, max_tokens))
    return answer


# --- the limits file ---------------------------------------------------------------------


def test_limits_file_parses_every_table(tmp_path: Path) -> None:
    """A full limits file gives its tenants, keys, classes by rank and the redis_down policy."""
    path = tmp_path / "limits.toml"
    path.write_text(
        '[limits]\nredis_down = "open"\n'
        "[classes.free]\nshare = 0.2\nrank = 5\n"
        "[classes.paid]\nshare = 0.8\nrank = 0\nreserve = 2\n"
        '[tenants.acme]\nrpm = 600\ntpm = 100000\nclass = "paid"\n'
        '[keys."sk-a"]\nrpm = 60\nclass = "free"\n'
    )
    cfg = load_limits(path)
    assert cfg.redis_down is RedisDown.OPEN
    assert [c.name for c in cfg.classes] == ["paid", "free"]
    assert cfg.lowest_class.name == "free"
    assert cfg.priority_class("paid").reserve == 2 and cfg.lowest_class.reserve == 0
    assert cfg.tenants["acme"].rpm == 600 and cfg.tenants["acme"].tpm == 100000
    assert cfg.keys["sk-a"].rpm == 60 and cfg.keys["sk-a"].tpm is None


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[tenants.acme]\nrpm = 0\n", ["tenants.acme", "rpm"]),
        ('[tenants.acme]\nrpm = "ten"\n', ["tenants.acme", "rpm"]),
        ("[tenants.acme]\nrps = 5\n", ["tenants.acme", "rps"]),
        ('[keys."sk-1"]\ntpm = -3\n', ['keys."sk-1"', "tpm"]),
        ('[tenants.acme]\nclass = "gold"\n', ["tenants.acme", "gold"]),
        ("[classes.paid]\nshare = 1.5\n", ["classes.paid", "share"]),
        ("[classes.paid]\nrank = -1\n", ["classes.paid", "rank"]),
        ("[classes.paid]\nreserve = 1.5\n", ["classes.paid", "reserve"]),
        ('[limits]\nredis_down = "maybe"\n', ["limits", "redis_down"]),
        ("[tenant.acme]\nrpm = 5\n", ["tenant"]),
        ("[tenants.acme\n", ["TOML"]),
    ],
)
def test_bad_limits_file_names_file_table_and_field(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    """Every bad input is a ConfigError naming the file, the table and the field."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_limits(path)
    assert str(path) in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_missing_limits_file_is_a_config_error(tmp_path: Path) -> None:
    """An unreadable file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_limits(tmp_path / "nope.toml")


def test_durations_are_written_as_openai_does() -> None:
    """Reset durations look like 20ms, 1s, 1.5s, 6m0s, 1h0m0s and never round down."""
    assert format_duration(20_000) == "20ms"
    assert format_duration(19_001) == "20ms"
    assert format_duration(1_000_000) == "1s"
    assert format_duration(1_500_000) == "1.5s"
    assert format_duration(360_000_000) == "6m0s"
    assert format_duration(3_600_000_000) == "1h0m0s"


# --- RedisLimiter and MemoryLimiter -----------------------------------------------------------


def limiters(url: str, cfg: Any) -> list[Limiter]:
    return [RedisLimiter(url, cfg, window_s=WINDOW_S), MemoryLimiter(cfg, window_s=WINDOW_S)]


def test_rpm_admits_exactly_the_limit_with_headers(redis_server: RedisProcess, run: Run) -> None:
    """rpm admissions then a 429 whose six headers are present and formatted."""
    cfg = config(tenants={"acme": {"rpm": 5, "tpm": 10_000}})
    for limiter in limiters(redis_server.url, cfg):
        answers = [admit(run, limiter, "acme") for _ in range(7)]
        assert [isinstance(a, Admitted) for a in answers] == [True] * 5 + [False] * 2
        assert answers[0].headers.remaining_requests == 4
        assert answers[0].headers.remaining_tokens == 10_000 - 20
        refused = answers[5]
        assert isinstance(refused, Refused) and refused.status == 429 and not refused.never
        headers = refused.headers.as_dict()
        assert set(headers) == set(HEADERS)
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert DURATION.match(headers["x-ratelimit-reset-requests"])
        assert DURATION.match(headers["x-ratelimit-reset-tokens"])
        assert 1 <= refused.retry_after_s <= WINDOW_S


def test_retry_after_is_never_below_the_real_wait(redis_server: RedisProcess, run: Run) -> None:
    """Retry-After >= the exact wait, and nothing is admitted before that wait is over."""
    cfg = config(tenants={"acme": {"rpm": 3}})
    limiter = RedisLimiter(redis_server.url, cfg, window_s=WINDOW_S)

    async def scenario() -> tuple[list[Admitted], Refused, Admitted]:
        first = [await limiter.admit("acme", None, 1, 1) for _ in range(3)]
        refused = await limiter.admit("acme", None, 1, 1)
        while True:
            later = await limiter.admit("acme", None, 1, 1)
            if isinstance(later, Admitted):
                return first, refused, later  # type: ignore[return-value]
            await asyncio.sleep(0.01)

    first, refused, later = run(scenario())
    assert isinstance(refused, Refused)
    wait_us = first[0].at_us + round(WINDOW_S * 1e6) - refused.at_us
    assert refused.wait_s == pytest.approx(wait_us / 1e6, abs=1e-6)
    assert refused.retry_after_s >= refused.wait_s
    assert later.at_us >= refused.at_us + wait_us  # the wait was real, not an overstatement
    run(limiter.close())


def test_tpm_reserves_then_settles_to_usage(redis_server: RedisProcess, run: Run) -> None:
    """A reservation counts prompt + max_tokens; settling to usage frees the rest."""
    cfg = config(tenants={"acme": {"tpm": 1000}})
    for limiter in limiters(redis_server.url, cfg):
        held = [admit(run, limiter, "acme", None, 100, 200) for _ in range(3)]
        assert all(isinstance(a, Admitted) for a in held)
        refused = admit(run, limiter, "acme", None, 100, 200)
        assert isinstance(refused, Refused) and refused.headers.remaining_tokens == 100
        run(limiter.settle(held[0], 50))  # type: ignore[arg-type]
        again = admit(run, limiter, "acme", None, 100, 200)
        assert isinstance(again, Admitted) and again.headers.remaining_tokens == 1000 - 950


def test_release_takes_back_request_and_tokens(redis_server: RedisProcess, run: Run) -> None:
    """A released admission frees its request slot and its whole reservation."""
    cfg = config(tenants={"acme": {"rpm": 1, "tpm": 100}})
    for limiter in limiters(redis_server.url, cfg):
        first = admit(run, limiter, "acme", None, 40, 60)
        assert isinstance(first, Admitted)
        assert isinstance(admit(run, limiter, "acme", None, 1, 1), Refused)
        run(limiter.release(first))
        assert isinstance(admit(run, limiter, "acme", None, 40, 60), Admitted)


def test_oversized_reservation_is_refused_as_never(redis_server: RedisProcess, run: Run) -> None:
    """A request whose own reservation exceeds tpm is refused as one that can never run."""
    cfg = config(tenants={"acme": {"tpm": 1000}})
    for limiter in limiters(redis_server.url, cfg):
        refused = admit(run, limiter, "acme", None, 500, 600)
        assert isinstance(refused, Refused) and refused.never and "1100 tokens" in refused.message
        assert isinstance(admit(run, limiter, "acme", None, 500, 500), Admitted)


def test_key_limits_apply_on_top_of_tenant(redis_server: RedisProcess, run: Run) -> None:
    """A key is held to its own limit and its tenant's; other keys share only the tenant's."""
    cfg = config(tenants={"acme": {"rpm": 5}}, keys={"sk-small": {"rpm": 2}})
    for limiter in limiters(redis_server.url, cfg):
        small = [isinstance(admit(run, limiter, "acme", "sk-small"), Admitted) for _ in range(3)]
        assert small == [True, True, False]
        other = [isinstance(admit(run, limiter, "acme", "sk-other"), Admitted) for _ in range(4)]
        assert other == [True, True, True, False]  # the tenant's 5 are spent


def test_unlisted_tenant_is_unlimited(redis_server: RedisProcess, run: Run) -> None:
    """A tenant and key without limits are always admitted, with no headers."""
    cfg = config(tenants={"acme": {"rpm": 1}})
    for limiter in limiters(redis_server.url, cfg):
        answers = [admit(run, limiter, "other") for _ in range(20)]
        assert all(isinstance(a, Admitted) and not a.headers.as_dict() for a in answers)


def test_concurrent_admissions_in_one_process_are_exact(
    redis_server: RedisProcess, run: Run
) -> None:
    """200 concurrent admissions against rpm 50 admit exactly 50, in every Redis mode."""
    cfg = config(tenants={"acme": {"rpm": 50, "tpm": 10**9}})

    async def burst(mode: str) -> int:
        limiter = RedisLimiter(redis_server.url, cfg, window_s=30, prefix=f"{mode}:", mode=mode)
        answers = await asyncio.gather(*(limiter.admit("acme", None, 1, 1) for _ in range(200)))
        await limiter.close()
        return sum(isinstance(a, Admitted) for a in answers)

    for mode in ("evalsha", "eval", "watch"):
        assert run(burst(mode)) == 50


def test_script_and_transaction_modes_share_state(redis_server: RedisProcess, run: Run) -> None:
    """A replica on Lua and one on WATCH/MULTI count against the same window."""
    cfg = config(tenants={"acme": {"rpm": 4, "tpm": 1000}})
    lua = RedisLimiter(redis_server.url, cfg, window_s=WINDOW_S)
    watch = RedisLimiter(redis_server.url, cfg, window_s=WINDOW_S, mode="watch")
    answers = [admit(run, lim, "acme", None, 100, 100) for lim in (lua, watch, lua, watch, lua)]
    assert [isinstance(a, Admitted) for a in answers] == [True] * 4 + [False]
    run(watch.settle(answers[0], 0))  # type: ignore[arg-type]
    refused = admit(run, lua, "acme", None, 1, 1)
    assert isinstance(refused, Refused) and refused.headers.remaining_tokens == 1000 - 600


@pytest.mark.parametrize(
    ("renamed", "mode"),
    [(("SCRIPT", "EVALSHA"), "eval"), (("SCRIPT", "EVALSHA", "EVAL"), "watch")],
)
def test_falls_back_where_scripting_is_blocked(
    tmp_path: Path, renamed: tuple[str, ...], mode: str, run: Run
) -> None:
    """Behind a Redis refusing SCRIPT/EVALSHA (then EVAL too) limits stay exact."""
    args = [a for name in renamed for a in ("--rename-command", name, "")]
    with RedisProcess(tmp_path / "redis", *args) as proc:
        cfg = config(tenants={"acme": {"rpm": 3, "tpm": 100}})
        limiter = RedisLimiter(proc.url, cfg, window_s=WINDOW_S)
        answers = [admit(run, limiter, "acme", None, 10, 10) for _ in range(4)]
        assert [isinstance(a, Admitted) for a in answers] == [True, True, True, False]
        run(limiter.release(answers[0]))  # type: ignore[arg-type]
        assert isinstance(admit(run, limiter, "acme", None, 10, 10), Admitted)
        assert limiter.stats().mode == mode and limiter.stats().redis_down == 0


def _dead_url() -> str:
    port = free_port()
    with socket.socket() as s:  # nothing listens there
        s.settimeout(0.2)
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return f"redis://127.0.0.1:{port}/0"


def test_redis_down_closed_refuses_with_503_and_counts(run: Run) -> None:
    """Redis unreachable and policy closed: 503 refusals, counted, never a local limit."""
    cfg = parse_limits({"tenants": {"acme": {"rpm": 1000}}})
    limiter = RedisLimiter(_dead_url(), cfg)
    answers = [admit(run, limiter, "acme") for _ in range(3)]
    assert all(isinstance(a, Refused) and a.status == 503 for a in answers)
    assert limiter.stats().redis_down == 3


def test_redis_down_open_admits_and_counts(redis_server: RedisProcess, run: Run) -> None:
    """Policy open: admitted, marked degraded and counted, once Redis has gone away."""
    cfg = parse_limits({"limits": {"redis_down": "open"}, "tenants": {"acme": {"rpm": 1}}})
    limiter = RedisLimiter(redis_server.url, cfg)
    assert isinstance(admit(run, limiter, "acme"), Admitted)
    assert isinstance(admit(run, limiter, "acme"), Refused)
    redis_server.stop()
    answers = [admit(run, limiter, "acme") for _ in range(3)]
    assert all(isinstance(a, Admitted) and a.degraded for a in answers)
    run(limiter.settle(answers[0], 5))  # type: ignore[arg-type]
    stats = limiter.stats()
    assert stats.redis_down == 3 and stats.admitted == 4 and stats.refused == 1


# --- across OS processes ------------------------------------------------------------------


def test_window_arithmetic() -> None:
    """window_extremes counts (t - w, t] at each admission, and the steady minimum before it."""
    records = [(t, 1) for t in (0, 10, 20, 30, 40, 50)]
    assert window_extremes(records, 25, weighted=False) == (3, 2)
    assert window_extremes([(0, 5), (10, 7), (30, 1)], 25, weighted=True).max == 12


@pytest.mark.parametrize("mode", ["evalsha", "watch"])
def test_four_processes_at_three_times_the_limit_stay_exact(
    redis_server: RedisProcess, mode: str
) -> None:
    """4 processes at 3x the limit: no window holds more than rpm, a refusal only ever meets
    a full window, settled tokens never pass tpm, and every 429 has its headers."""
    window_s, rpm, tpm = 4.0, 200, 30_000
    limits = {"tenants": {"r": {"rpm": rpm, "tpm": 10**9}, "t": {"rpm": 10**6, "tpm": tpm}}}
    rates = {"r": 3 * rpm / window_s / 4, "t": 3 * tpm / 200 / window_s / 4}
    start = time.time() + 3.0  # after the children have imported
    demands = [
        Demand(redis_server.url, limits, window_s, 3 * window_s, rates, start, seed=i,
               mode=mode, hold_s=window_s / 4)
        for i in range(4)
    ]  # fmt: skip
    outcomes = run_processes(demands)
    window_us = round(window_s * 1e6)
    admitted = [r for o in outcomes for r in o.admitted["r"]]
    requests = window_extremes(admitted, window_us, weighted=False)
    tokens = window_extremes([r for o in outcomes for r in o.admitted["t"]], window_us, True)
    refused_at = [t for o in outcomes for t in o.refused_at["r"]]
    assert requests.max <= rpm and tokens.max <= tpm, (requests, tokens)
    assert refused_with_room([a for a, _ in admitted], refused_at, window_us, rpm) == 0
    # The least in a busy window depends on when requests arrive (a freed slot waits for the
    # next one, and WATCH/MULTI takes 4 round trips and retries): loosely checked here, on
    # the script; `kvtier bench limits` measures the 0.98 target at the real 60 s window.
    assert mode != "evalsha" or requests.min >= 0.95 * rpm, requests
    assert sum(o.refused for o in outcomes) == sum(o.refused_with_headers for o in outcomes) > 0
    assert sum(o.retry_after_short + o.redis_down for o in outcomes) == 0


def test_script_flushed_from_redis_is_loaded_again(redis_server: RedisProcess, run: Run) -> None:
    """After SCRIPT FLUSH (a restarted Redis) EVALSHA's NOSCRIPT loads the script again."""
    cfg = config(tenants={"acme": {"rpm": 2}})
    limiter = RedisLimiter(redis_server.url, cfg, window_s=WINDOW_S)
    assert isinstance(admit(run, limiter, "acme"), Admitted)
    run(limiter._redis.script_flush())
    assert isinstance(admit(run, limiter, "acme"), Admitted)
    assert isinstance(admit(run, limiter, "acme"), Refused)
    assert limiter.stats().mode == "evalsha"
    run(limiter.close())


def test_unsettled_reservation_leaves_with_the_window(redis_server: RedisProcess, run: Run) -> None:
    """A reservation never settled (its gateway died) stops counting once its window passed."""
    cfg = config(tenants={"acme": {"tpm": 500}})
    limiter = RedisLimiter(redis_server.url, cfg, window_s=0.5)
    first = admit(run, limiter, "acme", None, 100, 300)
    assert isinstance(first, Admitted)
    assert isinstance(admit(run, limiter, "acme", None, 100, 300), Refused)
    run(asyncio.sleep(0.6))
    again = admit(run, limiter, "acme", None, 100, 300)
    assert isinstance(again, Admitted) and again.headers.remaining_tokens == 100
    run(limiter.close())
