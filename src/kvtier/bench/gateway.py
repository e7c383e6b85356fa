"""`kvtier bench gateway`: every routing policy side by side through a real `kvtier gateway`
process to 4 and 8 simulated workers (`kvtier worker-sim --count K`, one process), under KV
pressure, with and without kvtier's tiers behind the workers.

Each configuration starts fresh sims and a fresh gateway, then runs one workload open loop
(`gateway_client`): W1 `chat`, W2 `trace` (the Mooncake-format sample), and `noreuse`. Each
worker's cache is the live context / `--pressure`. Tiers `all`: a kvtier DRAM tier of 2 x the
cache per worker plus a shared tier holding the whole context behind all of them. Tiers
`dram` (the tier-credit runs): the workers' GPU caches together hold half the live context and
each has a kvtier DRAM tier of 2 x its cache, so a prefix often survives only in one worker's
DRAM, where crediting it pays (elsewhere it is a recompute).
The sweep (kvtier and round-robin, 8 workers, tiers off) raises the load on the trace to
find each policy's knee (`gateway_report`). Then: gateway overhead against calling workers
directly (64 concurrent streams, sims with no prefill time: paced at 20 ms a token with the
streams desynchronised, the judged figure, and 1 ms a token in lockstep), 1,000 concurrent
streams through the gateway, and the routing decision timed in process (`gateway_route`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from kvtier.bench import gateway_client as gc
from kvtier.bench import gateway_procs as procs
from kvtier.bench import gateway_report as rep
from kvtier.bench import gateway_workload as gw
from kvtier.bench.gateway_route import time_routing
from kvtier.bench.metrics import percentiles_ms
from kvtier.bench.trace import SAMPLE, read_trace
from kvtier.config import env_default

POLICIES = ("round-robin", "least-load", "prefix", "kvtier")
SWEPT = ("round-robin", "kvtier")
ANSWER_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Plan:
    workers: tuple[int, ...]
    load: float  # the load of every unswept run
    sweep_loads: tuple[float, ...]
    noreuse_load: float  # past saturation: the no-reuse pair compares capacity
    chat: gw.ChatSpec
    trace_requests: int
    noreuse_requests: int
    streams: int  # concurrent streams of the overhead check
    stream_requests: int  # requests per stream there
    burst: int  # concurrent streams of the no-5xx check
    route_blocks: int


FULL = Plan((4, 8), 4.0, (4.0, 6.0, 9.0, 13.0, 18.0, 27.0, 40.0, 60.0, 90.0), 24.0,
            gw.ChatSpec(), 300,
            320, 64, 8, 1000, 1 << 20)  # fmt: skip
QUICK = Plan((4,), 8.0, (8.0, 16.0), 16.0, gw.ChatSpec(users=6, rounds=2, think_s=0.2), 30, 16,
             16, 4, 100, 1 << 16)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="a small run (about a minute)")
    add("--pressure", type=float, default=env_default("KVTIER_BENCH_PRESSURE", "4"),
        help="live context / one worker's cache (at least 2)")  # fmt: skip
    add("--prefill-ms-per-token", type=float, default=0.05)
    add("--decode-ms-per-token", type=float, default=2.0)
    add("--trace", type=Path, default=SAMPLE, help="Mooncake-format JSONL trace")
    add("--vllm", action="store_true",
        help="instead: two real vLLM CPU engines with kvtier behind it, per policy")  # fmt: skip
    add("--json", action="store_true", help="print one JSON object")
    add("--out", type=Path, default=env_default("KVTIER_BENCH_OUT", "results"))


def run(args: argparse.Namespace) -> int:
    if args.pressure < 2:
        print("kvtier bench gateway: --pressure must be at least 2", file=sys.stderr)
        return 2
    if args.vllm:
        return _run_vllm(args)
    try:
        result = bench(args, QUICK if args.quick else FULL)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvtier bench gateway: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    pngs = rep.plot(args.out / "gateway.png", result)
    (args.out / "gateway.md").write_text(rep.markdown(result))
    result["files"] = [str(args.out / n) for n in ("gateway.json", "gateway.md")]
    result["files"] += [str(p) for p in pngs]
    text = json.dumps(_clean(result))
    (args.out / "gateway.json").write_text(text)
    print(text if args.json else rep.markdown(result))
    return 0


def _run_vllm(args: argparse.Namespace) -> int:
    from kvtier.bench import gateway_vllm

    chat = gateway_vllm.Chat(sessions=4, turns=3) if args.quick else gateway_vllm.Chat()
    try:
        result = gateway_vllm.bench(chat)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvtier bench gateway --vllm: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(result))
    (args.out / "gateway_vllm.json").write_text(text)
    print(text if args.json else gateway_vllm.markdown(result))
    return 0


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return rep.finite(value)


def workloads(args: argparse.Namespace, plan: Plan) -> dict[str, gw.Workload]:
    records = read_trace(args.trace, plan.trace_requests)
    trace = gw.trace(records, ANSWER_TOKENS)
    return {
        "chat": gw.chat(plan.chat),
        "trace": trace,
        "noreuse": gw.noreuse(plan.noreuse_requests, 4096, 2.0, ANSWER_TOKENS, seed=7),
    }


def configurations(plan: Plan) -> list[dict[str, Any]]:
    """Every run, in order: the matrix (tiers on only with the most workers), the sweep (its
    point at the matrix's load is the matrix's row), the no-reuse pair."""
    out = []
    top = max(plan.workers)
    for workers in plan.workers:
        for work in ("chat", "trace"):
            for tiers in ("off", "all") if workers == top else ("off",):
                for policy in POLICIES:
                    swept = work == "trace" and workers == top and tiers == "off"
                    swept = swept and policy in SWEPT and plan.load in plan.sweep_loads
                    out.append(dict(workload=work, workers=workers, policy=policy, tiers=tiers,
                                    load=plan.load, sweep=swept))  # fmt: skip
    for policy in ("prefix", "kvtier"):
        out.append(dict(workload="trace", workers=top, policy=policy, tiers="dram",
                        load=plan.load, sweep=False))  # fmt: skip
    for policy in SWEPT:
        for load in (x for x in plan.sweep_loads if x != plan.load):
            out.append(dict(workload="trace", workers=top, policy=policy, tiers="off",
                            load=load, sweep=True))  # fmt: skip
        out.append(dict(workload="noreuse", workers=top, policy=policy, tiers="off",
                        load=plan.noreuse_load, sweep=False))  # fmt: skip
    return out


def bench(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    started = time.perf_counter()
    works = workloads(args, plan)
    caches = {name: max(int(w.context_tokens / args.pressure), 16) for name, w in works.items()}
    rows = []
    configs = configurations(plan)
    with tqdm(total=len(configs), desc="gateway configurations", file=sys.stderr) as bar:
        for key in configs:
            work = works[key["workload"]]
            cache = caches[key["workload"]]
            if key["tiers"] == "dram":  # all GPU caches together: half the context
                cache = max(work.context_tokens // (2 * key["workers"]), 16)
            rows.append(_run_config(args, key, work, cache))
            bar.update()
    overhead = asyncio.run(_overhead(args, plan))
    route = time_routing(8, plan.route_blocks)
    head = rep.headline(rows, "trace", max(plan.workers), plan.load)
    head["overhead_ttft_p50_ms"] = overhead["overhead_ttft_p50_ms"]
    head["overhead_ttft_p99_ms"] = overhead["overhead_ttft_p99_ms"]
    head["overhead_direct_controlled"] = overhead["paced"]["direct_controlled"]
    head["overhead_lockstep_ttft_p50_ms"] = overhead["lockstep"]["overhead_ttft_p50_ms"]
    head["overhead_lockstep_ttft_p99_ms"] = overhead["lockstep"]["overhead_ttft_p99_ms"]
    head["overhead_lockstep_direct_controlled"] = overhead["lockstep"]["direct_controlled"]
    head["streams_1000_errors"] = overhead["burst_errors"]
    head["route_p99_ms_1m_blocks"] = route.p99_ms
    return {
        "benchmark": "gateway",
        "quick": args.quick,
        "sim": f"prefill {args.prefill_ms_per_token} ms/token, decode "
        f"{args.decode_ms_per_token} ms/token, {ANSWER_TOKENS} answer tokens, dram load "
        "0.01 ms/token, shared load 0.02 ms/token",
        "pressure": {n: round(w.context_tokens / caches[n], 2) for n, w in works.items()},
        "context_tokens": {n: w.context_tokens for n, w in works.items()},
        "cache_tokens": caches,
        "headline": head,
        "overhead": overhead,
        "route": route._asdict(),
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def _sim_options(args: argparse.Namespace, cache: int, tiers: str, context: int) -> list[str]:
    opts = ["--cache-tokens", str(cache), "--prefill-ms-per-token", str(args.prefill_ms_per_token),
            "--decode-ms-per-token", str(args.decode_ms_per_token)]  # fmt: skip
    if tiers in ("dram", "all"):
        opts += ["--kvtier-tokens", str(2 * cache)]
    if tiers == "all":
        opts += ["--shared-tokens", str(2 * context)]
    return opts


def _run_config(
    args: argparse.Namespace, key: dict[str, Any], work: gw.Workload, cache: int
) -> rep.Row:
    sim_opts = _sim_options(args, cache, key["tiers"], work.context_tokens)
    index_tokens = 2 * work.context_tokens if key["tiers"] != "off" else cache
    gw_opts = ["--policy", key["policy"], "--worker-cache-tokens", str(index_tokens),
               "--prefill-ms-per-token", str(args.prefill_ms_per_token)]  # fmt: skip
    with procs.sims(key["workers"], sim_opts) as sims, procs.gateway(sims, gw_opts) as gate:
        results, inflight = asyncio.run(_drive(procs.gateway_url(gate), work, key["load"]))
    oracle = gw.oracle_tokens([r.body for r in results], 16)
    return rep.row(key, results, oracle, inflight, args.prefill_ms_per_token)


async def _drive(
    url: str, work: gw.Workload, load: float
) -> tuple[list[gc.Result], list[gc.InflightSample]]:
    samples: list[gc.InflightSample] = []
    sampler = asyncio.create_task(gc.sample_inflight(url, 0.1, samples))
    try:
        results = await gc.run_workload(url, work, load)
    finally:
        sampler.cancel()
    return results, samples


async def _closed_loop(
    urls: list[str], streams: int, requests: int, tokens: int, spread_s: float = 0.0
) -> list[gc.Result]:
    """`streams` concurrent clients, each sending `requests` short prompts in turn, spread
    over `urls` round-robin. Client c starts `spread_s * c / streams` late, so clients with
    equal requests are not in lockstep (0: all start at once and stay in step)."""
    out: list[gc.Result] = []
    async with gc.session_client() as http:
        t0 = time.perf_counter()

        async def client(c: int) -> None:
            await asyncio.sleep(spread_s * c / streams)
            for i in range(requests):
                text = gw.text_block(3, c * requests + i, 256)
                body = gc.chat_body([{"role": "user", "content": text}], tokens)
                out.append(await gc.stream(http, urls[(c + i) % len(urls)], body, t0, "o", i))

        await asyncio.gather(*(client(c) for c in range(streams)))
    return out


class OverheadMode(NamedTuple):
    """One way to drive the overhead check: the sims' decode pace, answer length, and
    whether the streams start spread over one answer's time or all at once."""

    decode_ms_per_token: float
    tokens: int
    spread: bool


