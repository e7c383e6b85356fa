"""TierChoice: which tiers the connector loads from, measured against recomputing."""

from __future__ import annotations

from kvtier.integrations.vllm import tierchoice
from kvtier.integrations.vllm.tierchoice import TierChoice

BLOCK = 16
CHUNK = 64


def _disk_load(choice: TierChoice, seconds: float, blocks: int, now: float) -> None:
    """A step's output reporting one whole load from disk (no step of its own pending)."""
    choice.step_returned(
        {"tier_load_seconds/disk": seconds, "tier_load_blocks/disk": blocks}, now=now
    )


def test_every_tier_loads_until_both_figures_are_measured() -> None:
    choice = TierChoice(BLOCK, CHUNK)
    assert all(choice.allows(t, now=0.0) for t in ("dram", "disk", "remote"))
    _disk_load(choice, 10.0, 1, now=1.0)  # very slow, but recomputing is not measured yet
    assert choice.allows("disk", now=1.0)
    fixed = TierChoice(BLOCK, CHUNK, frozenset({"dram"}))
    assert fixed.allows("dram") and not fixed.allows("disk") and not fixed.allows("remote")


def test_recompute_is_timed_from_when_a_prefill_step_could_start() -> None:
    """A step runs from its plan, or from the previous step's output when it was planned
    while that one ran (async scheduling); decode-only steps are no sample."""
    choice = TierChoice(BLOCK, CHUNK)
    choice.step_planned(prefill_tokens=100, tokens=100, now=0.0)
    choice.step_planned(prefill_tokens=0, tokens=8, now=0.1)  # decodes, planned meanwhile
    choice.step_returned({}, now=1.0)  # 100 tokens in 1 s
    assert choice.compute_s_per_token == 1.0 / 100
    choice.step_returned({}, now=5.0)  # a decode step: no sample
    assert choice.compute_s_per_token == 1.0 / 100
    choice.step_planned(prefill_tokens=200, tokens=208, now=5.5)
    choice.step_returned({}, now=6.54)  # 1.04 s for 208 tokens: 0.005 s/token
    assert abs(choice.compute_s_per_token - (0.01 + tierchoice.SMOOTHING * -0.005)) < 1e-9


def test_a_tier_slower_than_recomputing_is_left_out_but_probed() -> None:
    """Disk at 1 s per 16-token block against 10 ms per computed token: left out, except one
    lookup PROBE_S after its last load; once it measures faster it is loaded again. DRAM,
    faster, stays."""
    choice = TierChoice(BLOCK, CHUNK)
    choice.step_planned(CHUNK, CHUNK, now=0.0)
    choice.step_returned({"tier_load_seconds/dram": 0.001, "tier_load_blocks/dram": 4}, now=0.64)
    changes = choice.step_returned(
        {"tier_load_seconds/disk": 1.0, "tier_load_blocks/disk": 1}, now=1.0
    )
    assert changes == {"disk": 1}  # left out: the gauge goes to 0
    assert choice.slower_than_compute("disk") and not choice.slower_than_compute("dram")
    assert not choice.allows("disk", now=1.0) and not choice.allows("disk", now=2.0)
    assert choice.allows("dram", now=2.0)
    assert choice.allows("disk", now=1.0 + tierchoice.PROBE_S)  # a probe, to one lookup
    assert not choice.allows("disk", now=2.0 + tierchoice.PROBE_S)
    assert choice.allows("disk", now=1.0 + 2 * tierchoice.PROBE_S)  # its load never came
    changes = {}
    for i in range(40):  # the disk speeds up: 0.016 s per block, 1 ms per token
        changes |= choice.step_returned(
            {"tier_load_seconds/disk": 0.016, "tier_load_blocks/disk": 1}, now=100.0 + i
        )
    assert changes == {"disk": -1}  # loaded again
    assert not choice.slower_than_compute("disk")
    assert choice.allows("disk", now=200.0) and choice.allows("disk", now=200.1)


def test_outputs_never_seen_do_not_pair_later_steps_wrongly() -> None:
    """More planned steps than vLLM keeps in flight means an output went unseen: the pending
    steps are dropped rather than paired with the wrong outputs."""
    choice = TierChoice(BLOCK, CHUNK)
    for i in range(tierchoice.MAX_PENDING + 1):
        choice.step_planned(CHUNK, CHUNK, now=float(i))
    choice.step_returned({}, now=100.0)
    last = (100.0 - tierchoice.MAX_PENDING) / CHUNK  # the last planned only
    assert choice.compute_s_per_token == last
    choice.step_returned({}, now=101.0)  # nothing pending: no sample
    assert choice.compute_s_per_token == last
