"""`kvtier plan TRACE`: how much DRAM and SSD a trace needs.

Replays the trace through the `tiered` configuration (sim engine: the real store, modelled
times) for every DRAM x SSD capacity pair and reports hit rate, modelled TTFT and prefill
GPU-seconds saved, as a table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtier.bench import plots
from kvtier.bench.costmodel import CostModel, parse_sim
from kvtier.bench.engines import SimFactory
from kvtier.bench.metrics import Summary
from kvtier.bench.replay import Capacities
from kvtier.bench.trace import TraceError
from kvtier.bench.workload import compare, load_workload, tokens_arg
from kvtier.config import env_default
from kvtier.errors import KvtierError

GIB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("file", nargs="?", default=env_default("KVTIER_PLAN_TRACE"), help="Mooncake JSONL")
    add("--sim", default=env_default("KVTIER_PLAN_SIM", "h100:llama-3-8b"), help="GPU:MODEL")
    add("--chunk-tokens", type=int, default=env_default("KVTIER_CHUNK_TOKENS", "512"))
    add("--dram-tokens", default=env_default("KVTIER_PLAN_DRAM_TOKENS", "250k,1M,4M"))
    add("--disk-tokens", default=env_default("KVTIER_PLAN_DISK_TOKENS", "0,4M,16M,64M"))
    add("--requests", type=int, default=env_default("KVTIER_PLAN_REQUESTS"))
    add("--slo-ms", type=float, default=env_default("KVTIER_PLAN_SLO_MS", "2000"))
    add("--quick", action="store_true", default=bool(env_default("KVTIER_PLAN_QUICK")))
    add("--json", action="store_true", help="print one JSON object")
    add("--out", type=Path, default=env_default("KVTIER_PLAN_OUT", "results"))
    add("--work-dir", type=Path, default=env_default("KVTIER_PLAN_WORK_DIR"))


def token_list(text: str, flag: str) -> list[int]:
    try:
        values = [tokens_arg(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}; give comma-separated token counts like 250k,1M") from exc
    if not values:
        raise ValueError(f"{flag}: give at least one token count, e.g. 1M")
    return sorted(set(values))


def run(args: argparse.Namespace) -> int:
    try:
        result = plan(args)
    except (TraceError, KvtierError, ValueError) as exc:
        print(f"kvtier plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else Path(args.out, "plan.md").read_text())
    return 0


def plan(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    args.command = "trace"
    cost = parse_sim(args.sim)
    work = load_workload("trace", args)
    make = SimFactory(cost, int(args.chunk_tokens))
    drams = [d for d in token_list(args.dram_tokens, "--dram-tokens") if d]
    disks = token_list(args.disk_tokens, "--disk-tokens")
    args.lookahead = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtier-plan-", dir=args.work_dir) as tmp:
        for dram in drams:
            for disk in disks:
                caps = Capacities(int(args.chunk_tokens), 0, dram, disk)
                summary = compare(work, make, caps, ["tiered"], args, Path(tmp)).summaries
                rows.append(_row(cost, caps, summary["tiered"]))
    result = {
        "trace": work.spec,
        "sim": cost.name,
        "modelled": True,
        "kv_bytes_per_token": cost.model.kv_bytes_per_token,
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    _write(Path(args.out), result)
    return result


def _row(cost: CostModel, caps: Capacities, s: Summary) -> dict[str, Any]:
    per_token = cost.model.kv_bytes_per_token
    return {
        "dram_tokens": caps.dram_tokens,
        "dram_gib": caps.dram_tokens * per_token / GIB,
        "disk_tokens": caps.disk_tokens,
        "disk_gib": caps.disk_tokens * per_token / GIB,
        "hit_rate": s.hit_rate,
        "hit_rate_by_tier": s.hit_rate_by_tier,
        "ttft_ms": s.ttft_ms,
        "prefill_gpu_s_saved": s.prefill_gpu_s_saved,
        "prefill_gpu_s": s.prefill_gpu_s,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# kvtier plan: {result['trace']['file']} ({result['trace']['requests']} requests)",
        "",
        f"cost model: {result['sim']}; times are modelled, hit rates measured on the store",
        "",
        "| DRAM tokens (GiB) | SSD tokens (GiB) | hit rate | from DRAM | from SSD | "
        "TTFT p50 / p90 ms (modelled) | prefill GPU-s saved (modelled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t, h = r["ttft_ms"], r["hit_rate_by_tier"]
        lines.append(
            f"| {r['dram_tokens']:,} ({r['dram_gib']:.0f}) | {r['disk_tokens']:,} "
            f"({r['disk_gib']:.0f}) | {r['hit_rate']:.1%} | {h['dram']:.1%} | {h['disk']:.1%} "
            f"| {t['p50']:.0f} / {t['p90']:.0f} | {r['prefill_gpu_s_saved']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result, indent=2))
    (out / "plan.md").write_text(markdown(result))
    plots.save({out / "plan.png": lambda plt: _plot(plt, result["rows"])})


def _plot(plt: Any, rows: Sequence[dict[str, Any]]) -> Any:
    """Hit rate and p50 TTFT against DRAM capacity, one line per SSD capacity."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for disk in sorted({r["disk_tokens"] for r in rows}):
        mine = [r for r in rows if r["disk_tokens"] == disk]
        x = [r["dram_gib"] for r in mine]
        label = f"SSD {mine[0]['disk_gib']:.0f} GiB"
        left.plot(x, [r["hit_rate"] for r in mine], marker="o", label=label)
        right.plot(x, [r["ttft_ms"]["p50"] for r in mine], marker="o", label=label)
    left.set(xlabel="DRAM (GiB of KV)", ylabel="token hit rate (measured)", xscale="log")
    right.set(xlabel="DRAM (GiB of KV)", ylabel="TTFT p50 ms (modelled)", xscale="log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    return fig
