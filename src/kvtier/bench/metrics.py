"""Summaries of a replay: TTFT percentiles, hit rates, prefill saved, throughput, SLO rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kvtier.bench.costmodel import TIERS
from kvtier.bench.replay import RequestResult


@dataclass(frozen=True, slots=True)
class Summary:
    """One configuration's figures (times are modelled when `modelled`)."""

    config: str
    modelled: bool
    requests: int
    input_tokens: int
    hit_tokens: int
    hit_rate: float
    hit_rate_by_tier: dict[str, float]
    prefill_tokens_requested: int
    prefill_tokens_computed: int
    prefill_gpu_s: float
    prefill_gpu_s_saved: float | None  # full-prompt prefill minus prefill computed; loads
    # excluded; None when the engine cannot tell the full-prompt prefill (transformers)
    load_s: float
    ttft_ms: dict[str, float]  # p50, p90, p99
    ttft_ms_p50_by_turn: dict[int, float]
    throughput_rps: float
    throughput_prompt_tokens_s: float
    slo_ms: float
    slo_rate_rps: float  # highest arrival rate whose p90 TTFT meets slo_ms (FIFO queue model)
    slo_rate_multiplier: float
    wall_s: float
    disk_written_chunks: int = 0  # chunks written to the SSD tiers (every node and server)
    disk_written_gib: float = 0.0  # GiB of KV those chunks hold (the model's, when modelled)
    admission_rejected: int = 0  # saves kept off the SSD: not admitted (disk_admit_after)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(
    config: str, results: Sequence[RequestResult], modelled: bool, slo_ms: float, wall_s: float
) -> Summary:
    n_in = sum(r.prompt_tokens for r in results)
    by_tier = {t: sum(r.hits.get(t, 0) for r in results) for t in TIERS}
    hit = sum(by_tier.values())
    turns = sorted({r.turn for r in results})
    ttft_by_turn = {
        t: percentiles_ms([r.ttft_s for r in results if r.turn == t])["p50"] for t in turns
    }
    first = min((r.arrival_s for r in results), default=0.0)
    last = max((r.arrival_s + r.ttft_s for r in results), default=0.0)
    span = max(last - first, 1e-9)
    multiplier = slo_multiplier(results, slo_ms / 1000.0)
    return Summary(
        config=config,
        modelled=modelled,
        requests=len(results),
        input_tokens=n_in,
        hit_tokens=hit,
        hit_rate=hit / n_in if n_in else 0.0,
        hit_rate_by_tier={t: (v / n_in if n_in else 0.0) for t, v in by_tier.items()},
        prefill_tokens_requested=n_in,
        prefill_tokens_computed=n_in - hit,
        prefill_gpu_s=sum(r.compute_s for r in results),
        prefill_gpu_s_saved=_saved(results),
        load_s=sum(r.load_s for r in results),
        ttft_ms=percentiles_ms([r.ttft_s for r in results]),
        ttft_ms_p50_by_turn=ttft_by_turn,
        throughput_rps=len(results) / span,
        throughput_prompt_tokens_s=n_in / span,
        slo_ms=slo_ms,
        slo_rate_rps=multiplier * base_rate(results),
        slo_rate_multiplier=multiplier,
        wall_s=wall_s,
    )


def base_rate(results: Sequence[RequestResult]) -> float:
    """Requests per second of the workload as generated."""
    if len(results) < 2:
        return 0.0
    arrivals = [r.arrival_s for r in results]
    return (len(results) - 1) / max(max(arrivals) - min(arrivals), 1e-9)


def fifo_p90_s(results: Sequence[RequestResult], multiplier: float) -> float:
    """p90 TTFT with arrivals compressed `multiplier` times, each node a FIFO queue."""
    free: dict[int, float] = {}
    ttft = []
    for r in results:
        arrival = r.arrival_s / multiplier
        start = max(arrival, free.get(r.node, 0.0))
        free[r.node] = start + r.service_s
        ttft.append(free[r.node] - arrival)
    return float(np.percentile(ttft, 90)) if ttft else 0.0


def slo_multiplier(results: Sequence[RequestResult], slo_s: float, steps: int = 16) -> float:
    """The largest arrival-rate multiplier (1/1024..1024, bisected in log space) whose p90
    TTFT meets `slo_s`; 0.0 when even the lightest load misses it."""
    low, high = -10.0, 10.0  # log2 bounds
    if fifo_p90_s(results, 2.0**low) > slo_s:
        return 0.0
    if fifo_p90_s(results, 2.0**high) <= slo_s:
        return float(2.0**high)
    for _ in range(steps):
        mid = (low + high) / 2
        if fifo_p90_s(results, 2.0**mid) <= slo_s:
            low = mid
        else:
            high = mid
    return float(2.0**low)


def _saved(results: Sequence[RequestResult]) -> float | None:
    saved = sum(r.baseline_s - r.compute_s for r in results)
    return None if math.isnan(saved) else saved
