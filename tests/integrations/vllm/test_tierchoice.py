"""TierChoice: which tiers the connector loads from, measured against recomputing."""

from __future__ import annotations

from kvtier.integrations.vllm import tierchoice
from kvtier.integrations.vllm.tierchoice import STEP, TierChoice

BLOCK = 16
CHUNK = 64
TIERS = ("dram", "disk", "remote")


def _load(tier: str, seconds: float, blocks: int) -> dict[str, float]:
    """A worker's counters for one whole load."""
    return {f"tier_load_seconds/{tier}": seconds, f"tier_load_blocks/{tier}": blocks}


def _timed(choice: TierChoice, s_per_token: float, at: float) -> None:
    """One prefill step of a chunk measured at `s_per_token`, planned and back by `at`."""
    plan = int(at * 1000)
    choice.step_planned(plan, CHUNK, now=at - s_per_token * CHUNK)
    choice.step_returned({STEP: plan}, now=at)


def test_every_tier_loads_until_both_figures_are_measured() -> None:
    choice = TierChoice(BLOCK, CHUNK)
    assert choice.allowed(TIERS, now=0.0) == set(TIERS)
    choice.step_returned(_load("disk", 10.0, 1), now=1.0)  # slow, but recompute unmeasured
    assert choice.allowed(TIERS, now=1.0) == set(TIERS)
    assert choice.left_out() == {"disk": False}
    fixed = TierChoice(BLOCK, CHUNK, frozenset({"dram"}))
    assert fixed.allowed(TIERS) == {"dram"} and fixed.left_out() == {}


def test_recompute_is_timed_by_plan_number_from_when_a_step_could_start() -> None:
    """A step runs from its plan, or from the previous output when it was planned while that
    one ran (async scheduling). Outputs are matched by the plan number the worker echoes:
    a lost output (vLLM drops empty ones) shifts nothing; decode-only steps are no sample;
    time is per prompt token."""
    choice = TierChoice(BLOCK, CHUNK)
    choice.step_planned(1, prefill_tokens=100, now=0.0)
    choice.step_planned(2, prefill_tokens=0, now=0.1)  # decodes, planned meanwhile
    choice.step_returned({STEP: 1}, now=1.0)  # 100 prompt tokens in 1 s
    assert choice.compute_s_per_token == 1.0 / 100
    choice.step_returned({STEP: 2}, now=5.0)  # the decode step: no sample
    choice.step_planned(3, prefill_tokens=200, now=5.5)
    choice.step_planned(4, prefill_tokens=200, now=5.6)
    # the output of plan 3 never comes; plan 4's does, 1 s after plan 2's
    choice.step_returned({STEP: 4}, now=6.6)  # from 5.6: 1 s for 200 prompt tokens
    assert abs(choice.compute_s_per_token - (0.01 + tierchoice.SMOOTHING * -0.005)) < 1e-12
    choice.step_returned({}, now=7.0)  # no plan number: no sample
    assert abs(choice.compute_s_per_token - 0.009) < 1e-12


def test_a_tier_slower_than_recomputing_is_left_out_but_probed_whole() -> None:
    """Disk at 1 s per 16-token block against 10 ms per computed token: left out, except for
    one lookup PROBE_S after its last load (all of that lookup's disk chunks); the probe's
    figure replaces the old one, so one fast probe loads it again. DRAM, faster, stays."""
    choice = TierChoice(BLOCK, CHUNK)
    _timed(choice, 0.01, at=0.64)
    choice.step_returned(_load("dram", 0.001, 4), now=0.7)
    state = choice.step_returned(_load("disk", 1.0, 1), now=1.0)
    assert state == {"dram": False, "disk": True}
    assert choice.allowed(TIERS, now=2.0) == {"dram", "remote"}
    probe = 1.0 + tierchoice.PROBE_S
    assert choice.allowed(["disk", "disk", "dram"], now=probe) == {"disk", "dram"}  # to one
    assert choice.allowed(TIERS, now=probe + 1) == {"dram", "remote"}
    assert choice.allowed(TIERS, now=1.0 + 2 * tierchoice.PROBE_S) == set(TIERS)  # no load came
    # the probe's load: 0.016 s per block is 1 ms per token, and replaces the 62.5 ms figure
    assert choice.step_returned(_load("disk", 0.016, 1), now=100.0)["disk"] is False
    assert choice.allowed(TIERS, now=100.0) == set(TIERS)
    # a loaded tier's figure moves by its average: one slow load does not flip it
    assert choice.step_returned(_load("disk", 0.32, 1), now=101.0)["disk"] is False
