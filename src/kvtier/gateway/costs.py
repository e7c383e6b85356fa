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
import re
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


WATCHED = (
    "vllm:prompt_tokens_total",
    "vllm:prompt_tokens_cached_total",
    "vllm:request_prefill_time_seconds_sum",
    "kvtier_vllm_hit_tokens_total",
    "kvtier_vllm_load_seconds_total",
)
_TIER_LABEL = re.compile(r'tier="([^"]*)"')
LOAD_TIER = "kvtier_vllm_load_tier"  # gauge: 0 for a tier the worker recomputes (load_tiers)


def unloaded_tiers(samples: dict[str, float]) -> frozenset[int]:
    """The tiers a worker's connector does not load from (`load_tiers`): their chunks are
    recomputed there, so a prefix in them is worth nothing on that worker."""
    tiers = set()
    for key, value in samples.items():
        base, _, labels = key.partition("{")
        tier = _tier(labels)
        if base == LOAD_TIER and value == 0 and tier is not None:
            tiers.add(tier)
    return frozenset(tiers)


def _tier(labels: str) -> int | None:
    """The cost tier a sample's `tier` label names (None: none, or one not kvtier's)."""
    found = _TIER_LABEL.search(labels)
    return TIER_LABELS.get(found.group(1)) if found else None


def counters(samples: dict[str, float]) -> dict[str, float]:
    """The watched counters summed over their labels: `name` for all and, for kvtier's,
    `name/<tier>` per tier (both `shared` and `remote` count as SHARED_TIER), in one pass."""
    out = dict.fromkeys(WATCHED, 0.0)
    for key, value in samples.items():
        base, _, labels = key.partition("{")
        if base not in out:
            continue
        out[base] += value
        tier = _tier(labels)
        if tier is not None:
            per_tier = f"{base}/{tier}"
            out[per_tier] = out.get(per_tier, 0.0) + value
    return out


@dataclass
class Costs:
    """A worker's measured seconds per computed token and per loaded token by tier."""

    priors: Priors = field(default_factory=Priors)
    compute_s_per_token: float | None = None
    load_s_per_token: dict[int, float] = field(default_factory=dict)  # tier -> s/token
    unloaded: frozenset[int] = frozenset()  # tiers the worker recomputes instead
    _last: dict[str, float] = field(default_factory=dict)

    def compute_s(self, tokens: int) -> float:
        rate = self.compute_s_per_token
        return tokens * (self.priors.compute_s_per_token if rate is None else rate)

    def load_s(self, tier: int, tokens: int) -> float:
        """Seconds to load `tokens` from a kvtier tier (DRAM, DISK or SHARED_TIER)."""
        if tier == GPU or tokens == 0:
            return 0.0
        if tier in self.unloaded:  # the worker recomputes what this tier holds
            return self.compute_s(tokens)
        return tokens * self._load_rate(tier)

    def _load_rate(self, tier: int) -> float:
        measured = self.load_s_per_token
        if tier in measured:
            return measured[tier]
        nearer = [measured[t] for t in range(DRAM, tier) if t in measured]
        prior = self.priors.load_s_per_token[tier - 1]
        return max([prior, *nearer]) if nearer else prior

    def observe(self, metrics_text: str) -> bool:
        """Updates the averages from one scrape of the worker's `/metrics`. A counter that
        went backwards (the worker restarted) starts a new baseline instead of a sample, and
        True is returned."""
        samples = parse_prometheus(metrics_text)
        self.unloaded = unloaded_tiers(samples)
        now = counters(samples)
        last, self._last = self._last, now
        if not last:
            return False
        delta = {k: v - last.get(k, 0.0) for k, v in now.items()}
        if any(d < 0 for d in delta.values()):
            return True
        self._observe_compute(delta)
        self._observe_loads(delta)
        return False

    def _observe_compute(self, delta: dict[str, float]) -> None:
        computed = delta["vllm:prompt_tokens_total"] - delta["vllm:prompt_tokens_cached_total"]
        seconds = (
            delta["vllm:request_prefill_time_seconds_sum"] - delta["kvtier_vllm_load_seconds_total"]
        )
        if computed > 0 and seconds > 0:
            self.compute_s_per_token = _average(self.compute_s_per_token, seconds / computed)

    def _observe_loads(self, delta: dict[str, float]) -> None:
        hits, seconds = "kvtier_vllm_hit_tokens_total", "kvtier_vllm_load_seconds_total"
        tiers = sorted(set(TIER_LABELS.values()))
        labelled = any(delta.get(f"{seconds}/{t}", 0.0) > 0 for t in tiers)
        for tier in tiers:
            tokens = delta.get(f"{hits}/{tier}", 0.0)
            # A worker that does not label load seconds by tier: its average over all hits.
            spent = delta.get(f"{seconds}/{tier}", 0.0) if labelled else delta[seconds]
            over = tokens if labelled else delta[hits]
            if tokens > 0 and over > 0 and spent > 0:
                old = self.load_s_per_token.get(tier)
                self.load_s_per_token[tier] = _average(old, spent / over)


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample
