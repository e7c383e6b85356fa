"""Which tiers the connector loads hits from: by default every tier whose measured load is
faster than recomputing the same tokens in this engine (`load_tiers: auto`).

The scheduler measures both where it runs, from the engine's own steps:

- **recompute**: the seconds per token of each step that prefills at least one chunk of
  prompt, from when the step could start (it was planned, and the step before it had come
  back) to when its output came back; a moving average.
- **load**: each tier's seconds per loaded block, as the workers report them for each
  request's load (`tier_load_seconds/<tier>`, `tier_load_blocks/<tier>`): from the load's
  start to its last page in, the node's promotion from its disk or from a server included.
  A load whose chunks lie in several tiers is charged to the farthest; a moving average.

A tier measured slower than recomputing is left out: a hit stops at its first chunk there,
and vLLM computes the rest. PROBE_S after its last measurement one lookup may load from it
all the same, so that its figure follows the tier (a disk that was busy, a server that came
nearer). Until both figures exist every tier is loaded, as with no choice at all. The
errors lean the same way: a step's synchronous loads and its decodes count as compute
time, so recomputing looks dearer and a tier is kept, never dropped, by them. `load_tiers`
given as a list of tiers fixes the choice instead.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping

log = logging.getLogger("kvtier.vllm")

PROBE_S = 30.0  # a tier left out is loaded from this long after its last load, to measure it
SMOOTHING = 0.2  # weight of a new sample in each moving average
MAX_PENDING = 4  # planned steps awaiting their output; more means an output went unseen
LOAD_SECONDS = "tier_load_seconds/"  # + tier: the workers' Tally counters
LOAD_BLOCKS = "tier_load_blocks/"
LEFT_OUT = "left_out/"  # + tier: the scheduler's Tally, +1 when left out, -1 when loaded again


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
        self._pending: deque[tuple[float, int]] = deque()  # (planned at, tokens) per step
        self._last_output = 0.0
        self._probed: dict[str, float] = {}
        self._left_out: set[str] = set()  # tiers measured slower, as last reported

    def allows(self, tier: str, now: float | None = None) -> bool:
        """Whether a hit may be loaded from `tier` now (a left-out tier's probe is granted
        here, to one caller per PROBE_S)."""
        if self.fixed is not None:
            return tier in self.fixed
        if not self.slower_than_compute(tier):
            return True
        now = time.monotonic() if now is None else now
        if now - self._probed.get(tier, float("-inf")) >= PROBE_S:
            self._probed[tier] = now
            return True
        return False

    def slower_than_compute(self, tier: str) -> bool:
        load, compute = self.load_s_per_token.get(tier), self.compute_s_per_token
        return load is not None and compute is not None and load > compute

    def step_planned(self, prefill_tokens: int, tokens: int, now: float | None = None) -> None:
        """A step was planned: `prefill_tokens` of its `tokens` are prompt tokens."""
        if len(self._pending) >= MAX_PENDING:
            self._pending.clear()  # an output went unseen: pairing them again is guesswork
        sampled = tokens if prefill_tokens >= self.min_prefill_tokens else 0
        self._pending.append((time.monotonic() if now is None else now, sampled))

    def step_returned(
        self, worker_stats: Mapping[str, object], now: float | None = None
    ) -> dict[str, int]:
        """The oldest planned step's output came back, with the workers' counters. Returns
        the tiers that changed sides: +1 for one now left out, -1 for one loaded again."""
        now = time.monotonic() if now is None else now
        if self._pending:
            planned, tokens = self._pending.popleft()
            seconds = now - max(planned, self._last_output)
            if tokens and seconds > 0:
                self.compute_s_per_token = _average(self.compute_s_per_token, seconds / tokens)
        self._last_output = now
        for name, value in worker_stats.items():
            if not name.startswith(LOAD_SECONDS) or not isinstance(value, int | float):
                continue
            tier = name.removeprefix(LOAD_SECONDS)
            blocks = worker_stats.get(LOAD_BLOCKS + tier)
            if isinstance(blocks, int | float) and blocks > 0:
                sample = value / (blocks * self.block_size)
                self.load_s_per_token[tier] = _average(self.load_s_per_token.get(tier), sample)
                self._probed[tier] = now  # measured: its next probe is PROBE_S from now
        return self._changes()

    def _changes(self) -> dict[str, int]:
        if self.fixed is not None:
            return {}
        slow = {t for t in self.load_s_per_token if self.slower_than_compute(t)}
        changes = {t: 1 for t in slow - self._left_out} | {t: -1 for t in self._left_out - slow}
        self._left_out = slow
        for tier, change in changes.items():
            log.info(
                "kvtier: %s loads at %.3g ms per token, this engine recomputes at %.3g: its "
                "hits are now %s",
                tier, 1e3 * self.load_s_per_token[tier], 1e3 * (self.compute_s_per_token or 0.0),
                "recomputed" if change > 0 else "loaded",
            )  # fmt: skip
        return changes
