"""`kvtier bench chat|agent|rag|trace`: replay a workload through every configuration
(none, gpu-lru, tiered, tiered+prefetch, shared) and report TTFT, hit rates and savings.

With `--engine sim` the store is real and times come from the cost model (modelled);
`--engine transformers` runs a real (tiny, random-weight) model and measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

from kvtier.bench import workloads as wl
from kvtier.bench.costmodel import CostModel, parse_sim
from kvtier.bench.engines import SimFactory, TransformersFactory
from kvtier.bench.metrics import Summary, summarize
from kvtier.bench.replay import (
    CONFIGS,
    DISK_CONFIGS,
    Capacities,
    EngineFactory,
    build,
    replay,
    shared_available,
)
from kvtier.bench.report import SweepPoint, ratios, write_report
from kvtier.bench.trace import SAMPLE, TraceError, read_trace, trace_requests
from kvtier.config import env_default, parse_size
from kvtier.errors import KvtierError

QUICK = {
    "chat": wl.ChatSpec(users=12, rounds=4, system_tokens=1000, think_s=20, start_window_s=60),
    "agent": wl.AgentSpec(
        sessions=4, steps=5, context_tokens=(5000, 8000), observation_tokens=(1000, 2000),
        subagents=1, subagent_steps=1, pause_every=3, idle_s=60, start_window_s=30,
    ),
    "rag": wl.RagSpec(documents=20, requests=60),
}  # fmt: skip
FULL = {"chat": wl.ChatSpec(), "agent": wl.AgentSpec(), "rag": wl.RagSpec()}
MAKERS: dict[str, Callable[[Any], Iterator[wl.Request]]] = {
    "chat": wl.chat,
    "agent": wl.agent,
    "rag": wl.rag,
}
QUICK_TOKENS = {"gpu": 16_000, "dram": 32_000, "disk": 1_000_000}


class Workload(NamedTuple):
    make: Callable[[], Iterator[wl.Request]]
    total: int
    spec: dict[str, Any]


class Comparison(NamedTuple):
    summaries: dict[str, Summary]
    ttft_s: dict[str, list[float]]
    skipped: dict[str, str]


def tokens_arg(value: str) -> int:
    """A token count: 0, 1000000, 1M or 3.5M (decimal units)."""
    return 0 if value.strip() == "0" else parse_size(value, "tokens")


def admit_list(value: str) -> list[int]:
    """Disk admission values, e.g. `1,2` (each a StoreConfig.disk_admit_after >= 1)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give comma-separated ints >= 1, e.g. 1,2 (1: every save goes to the "
            "SSD, 2: only chunks used twice)"
        )
    return list(dict.fromkeys(values))


class Variant(NamedTuple):
    """One replay: its row name, configuration and disk_admit_after."""

    name: str
    config: str
    admit: int


def variants(configs: Sequence[str], admit: Sequence[int]) -> list[Variant]:
    """Every replay: the configurations with an SSD once per admission value (rows named
    "tiered admit=2"; plain "tiered" for 1), the others once."""
    rows = []
    for config in configs:
        for n in admit if config in DISK_CONFIGS else (1,):
            rows.append(Variant(config if n == 1 else f"{config} admit={n}", config, n))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.split()[-1] == "trace":
        parser.add_argument("file", nargs="?", default=env_default("KVTIER_BENCH_TRACE"))
        parser.add_argument("--requests", type=int, default=env_default("KVTIER_BENCH_REQUESTS"))
    add = parser.add_argument
    add(
        "--engine",
        choices=("sim", "transformers"),
        default=env_default("KVTIER_BENCH_ENGINE", "sim"),
    )
    add("--sim", default=env_default("KVTIER_BENCH_SIM", "h100:llama-3-8b"), help="GPU:MODEL")
    add("--model", default=env_default("KVTIER_BENCH_MODEL"), help="local checkpoint dir")
    add("--chunk-tokens", type=int, default=env_default("KVTIER_CHUNK_TOKENS"))
    for tier in ("gpu", "dram", "disk"):  # capacities in tokens; defaults in capacities()
        env = f"KVTIER_BENCH_{tier.upper()}_TOKENS"
        add(f"--{tier}-tokens", type=tokens_arg, default=env_default(env))
    add("--configs", default=env_default("KVTIER_BENCH_CONFIGS", ",".join(CONFIGS)))
    add("--lookahead", type=int, default=env_default("KVTIER_BENCH_LOOKAHEAD", "8"))
    add(
        "--admit-after",
        type=admit_list,
        default=env_default("KVTIER_BENCH_ADMIT_AFTER", "1"),
        help="disk admission of the configurations with an SSD (StoreConfig.disk_admit_after); "
        "a list like 1,2 runs each of them once per value, side by side",
    )
    add("--slo-ms", type=float, default=env_default("KVTIER_BENCH_SLO_MS", "2000"))
    add("--sweep", type=int, default=env_default("KVTIER_BENCH_SWEEP"), help="capacity points")
    add(
        "--users",
        type=int,
        default=env_default("KVTIER_BENCH_USERS"),
        help="chat users, agent sessions or RAG requests",
    )
    add("--seed", type=int, default=env_default("KVTIER_BENCH_SEED", "0"))
    add("--quick", action="store_true", default=bool(env_default("KVTIER_BENCH_QUICK")))
    add("--json", action="store_true", help="print one JSON object")
    add("--out", type=Path, default=env_default("KVTIER_BENCH_OUT", "results"))
    add("--work-dir", type=Path, default=env_default("KVTIER_BENCH_WORK_DIR"))


def load_workload(command: str, args: argparse.Namespace) -> Workload:
    if command == "trace":
        limit = int(args.requests) if args.requests else (300 if args.quick else None)
        records = read_trace(args.file or SAMPLE, limit)
        spec = {"file": str(args.file or SAMPLE), "requests": len(records)}
        return Workload(lambda: trace_requests(records), len(records), spec)
    base = (QUICK if args.quick else FULL)[command]
    spec_obj: Any = replace(base, seed=args.seed)  # type: ignore[type-var]
    if args.users is not None:  # chat users, agent sessions or RAG requests
        field = {"chat": "users", "agent": "sessions", "rag": "requests"}[command]
        spec_obj = replace(spec_obj, **{field: int(args.users)})
    make = MAKERS[command]
    total = sum(1 for _ in make(spec_obj))
    return Workload(lambda: make(spec_obj), total, asdict(spec_obj))


def capacities(args: argparse.Namespace, cost: CostModel, chunk_tokens: int) -> Capacities:
    """Tokens per tier: the flags, else quick-sized or real (GPU: what fits next to the
    weights in the cost model's GPU memory)."""

    def pick(tier: str, full: int) -> int:
        given = getattr(args, f"{tier}_tokens")
        if given is not None:
            return int(given)
        return QUICK_TOKENS[tier] if args.quick else full

    full_dram, full_disk = 1_000_000, 16_000_000
    gpu = pick("gpu", cost.gpu_cache_tokens())
    return Capacities(chunk_tokens, gpu, pick("dram", full_dram), pick("disk", full_disk))


def compare(
    work: Workload,
    make: EngineFactory,
    caps: Capacities,
    configs: Sequence[str],
    opts: argparse.Namespace,
    work_dir: Path,
    admit: Sequence[int] = (1,),
) -> Comparison:
    """Replay the workload through each configuration (those with an SSD once per disk
    admission value in `admit`); `shared` only with a server."""
    out = Comparison({}, {}, {})
    for name, config, n in variants(configs, admit):
        if config == "shared" and not shared_available():
            out.skipped[name] = "kvtier.tiers.remote / kvtier.server is not available"
            continue
        setup = build(config, make, caps, work_dir, opts.lookahead, n)
        start = time.perf_counter()
        try:
            results = replay(work.make(), setup, work.total, desc=name)
            disk = setup.disk_writes()
        finally:
            setup.close()
        wall = time.perf_counter() - start
        summary = summarize(name, results, setup_modelled(make), opts.slo_ms, wall)
        chunks = disk.written_bytes // make.chunk_bytes  # every disk write is one chunk
        out.summaries[name] = replace(
            summary,
            disk_written_chunks=chunks,
            disk_written_gib=chunks * kv_chunk_bytes(make) / (1 << 30),
            admission_rejected=disk.admission_rejected,
        )
        out.ttft_s[name] = [r.ttft_s for r in results]
    return out


