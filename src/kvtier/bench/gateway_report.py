"""The pure half of `kvtier bench gateway`: per-request results -> a row per configuration,
the judged figures beside their targets, a markdown table and a PNG plot.

Knee: the highest swept load whose TTFT p90 stays within the SLO, 5 x the TTFT p90 the
workload's prompts would see alone on an idle worker with an empty cache (prompt tokens x
prefill ms per token, modelled from the sim's own parameters). Throughput there is completed
prompt tokens per second over the run (first send to last completion). When the highest
swept load still meets the SLO the knee is a lower bound (`knee_bounded: false`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench import plots
from kvtier.bench.gateway_client import InflightSample, Result
from kvtier.bench.metrics import percentiles_ms

Row = dict[str, Any]
SLO_FACTOR = 5.0
STEADY_MIN_SAMPLES = 10  # in-flight samples (0.1 s apart) a row's steady balance needs
TARGETS = {
    "hit_rate_vs_oracle": ">= 0.95",
    "knee_throughput_ratio_vs_round_robin": ">= 2.5",
    "noreuse_throughput_ratio_vs_round_robin": "0.95 .. 1.05",
    "steady_inflight_tokens_ratio": "<= 1.5",
    "tier_credit_ttft_p50_gain_vs_prefix": ">= 0.10",
    "overhead_ttft_p50_ms": "<= 2",
    "overhead_ttft_p99_ms": "<= 10",
    "overhead_direct_controlled": "True (else the overhead is not measured)",
    "streams_1000_errors": "== 0",
    "route_p99_ms_1m_blocks": "<= 1",
}


def _steady(inflight: Sequence[InflightSample], workers: int) -> list[tuple[float, ...]]:
    """Each worker's booked tokens in the samples with at least one request per worker."""
    return [s.tokens for s in inflight if s.requests >= workers and len(s.tokens) == workers]


def _steady_ratio(inflight: Sequence[InflightSample], workers: int) -> float:
    """The busiest worker's time-averaged booked tokens over the mean of all workers', over
    the samples with at least one request per worker in flight (steady state)."""
    busy = _steady(inflight, workers)
    if not busy:
        return math.nan
    per_worker = np.mean(np.asarray(busy), axis=0)
    mean = float(per_worker.mean())
    return float(per_worker.max()) / mean if mean > 0 else math.nan


def row(
    key: Mapping[str, Any],
    results: Sequence[Result],
    oracle: Sequence[int],
    inflight: Sequence[InflightSample],
    prefill_ms_per_token: float,
) -> Row:
    """One configuration's figures. Balance counts samples with at least one request in
    flight per worker (below that, one request alone is 'imbalance')."""
    ok = [r for r in results if r.status == 200 and not math.isnan(r.ttft_s)]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    tiers = {t: sum(r.cached_by_tier.get(t, 0) for r in ok) for t in ("gpu", "dram", "shared")}
    span = max((r.done_s for r in results), default=0.0) - min(
        (r.sent_s for r in results), default=0.0
    )
    busy = [s.max_over_mean_tokens for s in inflight if s.requests >= key["workers"]]
    idle = [r.prompt_tokens * prefill_ms_per_token / 1e3 for r in ok]
    return {
        **key,
        "requests": len(results),
        "completed": len(ok),
        "errors_5xx": sum(1 for r in results if r.status >= 500),
        "failed": sum(1 for r in results if r.status != 200),
        "ttft_ms": percentiles_ms([r.ttft_s for r in ok]),
        "idle_ttft_p90_ms": percentiles_ms(idle)["p90"],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_tokens_by_tier": tiers,
        "oracle_tokens": int(sum(oracle)),
        "hit_rate_vs_oracle": cached / sum(oracle) if sum(oracle) else math.nan,
        "throughput_prompt_tokens_s": prompt / span if span > 0 else 0.0,
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "max_inflight_tokens_ratio": max(busy, default=math.nan),
        "steady_inflight_tokens_ratio": _steady_ratio(inflight, key["workers"]),
        "steady_samples": len(_steady(inflight, key["workers"])),
        "wall_s": span,
    }


