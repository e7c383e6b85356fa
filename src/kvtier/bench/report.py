"""Benchmark output: a JSON result, a markdown summary and PNG plots (when matplotlib is
installed, see plots.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kvtier.bench import plots
from kvtier.bench.metrics import Summary
from kvtier.bench.replay import DISK_CONFIGS


class SweepPoint(NamedTuple):
    """Hit rate of a DRAM-only LRU store of `dram_tokens` on the same workload."""

    dram_tokens: int
    hit_rate: float


def ratios(summaries: Mapping[str, Summary], target: str = "tiered") -> dict[str, float]:
    """p50 TTFT of every other configuration divided by `target`'s (above 1: target wins)."""
    if target not in summaries or not summaries[target].ttft_ms["p50"]:
        return {}
    base = summaries[target].ttft_ms["p50"]
    return {
        f"p50_ttft_{name}_over_{target}": s.ttft_ms["p50"] / base
        for name, s in summaries.items()
        if name != target
    }


def markdown(result: Mapping[str, Any], summaries: Mapping[str, Summary]) -> str:
    """A summary table; times carry "(modelled)" when they come from the cost model."""
    tag = " (modelled)" if result.get("modelled") else ""
    lines = [
        f"# kvtier bench {result['benchmark']}",
        "",
        f"engine: {result['engine']}"
        + (f", cost model: {result['sim']}" if result.get("sim") else ""),
        f"capacities (tokens): {result['capacities']}",
        "",
        f"| config | requests | hit rate | gpu | dram | disk | remote | TTFT p50 / p90 / p99 ms"
        f"{tag} | prefill GPU-s saved{tag} | rate at p90 <= {result['slo_ms']:g} ms{tag} "
        "| SSD written GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        t, h = s.ttft_ms, s.hit_rate_by_tier
        saved = "n/a" if s.prefill_gpu_s_saved is None else f"{s.prefill_gpu_s_saved:.1f}"
        lines.append(
            f"| {name} | {s.requests} | {s.hit_rate:.1%} | {h['gpu']:.1%} | {h['dram']:.1%} | "
            f"{h['disk']:.1%} | {h['remote']:.1%} | {t['p50']:.0f} / {t['p90']:.0f} / "
            f"{t['p99']:.0f} | {saved} | {s.slo_rate_rps:.2f} req/s | "
            f"{s.disk_written_gib:,.1f} |"
        )
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"\nskipped {name}: {reason}")
    for name, value in result.get("ratios", {}).items():
        lines.append(f"\n{name}: {value:.2f}x")
    lines.append(f"\nwall time: {result['wall_s']:.1f} s\n")
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    result: dict[str, Any],
    summaries: Mapping[str, Summary],
    ttft_s: Mapping[str, Sequence[float]],
    sweep: Sequence[SweepPoint],
) -> list[Path]:
    """Write result.json, summary.md and the plots (skipped without matplotlib); returns the
    paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["benchmark"]
    paths = [out_dir / f"{name}.md"]
    paths[0].write_text(markdown(result, summaries))
    modelled = bool(result.get("modelled"))
    figures: dict[Path, plots.Draw] = {
        out_dir / f"{name}_ttft.png": lambda plt: _plot_ttft(plt, summaries, ttft_s, modelled)
    }
    if sweep:
        figures[out_dir / f"{name}_hit_rate_vs_capacity.png"] = lambda plt: _plot_sweep(plt, sweep)
    if len(result.get("admit_after", ())) > 1:
        figures[out_dir / f"{name}_admission.png"] = lambda plt: _plot_admission(plt, summaries)
    paths += plots.save(figures)
    result["files"] = [str(p) for p in [out_dir / f"{name}.json", *paths]]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    return [out_dir / f"{name}.json", *paths]


def _plot_ttft(
    plt: Any,
    summaries: Mapping[str, Summary],
    ttft_s: Mapping[str, Sequence[float]],
    modelled: bool,
) -> Any:
    """TTFT p50 per round for each configuration, or a TTFT CDF for one-shot workloads."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tag = " (modelled)" if modelled else ""
    rounds = max((len(s.ttft_ms_p50_by_turn) for s in summaries.values()), default=0)
    for name, s in summaries.items():
        if rounds > 1:
            turns = sorted(s.ttft_ms_p50_by_turn)
            ax.plot(turns, [s.ttft_ms_p50_by_turn[t] for t in turns], marker="o", label=name)
        else:
            values = np.sort(np.asarray(ttft_s[name]) * 1000.0)
            ax.plot(values, np.arange(1, len(values) + 1) / max(len(values), 1), label=name)
    if rounds > 1:
        ax.set(xlabel="round / step", ylabel=f"TTFT p50 ms{tag}", yscale="log")
    else:
        ax.set(xlabel=f"TTFT ms{tag}", ylabel="fraction of requests", xscale="log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def _plot_admission(plt: Any, summaries: Mapping[str, Summary]) -> Any:
    """Hit rate and GiB written to SSD of each configuration with an SSD, side by side."""
    rows = [s for s in summaries.values() if s.config.split()[0] in DISK_CONFIGS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [s.config for s in rows]
    left.barh(names, [s.hit_rate for s in rows])
    right.barh(names, [s.disk_written_gib for s in rows])
    left.set(xlabel="token hit rate (measured)", xlim=(0, 1))
    right.set(xlabel="KV written to SSD (GiB)")
    right.tick_params(labelleft=False)
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    return fig


def _plot_sweep(plt: Any, sweep: Sequence[SweepPoint]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p.dram_tokens for p in sweep], [p.hit_rate for p in sweep], marker="o")
    ax.set(xlabel="LRU cache capacity (tokens)", ylabel="token hit rate (measured)", xscale="log")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    return fig