def kv_chunk_bytes(make: EngineFactory) -> float:
    """Bytes of the KV one chunk stands for (the sim engine stores scaled-down payloads)."""
    return make.chunk_bytes * (make.scale if isinstance(make, SimFactory) else 1.0)


def setup_modelled(make: EngineFactory) -> bool:
    return isinstance(make, SimFactory)


def sweep(
    work: Workload, make: SimFactory, caps: Capacities, points: int, work_dir: Path
) -> list[SweepPoint]:
    """Token hit rate of a DRAM-only LRU store at capacities around --dram-tokens."""
    out = []
    for i in range(points):
        tokens = int(caps.dram_tokens * 4.0 ** (i - points + 2))
        if tokens < caps.chunk_tokens:
            continue
        point = replace(caps, gpu_tokens=tokens)
        setup = build("gpu-lru", make, point, work_dir, 0)
        try:
            results = replay(work.make(), setup, work.total, desc=f"sweep {tokens}")
        finally:
            setup.close()
        hit = sum(sum(r.hits.values()) for r in results)
        out.append(SweepPoint(tokens, hit / max(1, sum(r.prompt_tokens for r in results))))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        result = _run(args)
    except (TraceError, KvtierError, ValueError, RuntimeError) as exc:
        print(f"kvtier bench {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(Path(result["files"][1]).read_text())
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    command = args.command
    chunk_tokens = int(args.chunk_tokens or (512 if command == "trace" else 256))
    cost = parse_sim(args.sim)
    work = load_workload(command, args)
    sim = SimFactory(cost, chunk_tokens)
    make: EngineFactory = (
        sim if args.engine == "sim" else TransformersFactory(chunk_tokens, args.model)
    )
    caps = capacities(args, cost, chunk_tokens)
    configs = [c.strip() for c in str(args.configs).split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-", dir=args.work_dir) as tmp:
        comp = compare(work, make, caps, configs, args, Path(tmp), args.admit_after)
        points = int(args.sweep) if args.sweep is not None else (3 if args.quick else 5)
        swept = sweep(work, sim, caps, points, Path(tmp))
    result = _result(args, cost, sim, caps, work, comp, swept)
    result["wall_s"] = time.perf_counter() - start
    write_report(Path(args.out), result, comp.summaries, comp.ttft_s, swept)
    return result


def _result(
    args: argparse.Namespace,
    cost: CostModel,
    sim: SimFactory,
    caps: Capacities,
    work: Workload,
    comp: Comparison,
    swept: list[SweepPoint],
) -> dict[str, Any]:
    modelled = args.engine == "sim"
    head = comp.summaries.get("tiered") or next(iter(comp.summaries.values()), None)
    headline = head.as_dict() if head else {}
    return {
        "benchmark": args.command,
        "engine": args.engine,
        "modelled": modelled,
        "sim": cost.name if modelled else None,
        "payload_scale": sim.scale if modelled else 1.0,
        "headline_config": head.config if head else None,
        **{k: headline.get(k) for k in ("requests", "input_tokens", "hit_tokens", "hit_rate")},
        "hit_rate_by_tier": headline.get("hit_rate_by_tier"),
        "ttft_ms": headline.get("ttft_ms"),
        "slo_ms": args.slo_ms,
        "chunk_tokens": caps.chunk_tokens,
        "capacities": {k: v for k, v in asdict(caps).items() if k != "chunk_tokens"},
        "workload": work.spec,
        "admit_after": args.admit_after,
        "configs": {name: s.as_dict() for name, s in comp.summaries.items()},
        "skipped": comp.skipped,
        "ratios": ratios(comp.summaries),
        "capacity_sweep": [p._asdict() for p in swept],
    }
