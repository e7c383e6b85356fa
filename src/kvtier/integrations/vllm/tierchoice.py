"""Which tiers the connector loads hits from: by default every tier whose measured load is
faster than recomputing the same tokens in this engine (`load_tiers: auto`).

The scheduler measures both where it runs, from the engine's own steps:

- **recompute**: each step that prefills at least one chunk of prompt, from when it could
  start (it was planned, and the step before it had come back) to when its output came
  back, over its prompt tokens; a moving average. Outputs are matched to their steps by the
  plan number TP rank 0's worker echoes (`STEP`), never by their order: vLLM drops an
  output with nothing in it, and the echo also makes sure every output has something.
- **load**: each tier's seconds per loaded token, as TP rank 0's worker reports them for
  each load that ended whole (`tier_load_seconds/<tier>`, `tier_load_blocks/<tier>`): from
  the load's start to its last page in, the node's promotion from its disk or from a
  server included. A load whose chunks lie in several tiers is charged to the farthest; a
  moving average.

A tier measured slower than recomputing is left out: a hit stops at its first chunk there,
and vLLM computes the rest. PROBE_S after its last measurement one lookup may load from it
all the same (every chunk it holds there), and that load's figure replaces the old one, so
the choice follows the tier (a disk that was busy, a server that came nearer). Until both
figures exist every tier is loaded, as with no choice at all. The errors lean towards
loading: a step's decodes and its own synchronous loads count as time spent on its prompt
tokens, so recomputing looks dearer than it is. `load_tiers` given as a list of tiers fixes
the choice instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

log = logging.getLogger("kvtier.vllm")

PROBE_S = 30.0  # a tier left out is loaded from this long after its last load, to measure it
SMOOTHING = 0.2  # weight of a new sample in each moving average
MAX_PENDING = 16  # planned steps kept awaiting their output (vLLM keeps two in flight)
STEP = "step"  # the workers' Tally: the plan number of the step these counters close
LOAD_SECONDS = "tier_load_seconds/"  # + tier: the workers' Tally counters
LOAD_BLOCKS = "tier_load_blocks/"
LEFT_OUT = "left_out/"  # + tier: the scheduler's Tally, 1 while left out, -1 while loaded


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else old + SMOOTHING * (sample - old)


class TierChoice:
    """The tiers loads may come from, fixed (`fixed`) or chosen from measurements."""

    def __init__(
        self, block_size: int, min_prefill_tokens: int, fixed: frozenset[str] | None = None
    ) -> None:
        """`min_prefill_tokens`: the prompt tokens a step must compute to be a recompute
        sample (a chunk: decode-only steps say little about prefill)."""
        self.fixed = fixed
        self.block_size = block_size
        self.min_prefill_tokens = min_prefill_tokens
        self.compute_s_per_token: float | None = None
        self.load_s_per_token: dict[str, float] = {}
        self._pending: dict[int, tuple[float, int]] = {}  # plan -> (planned at, prompt tokens)
        self._last_output = 0.0
        self._probed: dict[str, float] = {}  # tier -> when last measured or probed
        self._probing: set[str] = set()  # left-out tiers a probe was granted for

    def allowed(self, tiers: Iterable[str], now: float | None = None) -> frozenset[str]:
        """Of `tiers` (one lookup's), those its hits may be loaded from now: a left-out
        tier's probe is granted here, to one lookup per PROBE_S."""
        if self.fixed is not None:
            return self.fixed
        out = set()
        for tier in set(tiers):
            if not self.slower_than_compute(tier):
                out.add(tier)
                continue
            now = time.monotonic() if now is None else now
            if now - self._probed.get(tier, float("-inf")) >= PROBE_S:
                self._probed[tier] = now
                self._probing.add(tier)
                out.add(tier)
        return frozenset(out)

    def slower_than_compute(self, tier: str) -> bool:
        load, compute = self.load_s_per_token.get(tier), self.compute_s_per_token
        return load is not None and compute is not None and load > compute

    def left_out(self) -> dict[str, bool]:
        """Each measured tier, and whether it is left out (none when the choice is fixed)."""
        if self.fixed is not None:
            return {}
        return {tier: self.slower_than_compute(tier) for tier in self.load_s_per_token}

    def step_planned(self, plan: int, prefill_tokens: int, now: float | None = None) -> None:
        """Plan number `plan` was made, with `prefill_tokens` prompt tokens to compute."""
        if prefill_tokens < self.min_prefill_tokens:
            return
        if len(self._pending) >= MAX_PENDING:  # outputs that never came
            del self._pending[min(self._pending)]
        self._pending[plan] = (time.monotonic() if now is None else now, prefill_tokens)

    def step_returned(
        self, worker_stats: Mapping[str, object], now: float | None = None
    ) -> dict[str, bool]:
        """A step's output came back, with the workers' counters; returns `left_out()`."""
        now = time.monotonic() if now is None else now
        before = self.left_out()
        plan = worker_stats.get(STEP)
        planned = self._pending.pop(plan, None) if isinstance(plan, int) else None
        if planned is not None:
            at, tokens = planned
            seconds = now - max(at, self._last_output)
            if seconds > 0:
                self.compute_s_per_token = _average(self.compute_s_per_token, seconds / tokens)
        self._last_output = now
        for name, value in worker_stats.items():
            if name.startswith(LOAD_SECONDS) and isinstance(value, int | float):
                tier = name.removeprefix(LOAD_SECONDS)
                blocks = worker_stats.get(LOAD_BLOCKS + tier)
                if isinstance(blocks, int | float) and blocks > 0:
                    self._measured(tier, value / (blocks * self.block_size), now)
        after = self.left_out()
        for tier, out in after.items():
            if out != before.get(tier, False):
                log.info(
                    "kvtier: %s loads at %.3g ms per token, this engine recomputes at %.3g: "
                    "its hits are now %s",
                    tier, 1e3 * self.load_s_per_token[tier],
                    1e3 * (self.compute_s_per_token or 0.0), "recomputed" if out else "loaded",
                )  # fmt: skip
        return after

    def _measured(self, tier: str, s_per_token: float, now: float) -> None:
        probe = tier in self._probing  # its figure is stale: the new one replaces it
        self._probing.discard(tier)
        old = None if probe else self.load_s_per_token.get(tier)
        self.load_s_per_token[tier] = _average(old, s_per_token)
        self._probed[tier] = now  # measured: its next probe is PROBE_S from now
