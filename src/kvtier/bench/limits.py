"""`kvtier bench limits`: the rate limiter's accuracy across gateway replicas, and the
admission queue's priority at saturation.

Limits: a throw-away redis-server (or `--redis`) and `--processes` OS processes, each driving
`RedisLimiter` as one gateway replica would, at 3 x the limit together, for `--windows`
windows of `--window-s` seconds (`limits_drive`). Tenant `r` is bound by its rpm, tenant `t`
by its tpm (each with the other limit loose, so every refusal carries all six headers).
Reported: the most and the least admitted in any window over the limit (the least over
windows wholly in the steady state), the most tokens charged in any window past tpm in units
of max_tokens, and the share of refusals carrying the headers and a Retry-After no shorter
than the exact wait.

Priority: an `AdmissionQueue` of `capacity` slots in one process, Poisson arrivals at 1.5 x
its capacity, paid:free demand 1:4, shares 0.8/0.2, service times uniform in 0.5-1.5 x the
mean, paid with `--paid-reserve` slots kept for it; reported: each class's p99 queue wait, the
refusals (queue full) of each class and the requests served per second. The same run without
a reserve is reported beside it, so the reserve's cost in throughput is in view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.limits_drive import Demand, refused_with_room, run_processes, window_extremes
from kvtier.bench.remote_io import RedisProcess
from kvtier.gateway.limits_config import PriorityClass
from kvtier.gateway.priority import AdmissionQueue, QueueFull

PROMPT_TOKENS, MAX_TOKENS = 100, 200


def classes(paid_reserve: int) -> tuple[PriorityClass, PriorityClass]:
    return PriorityClass("paid", 0.8, 0, paid_reserve), PriorityClass("free", 0.2, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="a 2 s window, 3 windows, a 5 s priority run")
    add("--window-s", type=float, default=60.0, help="the rate-limit window (60: per minute)")
    add("--windows", type=float, default=2.5, help="demand lasts this many windows")
    add("--rpm", type=int, default=1000, help="requests per window of tenant r")
    add("--tpm", type=int, default=200_000, help="tokens per window of tenant t")
    add("--processes", type=int, default=4, help="gateway replicas (OS processes)")
    add("--mode", choices=("evalsha", "eval", "watch"), default="evalsha",
        help="how the limiter reaches Redis (eval/watch: the no-script fallbacks)")  # fmt: skip
    add("--redis", help="a Redis URL (default: a throw-away redis-server)")
    add("--capacity", type=int, default=16, help="admission queue slots")
    add("--service-ms", type=float, default=50.0, help="mean request time in the queue run")
    add("--priority-s", type=float, default=30.0, help="length of the priority run")
    add("--paid-reserve", type=int, default=1,
        help="slots free leaves idle for paid (also run without one)")  # fmt: skip
    add("--gateways", type=int, default=0,
        help="also: the rpm limit through this many real gateway processes over HTTP "
        "(60 s window)")  # fmt: skip
    add("--arrivals", choices=("even", "poisson"), default="even",
        help="--gateways: the client's arrivals (Poisson: the least admitted in a window is "
        "then bounded by the arrivals themselves; the bench prints that bound)")  # fmt: skip
    add("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.window_s, args.windows, args.rpm, args.tpm, args.priority_s = 2.0, 3.0, 100, 30_000, 5
    if args.processes < 1 or args.rpm < 50 or args.window_s <= 0:
        print("kvtier bench limits: need --processes >= 1, --rpm >= 50, --window-s > 0",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        result = {
            "limits": limits_figures(args),
            "priority": asyncio.run(priority_figures(args, args.paid_reserve)),
            "priority_no_reserve": asyncio.run(priority_figures(args, 0)),
        }
    except (RuntimeError, OSError) as exc:
        print(f"kvtier bench limits: {exc}", file=sys.stderr)
        return 2
    if args.gateways > 0:
        from kvtier.bench.limits_http import http_figures

        result["gateways"] = http_figures(args.gateways, args.rpm, args.windows, args.arrivals)
    result["targets"] = targets(result)
    print(json.dumps(result) if args.json else table(result))
    return 0


def limits_figures(args: argparse.Namespace) -> dict[str, Any]:
    if args.redis:
        return _limits_against(args.redis, args)
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp) / "redis") as redis:
        return _limits_against(redis.url, args)


def _demands(url: str, args: argparse.Namespace) -> list[Demand]:
    """Each process's share of 3 x each limit; tenant r is bound by rpm, t by tpm."""
    limits = {"tenants": {"r": {"rpm": args.rpm, "tpm": 10**12},
                          "t": {"rpm": 10**9, "tpm": args.tpm}}}  # fmt: skip
    mean_used = PROMPT_TOKENS + MAX_TOKENS / 2
    per_window = {"r": 3 * args.rpm, "t": 3 * args.tpm / mean_used}
    rates = {t: n / args.window_s / args.processes for t, n in per_window.items()}
    start = time.time() + 3.0  # after every process has started
    return [
        Demand(url, limits, args.window_s, args.windows * args.window_s, rates, start,
               PROMPT_TOKENS, MAX_TOKENS, hold_s=min(5.0, args.window_s / 4), seed=i,
               mode=args.mode)
        for i in range(args.processes)
    ]  # fmt: skip