def knee(rows: Sequence[Row]) -> Row | None:
    """The highest-load row whose TTFT p90 meets SLO_FACTOR x its idle p90 (None: none)."""
    good = [r for r in rows if r["ttft_ms"]["p90"] <= SLO_FACTOR * r["idle_ttft_p90_ms"]]
    return max(good, key=lambda r: r["load"], default=None)


def _tiers_tag(r: Row) -> str:
    return "" if r["tiers"] == "off" else f" +{r['tiers']}"


def _find(rows: Sequence[Row], **want: Any) -> Row | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def _worst(rows: Sequence[Row], name: str) -> float:
    return max((r[name] for r in rows if not math.isnan(r[name])), default=math.nan)


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def headline(rows: Sequence[Row], sweep: str, workers: int, load: float) -> dict[str, Any]:
    """The judged figures from the rows (sweep rows carry `sweep: True`)."""
    out: dict[str, Any] = {}
    main = [r for r in rows
            if r["workers"] == workers and r["tiers"] == "off" and r["load"] == load]  # fmt: skip
    rates = [r["hit_rate_vs_oracle"] for r in main
             if r["policy"] == "kvtier" and r["workload"] != "noreuse"]  # fmt: skip
    out["hit_rate_vs_oracle"] = min(rates, default=math.nan)
    knees = {}
    for policy in ("kvtier", "round-robin"):
        k = knee([r for r in rows if r["sweep"] and r["policy"] == policy])
        knees[policy] = k
        out[f"knee_load_{policy}"] = None if k is None else k["load"]
        loads = [r["load"] for r in rows if r["sweep"] and r["policy"] == policy]
        out[f"knee_bounded_{policy}"] = k is not None and k["load"] < max(loads, default=0)
    tput = {p: None if k is None else k["throughput_prompt_tokens_s"] for p, k in knees.items()}
    out["knee_throughput_ratio_vs_round_robin"] = _ratio(tput["kvtier"], tput["round-robin"])
    nk, nr = (_find(rows, workload="noreuse", policy=p) for p in ("kvtier", "round-robin"))
    out["noreuse_throughput_ratio_vs_round_robin"] = (
        _ratio(nk["throughput_prompt_tokens_s"], nr["throughput_prompt_tokens_s"])
        if nk and nr
        else math.nan
    )
    kv = [r for r in rows if r["policy"] == "kvtier"]
    out["max_inflight_tokens_ratio"] = _worst(kv, "max_inflight_tokens_ratio")
    # A row's steady balance from a sample or two (a pool mostly idle, where one request
    # per worker is in flight only for an instant) is no steady figure: such rows are named
    # apart, and the judged figure takes rows with STEADY_MIN_SAMPLES or more.
    steady = [r for r in kv if r["steady_samples"] >= STEADY_MIN_SAMPLES]
    for tag, among in (("", steady), ("_any_samples", kv)):
        worst = max((r for r in among if not math.isnan(r["steady_inflight_tokens_ratio"])),
                    key=lambda r: r["steady_inflight_tokens_ratio"], default=None)  # fmt: skip
        out[f"steady_inflight_tokens_ratio{tag}"] = (
            math.nan if worst is None else worst["steady_inflight_tokens_ratio"]
        )
        if worst is not None:  # where it was, and over how many samples
            out[f"steady_inflight_worst_row{tag}"] = (
                f"{worst['workload']} x{worst['workers']} tiers {worst['tiers']} load "
                f"{worst['load']:g}: {worst['steady_samples']} samples"
            )
    for tiers, name in (("dram", ""), ("all", "_with_shared_tier")):
        tk, tp = (_find(rows, workload="trace", policy=p, workers=workers, tiers=tiers)
                  for p in ("kvtier", "prefix"))  # fmt: skip
        out[f"tier_credit_ttft_p50_gain_vs_prefix{name}"] = (
            1 - tk["ttft_ms"]["p50"] / tp["ttft_ms"]["p50"] if tk and tp else math.nan
        )
    out["sweep_workload"], out["matrix_load"] = sweep, load
    return out


def markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "# kvtier bench gateway",
        "",
        f"sims: {result['sim']}",
        f"KV pressure (live context / one worker's cache): {result['pressure']}",
        f"SLO: TTFT p90 <= {SLO_FACTOR:g} x idle p90 (prompt x prefill ms/token)",
        "",
        "| workload | workers | policy | tiers | load | req | 5xx | TTFT p50 / p90 / p99 ms "
        "| hit / oracle | gpu / dram / shared | prompt tok/s | max/mean inflight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t, c = r["ttft_ms"], r["cached_tokens_by_tier"]
        lines.append(
            f"| {r['workload']}{' (sweep)' if r['sweep'] else ''} | {r['workers']} | "
            f"{r['policy']} | {r['tiers']} | {r['load']:g} | "
            f"{r['completed']}/{r['requests']} | {r['errors_5xx']} | {t['p50']:.0f} / "
            f"{t['p90']:.0f} / {t['p99']:.0f} | {r['hit_rate_vs_oracle']:.3f} | "
            f"{c['gpu']:,} / {c['dram']:,} / {c['shared']:,} | "
            f"{r['throughput_prompt_tokens_s']:,.0f} | {r['max_inflight_tokens_ratio']:.2f} |"
        )
    lines += ["", "| figure | measured | target |", "|---|---|---|"]
    for name, value in result["headline"].items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} | {TARGETS.get(name, '')} |")
    lines.append(f"\nwall time: {result['wall_s']:.0f} s\n")
    return "\n".join(lines)


def plot(path: Path, result: Mapping[str, Any]) -> list[Path]:
    """Left: TTFT p90 against load for the swept policies, with the SLO. Right: hit rate
    against the oracle for every main configuration. The path written, or none without
    matplotlib."""
    return plots.save({path: lambda plt: _figure(plt, result)})


def _figure(plt: Any, result: Mapping[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = result["rows"]
    for policy in sorted({r["policy"] for r in rows if r["sweep"]}):
        mine = sorted((r for r in rows if r["sweep"] and r["policy"] == policy),
                      key=lambda r: r["load"])  # fmt: skip
        left.plot([r["load"] for r in mine], [r["ttft_ms"]["p90"] for r in mine], marker="o",
                  label=policy)  # fmt: skip
        if mine:
            left.axhline(SLO_FACTOR * mine[0]["idle_ttft_p90_ms"], color="grey", linestyle=":")
    left.set(xlabel=f"load x ({result['headline']['sweep_workload']})", ylabel="TTFT p90 ms",
             yscale="log", title="sweep (dotted: SLO)")  # fmt: skip
    load = result["headline"]["matrix_load"]
    main = [r for r in rows if r["load"] == load and r["workload"] != "noreuse"]
    names = [f"{r['workload']} {r['workers']}w\n{r['policy']}" + _tiers_tag(r) for r in main]
    right.bar(
        range(len(main)),
        [r["hit_rate_vs_oracle"] for r in main],
        color=[f"C{sorted({x['policy'] for x in main}).index(r['policy'])}" for r in main],
    )
    right.set_xticks(range(len(main)), names, fontsize=6, rotation=90)
    right.set(ylabel="cached / oracle tokens", ylim=(0, 1.05))
    right.axhline(0.95, color="grey", linestyle=":")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    return fig


def finite(value: float) -> float | None:
    """JSON has no NaN: None for a figure that could not be measured."""
    return None if isinstance(value, float) and not np.isfinite(value) else value
