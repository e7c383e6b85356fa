"""Routing policies: which worker a request goes to.

A policy sees, per worker, the prefix blocks the index says it would reuse (`Hits`), its load
and its measured costs, and returns a worker. Four policies, for side-by-side benchmarks:

- `round-robin`: each healthy worker in turn;
- `least-load`: the fewest in-flight tokens;
- `prefix`: the longest prefix in a worker's GPU cache, as cache-aware routers do (SGLang's
  cache_aware): to the best match when it covers more than half the prompt, by load when it
  does not or when the pool is imbalanced;
- `kvtier` (the default): the lowest cost, where a worker's cost is the request's expected
  time to first token there (`waiting prefill seconds + compute time of the tokens it would
  compute + load time of the blocks kvtier would load for it`) plus the compute time it adds
  to the cluster (recomputing a prefix another worker holds delays everyone queued behind
  it). A GPU hit costs nothing; a DRAM, disk or shared hit costs that worker's measured load
  time (`costs.py`), not a fixed weight. That is "sticky while the worker has room": the
  cache-rich worker wins until its queue costs more than recomputing elsewhere. A guard on
  top keeps any worker from holding more than `GUARD` times the mean in-flight tokens (peers
  without one sent all traffic to one worker: sglang #32983, vllm-router #179). The cost
  already balances load, so the guard is a backstop for costs gone wrong: it waits for
  `GUARD_MIN_REQUESTS` in flight, so a burst of one prompt family does not trip it while the
  other workers' mean is still small (each trip recomputes a prefix elsewhere).

Ties go to the next worker in turn, so misses never pile onto worker 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kvtier.gateway.costs import SHARED_TIER, Costs
from kvtier.gateway.index import DISK, DRAM, Hits

GUARD = 2.0  # no worker above this many times the mean in-flight tokens...
GUARD_MIN_REQUESTS = 8  # ...once it has at least this many requests in flight
PREFIX_MATCH = 0.5  # `prefix`: a match covering more than this share of the prompt is sticky
IMBALANCE_ABS, IMBALANCE_REL = 8, 1.5  # `prefix`: in-flight requests max - min, max / min


@dataclass
class Load:
    """A worker's unfinished work as the gateway sent it."""

    requests: int = 0
    tokens: int = 0  # tokens to compute (uncached prompt + expected output) of unfinished ones
    prefill_s: float = 0.0  # expected prefill seconds of requests still without a first token


class Candidate(NamedTuple):
    """One worker as a policy sees it."""

    worker: int
    hits: Hits
    load: Load
    costs: Costs


class Request(NamedTuple):
    """What a policy knows of a request: its prompt length and the workers' block size."""

    prompt_tokens: int
    block_tokens: int


class Policy(Protocol):
    """Picks one of `candidates` (never empty, healthy workers only) for a request. A policy
    with `reads_hits` False never looks at the candidates' hits: the pool gives it NO_HITS
    and matches the prompt against the chosen worker only."""

    name: str
    reads_hits: bool

    def pick(self, request: Request, candidates: Sequence[Candidate]) -> Candidate: ...


class Prefill(NamedTuple):
    compute_s: float  # the tokens the worker would compute
    load_s: float  # the blocks kvtier would load for it


def prefill_s(request: Request, c: Candidate) -> Prefill:
    """Where a request's prefill time on worker `c` would go."""
    b = request.block_tokens
    hits = c.hits
    compute_tokens = max(request.prompt_tokens - hits.blocks * b, 0)
    loads = (
        c.costs.load_s(DRAM, hits.dram * b)
        + c.costs.load_s(DISK, hits.disk * b)
        + c.costs.load_s(SHARED_TIER, hits.shared * b)
    )
    return Prefill(c.costs.compute_s(compute_tokens), loads)


def expected_ttft_s(request: Request, c: Candidate) -> float:
    """Queue + compute of the uncached tokens + kvtier loads, on worker `c`."""
    compute, loads = prefill_s(request, c)
    return c.load.prefill_s + compute + loads


def cost_s(request: Request, c: Candidate) -> float:
    """`kvtier`'s score: the expected TTFT plus the compute it adds to the cluster."""
    compute, loads = prefill_s(request, c)
    return c.load.prefill_s + 2 * compute + loads


class _Turns:
    """A rotating start, so that ties fall on a different worker each time."""

    reads_hits = True

    def __init__(self) -> None:
        self._turn = 0

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        self._turn += 1
        start = self._turn % len(candidates)
        return [*candidates[start:], *candidates[:start]]


class RoundRobin(_Turns):
    """Each worker in turn."""

    name = "round-robin"
    reads_hits = False

    def pick(self, request: Request, candidates: Sequence[Candidate]) -> Candidate:
        return self.order(candidates)[0]


class LeastLoad(_Turns):
    """The fewest in-flight tokens, then requests."""

    name = "least-load"
    reads_hits = False

    def pick(self, request: Request, candidates: Sequence[Candidate]) -> Candidate:
        return min(self.order(candidates), key=lambda c: (c.load.tokens, c.load.requests))


class Prefix(_Turns):
    """The longest GPU prefix, unless it is short or the pool is imbalanced."""

    name = "prefix"

    def pick(self, request: Request, candidates: Sequence[Candidate]) -> Candidate:
        ordered = self.order(candidates)
        least = min(ordered, key=lambda c: (c.load.requests, c.load.tokens))
        busiest = max(c.load.requests for c in ordered)
        if busiest - least.load.requests > IMBALANCE_ABS and (
            busiest > IMBALANCE_REL * least.load.requests
        ):
            return least
        best = max(ordered, key=lambda c: (c.hits.gpu, -c.load.requests))
        matched = best.hits.gpu * request.block_tokens
        return best if matched > PREFIX_MATCH * request.prompt_tokens else least


class Kvtier(_Turns):
    """The lowest `cost_s`, among workers within the in-flight guard."""

    name = "kvtier"

    def pick(self, request: Request, candidates: Sequence[Candidate]) -> Candidate:
        ordered = self.order(candidates)
        allowed = [c for c in ordered if not _over_guard(c, ordered)] or ordered
        return min(allowed, key=lambda c: (cost_s(request, c), c.load.requests))


def _over_guard(c: Candidate, all_: Sequence[Candidate]) -> bool:
    mean = sum(o.load.tokens for o in all_) / len(all_)
    return c.load.requests >= GUARD_MIN_REQUESTS and c.load.tokens > GUARD * mean


POLICIES: dict[str, type[RoundRobin | LeastLoad | Prefix | Kvtier]] = {
    p.name: p for p in (RoundRobin, LeastLoad, Prefix, Kvtier)
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