def _limits_against(url: str, args: argparse.Namespace) -> dict[str, Any]:
    demands = _demands(url, args)
    duration_s = args.windows * args.window_s
    outcomes = run_processes(demands)
    window_us = round(args.window_s * 1e6)
    requests = window_extremes([r for o in outcomes for r in o.admitted["r"]], window_us, False)
    tokens = window_extremes([r for o in outcomes for r in o.admitted["t"]], window_us, True)
    refused = sum(o.refused for o in outcomes)
    with_room = refused_with_room(
        [a for o in outcomes for a, _ in o.admitted["r"]],
        [t for o in outcomes for t in o.refused_at["r"]], window_us, args.rpm,
    )  # fmt: skip
    return {
        "window_s": args.window_s, "duration_s": duration_s, "processes": args.processes,
        "mode": args.mode, "rpm": args.rpm, "tpm": args.tpm, "max_tokens": MAX_TOKENS,
        "demand_x_limit": 3.0,
        "admitted": sum(len(o.admitted[t]) for o in outcomes for t in o.admitted),
        "refused": refused,
        "requests_max_over_limit": requests.max / args.rpm,
        "requests_min_over_limit": requests.min / args.rpm,
        "refused_with_room": with_room,
        "tokens_max_over_limit": tokens.max / args.tpm,
        "tpm_overshoot_max_tokens": max(0, tokens.max - args.tpm) / MAX_TOKENS,
        "refusals_with_headers_pct": 100.0 * sum(o.refused_with_headers for o in outcomes)
        / max(1, refused),
        "retry_after_below_wait": sum(o.retry_after_short for o in outcomes),
        "redis_down": sum(o.redis_down for o in outcomes),
    }  # fmt: skip


async def priority_figures(args: argparse.Namespace, paid_reserve: int) -> dict[str, Any]:
    """Open-loop arrivals through an AdmissionQueue at 1.5 x its capacity."""
    queue = AdmissionQueue(args.capacity, classes(paid_reserve), max_queued=8 * args.capacity)
    service_s = args.service_ms / 1000
    rate = 1.5 * args.capacity / service_s
    rng = random.Random(1)
    waits: dict[str, list[float]] = {"paid": [], "free": []}
    refused = {"paid": 0, "free": 0}

    async def request(name: str) -> None:
        try:
            ticket = await queue.acquire(name)
        except QueueFull:
            refused[name] += 1
            return
        waits[name].append(ticket.waited_s)
        await asyncio.sleep(service_s * rng.uniform(0.5, 1.5))
        queue.release(ticket)

    tasks = []
    due = time.monotonic()
    begin = due
    end = due + args.priority_s
    while due < end:
        due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(request("paid" if rng.random() < 0.2 else "free")))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - begin
    p99 = {n: float(np.percentile(w, 99)) * 1000 if w else 0.0 for n, w in waits.items()}
    return {
        "capacity": args.capacity, "service_ms": args.service_ms, "load": 1.5,
        "demand_paid_free": "1:4", "shares": {c.name: c.share for c in classes(0)},
        "paid_reserve": paid_reserve,
        "max_queued": 8 * args.capacity, "seconds": args.priority_s,
        "paid_p99_wait_ms": p99["paid"], "free_p99_wait_ms": p99["free"],
        "paid_over_free_p99": p99["paid"] / p99["free"] if p99["free"] else None,
        "served": {n: len(w) for n, w in waits.items()}, "refused": refused,
        "served_per_s": sum(len(w) for w in waits.values()) / elapsed,
    }  # fmt: skip


