"""The pure half of `kvtier bench vllm`: per-request records -> figures, markdown and plot.

A record is one request as a configuration served it: id, session, turn, arrival_s,
prompt_tokens, engine, ttft_s, tokens (generated ids), cached (prompt tokens not computed),
hits (tokens by tier: gpu = vLLM's own prefix cache, dram, disk, remote).

- Returning turns: turns of a session whose previous prompt vLLM alone no longer held (its
  own prefix hit fell short of that prompt's whole blocks).
- SLO rate (modelled): Poisson arrivals at rate R (2,000 of them, seeded), the pass's
  measured service times (each request's TTFT when it ran alone) taken in the pass's order
  and cycled, requests sent round-robin to the pass's engines, each engine serving one at a
  time first come first served; the highest R whose p90 TTFT (wait + service) stays within
  the SLO, found by bisection. A rate beyond an engine's capacity grows its queue without
  bound over 2,000 arrivals, so the answer is a sustainable rate, not a burst.
  `slo_rate_serial_rps` is the same with each engine busy until the request's last token (no
  batching). Every measured rate so far fell between the two.
- SLO rate (measured): the pass's requests (the prompts it sent, the answer lengths it
  generated) sent again to the same engine at rate R, each arriving at its workload arrival
  time scaled so the pass lasts N / R seconds (sessions keep their order and their bursts),
  under a salt of their own so nothing of earlier runs hits; the engine batches them as it
  does under load. `highest_rate` searches R from the geometric mean of the two modelled
  rates; the figure is the R at which the measured TTFT p90 reaches the SLO, interpolated
  between the nearest measured rates on either side of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench import plots
from kvtier.bench.costmodel import TIERS
from kvtier.bench.metrics import percentiles_ms

Record = dict[str, Any]
BASE = "vllm"  # the configuration every ratio divides by


def returning_ids(base: Sequence[Record], block_tokens: int) -> set[str]:
    """Ids of turns whose session's previous prompt vLLM alone had (partly) evicted."""
    previous: dict[str, int] = {}
    out = set()
    for r in base:
        before = previous.get(r["session"])
        if before is not None and r["cached"] < before // block_tokens * block_tokens:
            out.add(r["id"])
        previous[r["session"]] = r["prompt_tokens"]
    return out


def p50_ratio(records: Mapping[str, Sequence[Record]], ids: set[str], config: str) -> float:
    """p50 TTFT of `config` over `ids` divided by vLLM alone's (nan without such turns)."""
    mine = [r["ttft_s"] for r in records[config] if r["id"] in ids]
    base = [r["ttft_s"] for r in records[BASE] if r["id"] in ids]
    if not mine or not base:
        return math.nan
    return float(np.median(mine) / np.median(base))


def differing_tokens(base: Sequence[Record], other: Sequence[Record]) -> int:
    """Generated tokens that differ from vLLM alone's, position by position (a length
    difference counts every missing position)."""
    by_id = {r["id"]: r["tokens"] for r in base}
    total = 0
    for r in other:
        want, got = by_id[r["id"]], r["tokens"]
        total += sum(a != b for a, b in zip(want, got, strict=False))
        total += abs(len(want) - len(got))
    return total


def p90_at_rate(
    service_s: Sequence[float],
    engines: int,
    rate: float,
    arrivals: int,
    busy_s: Sequence[float] | None = None,
) -> float:
    """p90 TTFT of `arrivals` Poisson arrivals at `rate`, round-robin over FIFO engines; a
    request's first token comes `service_s` after it starts, and its engine is free for the
    next `busy_s` after (default: at once)."""
    busy = service_s if busy_s is None else busy_s
    gaps = np.random.default_rng(0).exponential(1.0 / rate, arrivals)
    free = [0.0] * engines
    ttft = np.empty(arrivals)
    for i, at in enumerate(np.cumsum(gaps)):
        engine, n = i % engines, i % len(service_s)
        begin = max(at, free[engine])
        free[engine] = begin + busy[n]
        ttft[i] = begin + service_s[n] - at
    return float(np.percentile(ttft, 90))