# Judged: a GPU batch's inter-token time (tens of ms for a large batch; not measured here), streams
# desynchronised, as independent clients are. Also reported: 1 ms tokens in lockstep, where
# 64 requests land together every 10 ms and the check measures the gateway's throughput.
PACED = OverheadMode(20.0, 16, spread=True)
LOCKSTEP = OverheadMode(1.0, 8, spread=False)
FLOOR_REQUESTS = 20  # one stream's requests for the single-client floor


async def _overhead_mode(plan: Plan, mode: OverheadMode) -> dict[str, Any]:
    """Via the gateway minus direct for one mode, against sims with no prefill time, with
    each path's single-stream floor. As AIGatewayBench does, the direct baseline counts as
    controlled only while its p99 at `plan.streams` stays within 2 x its own floor's p99."""
    opts = ["--prefill-ms-per-token", "0", "--decode-ms-per-token", f"{mode.decode_ms_per_token}"]
    spread = mode.tokens * mode.decode_ms_per_token / 1e3 if mode.spread else 0.0
    with procs.sims(8, opts) as sims, procs.gateway(sims, ["--policy", "round-robin"]) as gate:
        direct_urls, via = procs.worker_urls(sims), [procs.gateway_url(gate)]
        await _closed_loop(direct_urls, plan.streams, 1, mode.tokens, spread)  # warm up
        await _closed_loop(via, plan.streams, 1, mode.tokens, spread)
        floor_d = await _closed_loop(direct_urls, 1, FLOOR_REQUESTS, mode.tokens)
        floor_g = await _closed_loop(via, 1, FLOOR_REQUESTS, mode.tokens)
        direct = await _closed_loop(
            direct_urls, plan.streams, plan.stream_requests, mode.tokens, spread
        )
        gated = await _closed_loop(via, plan.streams, plan.stream_requests, mode.tokens, spread)
    d, g, fd, fg = (percentiles_ms([r.ttft_s for r in rs if r.status == 200])
                    for rs in (direct, gated, floor_d, floor_g))  # fmt: skip
    return {
        **mode._asdict(),
        "streams": plan.streams,
        "direct_ttft_ms": d,
        "gateway_ttft_ms": g,
        "one_stream_direct_ttft_ms": fd,
        "one_stream_gateway_ttft_ms": fg,
        "overhead_ttft_p50_ms": g["p50"] - d["p50"],
        "overhead_ttft_p99_ms": g["p99"] - d["p99"],
        "one_stream_overhead_ttft_p50_ms": fg["p50"] - fd["p50"],
        "direct_controlled": d["p99"] <= 2 * fd["p99"],
        "failed": sum(1 for r in [*direct, *gated, *floor_d, *floor_g] if r.status != 200),
    }


async def _overhead(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The paced check (judged), the lockstep one, then 1,000 streams at once."""
    paced = await _overhead_mode(plan, PACED)
    lockstep = await _overhead_mode(plan, LOCKSTEP)
    opts = ["--prefill-ms-per-token", "0", "--decode-ms-per-token", "1"]
    with procs.sims(8, opts) as sims, procs.gateway(sims, ["--policy", "round-robin"]) as gate:
        burst = await _closed_loop([procs.gateway_url(gate)], plan.burst, 1, 8)
        alive = gate.alive()
    return {
        "paced": paced,
        "lockstep": lockstep,
        "overhead_ttft_p50_ms": paced["overhead_ttft_p50_ms"],
        "overhead_ttft_p99_ms": paced["overhead_ttft_p99_ms"],
        "overhead_failed": paced["failed"] + lockstep["failed"],
        "burst_streams": plan.burst,
        "burst_errors": sum(1 for r in burst if r.status != 200),
        "burst_5xx": sum(1 for r in burst if r.status >= 500),
        "gateway_alive_after_burst": alive,
    }