def targets(result: dict[str, Any]) -> dict[str, bool]:
    lim, pri = result["limits"], result["priority"]
    ratio = pri["paid_over_free_p99"]
    return {
        "requests in any window <= limit": lim["requests_max_over_limit"] <= 1.0
        and lim["refused_with_room"] == 0,
        "requests in any window >= 0.98 limit": lim["requests_min_over_limit"] >= 0.98,
        "tpm overshoot <= 1 x max_tokens": lim["tpm_overshoot_max_tokens"] <= 1.0,
        "every 429 carries the headers": lim["refusals_with_headers_pct"] == 100.0
        and lim["retry_after_below_wait"] == 0,
        "paid p99 wait <= 0.1 x free's": ratio is not None and ratio <= 0.1,
        "no 429 for paid within its share": pri["refused"]["paid"] == 0,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    lim, pri, met = result["limits"], result["priority"], result["targets"]
    rows = [
        ("admitted in any window / limit, max", f"{lim['requests_max_over_limit']:.4f}",
         "<= 1", met["requests in any window <= limit"]),
        ("admitted in any window / limit, min", f"{lim['requests_min_over_limit']:.4f}",
         ">= 0.98", met["requests in any window >= 0.98 limit"]),
        ("refusals while the window had room", str(lim["refused_with_room"]), "0",
         lim["refused_with_room"] == 0),
        ("TPM overshoot (x max_tokens)", f"{lim['tpm_overshoot_max_tokens']:.2f}",
         "<= 1", met["tpm overshoot <= 1 x max_tokens"]),
        ("429s with all headers, Retry-After >= wait", f"{lim['refusals_with_headers_pct']:.1f}%",
         "100%", met["every 429 carries the headers"]),
        ("paid p99 wait / free p99 wait",
         f"{pri['paid_p99_wait_ms']:.1f} / {pri['free_p99_wait_ms']:.1f} ms",
         "<= 0.1", met["paid p99 wait <= 0.1 x free's"]),
        ("paid refusals (within share)", str(pri["refused"]["paid"]), "0",
         met["no 429 for paid within its share"]),
    ]  # fmt: skip
    bare = result["priority_no_reserve"]
    head = (
        f"kvtier bench limits: {lim['processes']} processes, window {lim['window_s']:g} s x "
        f"{lim['duration_s'] / lim['window_s']:g}, rpm {lim['rpm']}, tpm {lim['tpm']}, "
        f"mode {lim['mode']}, {lim['admitted']} admitted / {lim['refused']} refused; queue: "
        f"capacity {pri['capacity']}, load 1.5, {pri['seconds']:g} s, paid reserve "
        f"{pri['paid_reserve']}"
    )
    lines = [head, "", f"{'figure':<46} {'value':>22} {'target':>8}  met"]
    lines += [f"{n:<46} {v:>22} {t:>8}  {'yes' if ok else 'NO'}" for n, v, t, ok in rows]
    lines += [
        "",
        f"queue without a reserve: paid / free p99 wait {bare['paid_p99_wait_ms']:.1f} / "
        f"{bare['free_p99_wait_ms']:.1f} ms (ratio {bare['paid_over_free_p99'] or 0:.3f}), "
        f"{bare['served_per_s']:.0f} served/s; with paid's reserve of {pri['paid_reserve']}: "
        f"{pri['served_per_s']:.0f} served/s",
    ]
    if "gateways" in result:
        g = result["gateways"]
        lines += [
            "",
            f"through {g['gateways']} gateway processes (HTTP, 60 s window, {g['arrivals']} "
            "arrivals): admitted in any "
            f"window / limit max {g['requests_max_over_limit']:.3f}, min "
            f"{g['requests_min_over_limit']:.3f} on the limiter's clock "
            f"({g['admissions_logged']} admissions read from Redis); on the client's send "
            f"times max {g['client_clock_max_over_limit']:.3f}, min "
            f"{g['client_clock_min_over_limit']:.3f}; an exact limiter with no delay on the same "
            f"arrivals: min {g['exact_limiter_min_over_limit']:.3f}; {g['admitted']} admitted, "
            f"{g['refused']} "
            f"429s ({g['refusals_with_headers_pct']:.1f}% with every header), "
            f"{g['other_status']} other",
        ]
    return "\n".join(lines)