def slo_rate(
    service_s: Sequence[float],
    engines: int,
    slo_s: float,
    arrivals: int = 2000,
    busy_s: Sequence[float] | None = None,
) -> float:
    """The highest Poisson arrival rate (req/s) whose p90 TTFT stays within `slo_s`."""
    if not service_s or float(np.percentile(service_s, 90)) > slo_s:
        return 0.0
    busy = service_s if busy_s is None else busy_s
    low, high = 0.0, engines / float(np.mean(busy))  # beyond `high` queues grow forever
    for _ in range(20):
        mid = (low + high) / 2
        if mid > 0 and p90_at_rate(service_s, engines, mid, arrivals, busy) <= slo_s:
            low = mid
        else:
            high = mid
    return low


def highest_rate(
    p90_at: Callable[[float], float], slo_s: float, start: float, probes: int, step: float = 1.5
) -> tuple[float, list[tuple[float, float]]]:
    """The rate (req/s) at which the p90 TTFT `p90_at(rate)` measures reaches `slo_s`, from
    `probes` measurements: from `start`, up or down by `step` until one rate passes and one
    fails, then the geometric middle of the highest passing rate below the lowest failing
    one and that failing rate. The answer is interpolated linearly between those two (their
    measured p90s against the SLO), so that two searches taking the same path still tell
    their rates apart; with no failing rate it is the highest that passed, with no passing
    rate 0. Returns it and every (rate, p90) measured."""
    tried: list[tuple[float, float]] = []
    rate = start
    for _ in range(probes):
        tried.append((rate, p90_at(rate)))
        low, high = bracket(tried, slo_s)
        if high is None:
            rate = (low[0] if low else rate) * step
        elif low is None:
            rate = high[0] / step
        else:
            rate = math.sqrt(low[0] * high[0])
    low, high = bracket(tried, slo_s)
    if low is None:
        return 0.0, tried
    if high is None:
        return low[0], tried
    share = (slo_s - low[1]) / (high[1] - low[1])
    return low[0] + share * (high[0] - low[0]), tried


