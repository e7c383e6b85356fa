"""What a token costs on a worker, measured from the worker's own Prometheus counters.

A worker running vLLM with kvtier's connector (or `kvtier worker-sim`) counts, on `/metrics`:
prompt tokens and how many of them were cached, the time its requests spent in prefill, and
kvtier's hit tokens and load seconds (by tier where the worker labels them). Between two
scrapes the deltas give

    compute s/token = (prefill seconds - kvtier load seconds) / (prompt - cached tokens)
    load s/token    = kvtier load seconds / kvtier hit tokens          (per tier)

and each figure is an exponential moving average of those samples. Until a worker has been
measured the configured priors stand in, and a tier never measured costs what the nearest
measured tier below it costs (DRAM <= disk <= shared), so a prior never makes a far tier
look cheaper than a near one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvtier.gateway.index import DISK, DRAM, GPU

SHARED_TIER = 3  # kvtier's shared server, in cost terms (the index marks it per block)
TIER_LABELS = {"dram": DRAM, "disk": DISK, "shared": SHARED_TIER, "remote": SHARED_TIER}
SMOOTHING = 0.3  # weight of a new sample in the moving average


@dataclass(frozen=True, slots=True)
class Priors:
    """Costs used before a worker has reported any."""

    compute_s_per_token: float = 1e-4
    load_s_per_token: tuple[float, float, float] = (1e-5, 3e-5, 3e-5)  # dram, disk, shared


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line; malformed lines are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.rpartition(" ")
        if not name:
            continue
        try:
            value = float(rest)
        except ValueError:
            continue
        if math.isfinite(value):
            out[name.strip()] = value
    return out


def _sum(samples: dict[str, float], name: str, tier: str | None = None) -> float:
    total = 0.0
    for key, value in samples.items():
        base, _, labels = key.partition("{")
        if base != name:
            continue
        if tier is None or f'tier="{tier}"' in labels:
            total += value
    return total


@dataclass
class Costs:
    """A worker's measured seconds per computed token and per loaded token by tier."""

    priors: Priors = field(default_factory=Priors)
    compute_s_per_token: float | None = None
    load_s_per_token: dict[int, float] = field(default_factory=dict)  # tier -> s/token
    _last: dict[str, float] = field(default_factory=dict)

    def compute_s(self, tokens: int) -> float:
        rate = self.compute_s_per_token
        return tokens * (self.priors.compute_s_per_token if rate is None else rate)

    def load_s(self, tier: int, tokens: int) -> float:
        """Seconds to load `tokens` from a kvtier tier (DRAM, DISK or SHARED_TIER)."""
        if tier == GPU or tokens == 0:
            return 0.0
        return tokens * self._load_rate(tier)

    def _load_rate(self, tier: int) -> float:
        measured = self.load_s_per_token
        if tier in measured:
            return measured[tier]
        nearer = [measured[t] for t in range(DRAM, tier) if t in measured]
        prior = self.priors.load_s_per_token[tier - 1]
        return max([prior, *nearer]) if nearer else prior

    def observe(self, metrics_text: str) -> None:
        """Updates the averages from one scrape of the worker's `/metrics`."""
        now = parse_prometheus(metrics_text)
        counters = {
            "prompt": _sum(now, "vllm:prompt_tokens_total"),
            "cached": _sum(now, "vllm:prompt_tokens_cached_total"),
            "prefill_s": _sum(now, "vllm:request_prefill_time_seconds_sum"),
            "load_s": _sum(now, "kvtier_vllm_load_seconds_total"),
        }
        for label in TIER_LABELS:
            counters[f"hits/{label}"] = _sum(now, "kvtier_vllm_hit_tokens_total", label)
            counters[f"load_s/{label}"] = _sum(now, "kvtier_vllm_load_seconds_total", label)
        last, self._last = self._last, counters
        if not last:
            return
        delta = {k: counters[k] - last.get(k, 0.0) for k in counters}
        self._observe_compute(delta)
        self._observe_loads(delta)

    def _observe_compute(self, delta: dict[str, float]) -> None:
        computed = delta["prompt"] - delta["cached"]
        seconds = delta["prefill_s"] - delta["load_s"]
        if computed > 0 and seconds > 0:
            self.compute_s_per_token = _average(self.compute_s_per_token, seconds / computed)

    def _observe_loads(self, delta: dict[str, float]) -> None:
        hits = {label: delta[f"hits/{label}"] for label in TIER_LABELS}
        labelled = any(delta[f"load_s/{label}"] > 0 for label in TIER_LABELS)
        for label, tier in TIER_LABELS.items():
            if hits[label] <= 0:
                continue
            # A worker that does not label load seconds by tier: its average over all hits.
            seconds = delta[f"load_s/{label}"] if labelled else delta["load_s"]
            tokens = hits[label] if labelled else sum(hits.values())
            if seconds > 0:
                old = self.load_s_per_token.get(tier)
                self.load_s_per_token[tier] = _average(old, seconds / tokens)


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample
