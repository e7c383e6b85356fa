"""`kvtier bench limits --gateways N`: the rate limit through N real `kvtier gateway`
processes sharing one Redis, in front of one fast `kvtier worker-sim`.

One tenant with `--rpm` requests per window; a client sends 3 x that, open loop (evenly
paced, as each process of the library bench does, or Poisson with `--arrivals poisson`),
spread round-robin over the gateways, for `--windows` windows. Every 429 is checked for
`Retry-After` and the six `x-ratelimit-*` headers.

Admissions are counted on two clocks. The limiter's: while the demand runs, the bench reads
the tenant's admission log in Redis (each admission scored by Redis's time, kept for one
window) every few seconds, so every admission is seen at the time the limiter admitted it.
The client's: a 200 counts at the moment the client sent it, which adds each request's wait
in its gateway (seconds, on a loaded machine) to the window it seems to fall in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import numpy as np
import redis.asyncio as aioredis

from kvtier.bench.limits_drive import window_extremes
from kvtier.bench.remote_io import RedisProcess

HEADERS = [f"x-ratelimit-{w}-{u}" for w in ("limit", "remaining", "reset")
           for u in ("requests", "tokens")]  # fmt: skip
KEY = "key-bench-0001"
WINDOW_S = 60.0  # the gateway's window


def _start(args: list[str], banner: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(banner):
            return proc, line.split()[2 if banner == "kvtier gateway:" else 1]
    proc.kill()
    raise RuntimeError(f"{' '.join(args[:1])} did not start")


def http_figures(gateways: int, rpm: int, windows: float, arrivals: str = "even") -> dict[str, Any]:
    """Admitted per 60 s window ÷ rpm through `gateways` gateway processes at 3 x the limit."""
    window_s = WINDOW_S
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp) / "redis") as redis:
        (Path(tmp) / "keys").write_text(f"bench {KEY}\n")
        limits = f"[tenants.bench]\nrpm = {rpm}\ntpm = 1000000000\n"
        (Path(tmp) / "limits.toml").write_text(limits)
        procs = []
        try:
            sim, sim_url = _start(["worker-sim", "--port", "0", "--prefill-ms-per-token", "0",
                                   "--decode-ms-per-token", "0"], "worker-sim")  # fmt: skip
            procs.append(sim)
            urls = []
            for _ in range(gateways):
                gw, url = _start(["gateway", "--port", "0", "--workers", sim_url, "--redis",
                                  redis.url, "--auth-file", str(Path(tmp) / "keys"), "--limits",
                                  str(Path(tmp) / "limits.toml")], "kvtier gateway:")  # fmt: skip
                procs.append(gw)
                urls.append(url)
            sent, logged = asyncio.run(
                _observed(redis.url, urls, 3 * rpm / window_s, windows * window_s, arrivals)
            )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    return _figures(sent, logged, rpm, window_s, gateways, arrivals)


Sent = list[tuple[int, int, bool]]  # (sent at µs, status, every header there)
POLL_S = 5.0  # well inside the window: every admission is still in the log when read


async def _observed(
    redis_url: str, urls: list[str], per_s: float, duration_s: float, arrivals: str
) -> tuple[Sent, dict[str, int]]:
    """The demand's outcomes, and every admission the limiter logged: id -> Redis time (µs)."""
    logged: dict[str, int] = {}
    client = aioredis.from_url(redis_url)
    stop = asyncio.Event()

    async def read_logs() -> None:
        async for name in client.scan_iter(count=1000):
            if await client.type(name) == b"zset":
                entries = await client.zrange(name, 0, -1, withscores=True)
                for member, score in cast(list[tuple[bytes, float]], entries):
                    logged[member.decode().rsplit(":", 1)[0]] = int(score)  # settles keep the id

    async def poll() -> None:
        while not stop.is_set():
            await read_logs()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
        await read_logs()

    poller = asyncio.create_task(poll())
    try:
        sent = await _demand(urls, per_s, duration_s, arrivals == "poisson")
    finally:
        stop.set()
        await poller
        await client.aclose()
    return sent, logged


async def _demand(urls: list[str], per_s: float, duration_s: float, poisson: bool) -> Sent:
    """Every request's outcome, arrivals at `per_s`: evenly paced, or Poisson."""
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {KEY}"}
    out: Sent = []
    rng = np.random.default_rng(0)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def one(url: str) -> None:
            at = time.time_ns() // 1000
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                complete = all(h in resp.headers for h in HEADERS)
                if resp.status == 429:
                    complete = complete and int(resp.headers.get("Retry-After", "0")) >= 1
                out.append((at, resp.status, complete))

        tasks, start, t, i = [], time.monotonic(), 0.0, 0
        while t < duration_s:
            t += float(rng.exponential(1.0 / per_s)) if poisson else 1.0 / per_s
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(one(urls[i % len(urls)])))
            i += 1
        await asyncio.gather(*tasks)
    return out


def _figures(
    sent: Sent, logged: dict[str, int], rpm: int, window_s: float, gateways: int, arrivals: str
) -> dict[str, Any]:
    admitted = [(at, 1) for at, status, _ in sent if status == 200]
    refused = [ok for _, status, ok in sent if status == 429]
    window_us = round(window_s * 1e6)
    client = window_extremes(admitted, window_us, False)
    limiter = window_extremes([(at, 1) for at in logged.values()], window_us, False)
    ideal = window_extremes(
        _exact(sorted(at for at, _, _ in sent), rpm, window_us), window_us, False
    )
    return {
        "gateways": gateways, "arrivals": arrivals, "window_s": window_s, "rpm": rpm,
        "requests": len(sent),
        "admitted": len(admitted), "refused": len(refused),
        "other_status": sum(1 for _, s, _ in sent if s not in (200, 429)),
        "admissions_logged": len(logged),
        "requests_max_over_limit": limiter.max / rpm,
        "requests_min_over_limit": limiter.min / rpm,
        "client_clock_max_over_limit": client.max / rpm,
        "client_clock_min_over_limit": client.min / rpm,
        "exact_limiter_min_over_limit": ideal.min / rpm,
        "refusals_with_headers_pct": 100.0 * sum(refused) / max(1, len(refused)),
    }  # fmt: skip


def _exact(arrivals_us: list[int], limit: int, window_us: int) -> list[tuple[int, int]]:
    """What an exact sliding-log limiter with no delay admits of these arrivals: the bound
    for the least admitted in a window. With Poisson demand starting cold, the first window's
    admissions repeat the arrivals' gaps, and a freed slot waits for the next arrival."""
    log: collections.deque[int] = collections.deque()
    admitted = []
    for at in arrivals_us:
        while log and log[0] <= at - window_us:
            log.popleft()
        if len(log) < limit:
            log.append(at)
            admitted.append((at, 1))
    return admitted