def bracket(
    tried: list[tuple[float, float]], slo_s: float
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """The lowest (rate, p90) that missed the SLO, and the highest below it that met it."""
    failed = min((t for t in tried if t[1] > slo_s), default=None)
    ceiling = failed[0] if failed else math.inf
    passed = max((t for t in tried if t[1] <= slo_s and t[0] < ceiling), default=None)
    return passed, failed


def summary(records: Sequence[Record], wall_s: float, slo_ms: float) -> dict[str, Any]:
    """One pass's figures: TTFT, throughput over its wall time, hits by tier, SLO rate."""
    tokens = sum(r["prompt_tokens"] for r in records)
    engines = len({r["engine"] for r in records})
    ttft = [r["ttft_s"] for r in records]
    rate = slo_rate(ttft, engines, slo_ms / 1000.0)
    whole = [r["done_s"] if "done_s" in r else r["ttft_s"] for r in records]
    turns = sorted({r["turn"] for r in records})
    return {
        "requests": len(records),
        "prompt_tokens": tokens,
        "hit_tokens_by_tier": {t: sum(r["hits"].get(t, 0) for r in records) for t in TIERS},
        "ttft_ms": percentiles_ms([r["ttft_s"] for r in records]),
        "ttft_ms_p50_by_turn": {
            t: percentiles_ms([r["ttft_s"] for r in records if r["turn"] == t])["p50"]
            for t in turns
        },
        "wall_s": wall_s,
        "connector_s": sum(r.get("connector_s", 0.0) for r in records),
        "throughput_rps": len(records) / wall_s if wall_s else 0.0,
        "throughput_tokens_s": tokens / wall_s if wall_s else 0.0,
        "slo_rate_rps": rate,
        # the same model, an engine busy until the request's last token: no batching at all
        "slo_rate_serial_rps": slo_rate(ttft, engines, slo_ms / 1000.0, busy_s=whole),
    }


def connector_share(s: Mapping[str, Any]) -> float:
    """The share of a pass's engine time spent inside kvtier's connector hooks: its own work
    on the engine's path (lookups, planning, copies in and out), without the time the node
    process's background writes take from the cores the engine runs on."""
    wall = sum(s["batch_wall_s"]) if "batch_wall_s" in s else s["wall_s"]
    return _ratio(s.get("connector_s", math.nan), wall)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def headline(
    passes: Mapping[str, Mapping[str, Sequence[Record]]],
    summaries: Mapping[str, Mapping[str, Mapping[str, Any]]],
    block_tokens: int,
) -> dict[str, Any]:
    """The judged figures: kvtier / vLLM alone on returning turns (chat and agent pooled),
    on the no-reuse workload, and at the SLO (the lower of the workloads whose rates were
    measured; of both modelled ones if none was)."""
    out: dict[str, Any] = {}
    pooled: dict[str, list[Record]] = {}
    ids: set[str] = set()
    slo: dict[str, list[Any]] = {"measured": [], "modelled": [], "unbracketed": []}
    for work in ("chat", "agent"):
        if work not in passes:
            continue
        mine = returning_ids(passes[work][BASE], block_tokens)
        out[f"returning_turns_{work}"] = len(mine)
        for config in passes[work]:
            if config != BASE:
                out[f"ttft_p50_ratio_returning_{work}_{config}"] = p50_ratio(
                    passes[work], mine, config
                )
            pooled.setdefault(config, []).extend(passes[work][config])
        ids |= mine
        s = summaries[work]
        modelled = _ratio(s["kvtier"]["slo_rate_rps"], s[BASE]["slo_rate_rps"])
        out[f"throughput_ratio_at_slo_modelled_{work}"] = modelled
        slo["modelled"].append(modelled)
        if "slo_rate_measured_rps" in s["kvtier"] and "slo_rate_measured_rps" in s[BASE]:
            out[f"throughput_ratio_at_slo_{work}"] = _ratio(
                s["kvtier"]["slo_rate_measured_rps"], s[BASE]["slo_rate_measured_rps"]
            )
            slo["measured"].append(out[f"throughput_ratio_at_slo_{work}"])
            if not (s["kvtier"].get("slo_rate_bracketed") and s[BASE].get("slo_rate_bracketed")):
                slo["unbracketed"].append(work)
        out[f"connector_share_{work}"] = connector_share(s["kvtier"])
    out["ttft_p50_ratio_returning"] = p50_ratio(pooled, ids, "kvtier") if ids else math.nan
    # the lower over the workloads measured at rates; modelled only when none was
    how = "measured" if slo["measured"] else "modelled"
    out["throughput_ratio_at_slo"] = min(slo[how]) if slo[how] else math.nan
    out["throughput_ratio_at_slo_is"] = how
    if slo["unbracketed"]:  # a rate no run exceeded (a lower bound) or none passed (0)
        out["throughput_ratio_at_slo_is"] += f", not bracketed: {','.join(slo['unbracketed'])}"
    if "noreuse" in summaries:
        s = summaries["noreuse"]
        out["throughput_ratio_noreuse"] = _ratio(
            s["kvtier"]["throughput_tokens_s"], s[BASE]["throughput_tokens_s"]
        )
        out["connector_share_noreuse"] = connector_share(s["kvtier"])
    out["differing_tokens"] = sum(
        differing_tokens(configs[BASE], recs)
        for configs in passes.values()
        for name, recs in configs.items()
        if name != BASE
    )
    return out


def markdown(result: Mapping[str, Any]) -> str:
    h, bw = result["headline"], result["break_even"]
    lines = [
        "# kvtier bench vllm",
        "",
        f"model: {result['model']['name']} ({result['model']['kv_bytes_per_token']} KV bytes "
        f"per token), {result['device']}; vLLM KV cache: {result['sizing']}",
        f"break-even load bandwidth on this machine: {bw['bytes_per_s'] / 1e6:.1f} MB/s "
        f"(KV bytes per token x measured prefill {bw['prefill_tokens_s']:.0f} tokens/s)",
        f"SLO: TTFT p90 <= {result['slo_ms']:g} ms. Rate at SLO measured: the pass's "
        "requests sent again at a rate, searched; modelled: from the measured service times "
        "(Poisson arrivals, round-robin, one request at a time per engine)",
        "",
        "| workload | config | requests | TTFT p50 / p90 ms | tokens/s | gpu | dram | disk "
        "| remote | rate at SLO req/s: measured / modelled | probes: rate req/s -> p90 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for work, configs in result["summaries"].items():
        for name, s in configs.items():
            t, h_ = s["ttft_ms"], s["hit_tokens_by_tier"]
            measured = s.get("slo_rate_measured_rps")
            probes = ", ".join(f"{r:.2f} -> {p90 * 1000:.0f}" for r, p90 in s.get("slo_probes", []))
            lines.append(
                f"| {work} | {name} | {s['requests']} | {t['p50']:.0f} / {t['p90']:.0f} | "
                f"{s['throughput_tokens_s']:.0f} | {h_['gpu']:,} | {h_['dram']:,} | "
                f"{h_['disk']:,} | {h_['remote']:,} | "
                f"{'-' if measured is None else f'{measured:.3f}'} / {s['slo_rate_rps']:.3f} | "
                f"{probes or '-'} |"
            )
    lines.append("")
    lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in h.items()]
    lines.append(f"\nwall time: {result['wall_s']:.0f} s\n")
    return "\n".join(lines)


def plot(path: Path, result: Mapping[str, Any]) -> list[Path]:
    """TTFT p50 by turn per workload and configuration; hit tokens by tier per pass; TTFT
    p90 against the request rate in the measured runs. The path written, or none without
    matplotlib."""
    return plots.save({path: lambda plt: _figure(plt, result)})


def _figure(plt: Any, result: Mapping[str, Any]) -> Any:
    fig, (left, right, rates) = plt.subplots(1, 3, figsize=(18, 4.5))
    names = []
    for work, configs in result["summaries"].items():
        for name, s in configs.items():
            names.append(f"{work}\n{name}")
            hits = s["hit_tokens_by_tier"]
            bottom = 0
            for i, tier in enumerate(TIERS):
                right.bar(len(names) - 1, hits[tier], bottom=bottom, color=f"C{i}",
                          label=tier if len(names) == 1 else None)  # fmt: skip
                bottom += hits[tier]
            by_turn = s["ttft_ms_p50_by_turn"]
            if work != "noreuse":
                turns = sorted(by_turn, key=int)
                style = "-" if work == "chat" else "--"
                left.plot([int(t) for t in turns], [by_turn[t] for t in turns], marker="o",
                          linestyle=style, label=f"{work} {name}")  # fmt: skip
    bw = result["break_even"]["bytes_per_s"] / 1e6
    left.set(xlabel="turn / step", ylabel="TTFT p50 ms (measured)", yscale="log",
             title=f"{result['device']}; break-even load {bw:.0f} MB/s")  # fmt: skip
    right.set_xticks(range(len(names)), names, fontsize=7)
    right.set(ylabel="prompt tokens not computed, by tier")
    for work, configs in result["summaries"].items():
        for name, s in configs.items():
            probes = sorted(s.get("slo_probes", []))
            if probes:
                rates.plot([r for r, _ in probes], [p90 * 1000 for _, p90 in probes],
                           marker="o", label=f"{work} {name}")  # fmt: skip
    rates.axhline(result["slo_ms"], color="k", linestyle=":", label="SLO")
    rates.set(xlabel="request rate, req/s (measured runs)", ylabel="TTFT p90 ms",
              xscale="log", yscale="log", title="rate at the SLO")  # fmt: skip
    for ax in (left, right, rates):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # none on the left with no-reuse runs only
            ax.legend(fontsize=7)
    return fig
