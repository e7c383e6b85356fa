"""The routing index, the measured costs and the four policies, without a network."""

from __future__ import annotations

import random

import pytest

from kvtier.gateway import events
from kvtier.gateway.costs import SHARED_TIER, Costs, Priors
from kvtier.gateway.index import DISK, DRAM, GPU, SHARED, Hits, PrefixIndex
from kvtier.gateway.masks import SCALAR
from kvtier.gateway.pool import Bound, Pool
from kvtier.gateway.routing import (
    GUARD,
    GUARD_MIN_REQUESTS,
    Candidate,
    Load,
    Request,
    expected_ttft_s,
    make_policy,
)
from kvtier.gateway.tokens import block_keys, chain_keys, root_key, tokenize


def test_match_splits_each_workers_prefix_by_tier() -> None:
    """GPU run first, then kvtier's tiers (nearest counted), up to the first block in none."""
    ix = PrefixIndex(3, 1000)
    ix.add(0, GPU, range(10))
    ix.add(0, DRAM, range(10, 20))
    ix.add(0, DISK, range(15, 25))
    ix.add(SHARED, 0, range(25, 30))
    ix.add(1, GPU, range(5))
    ix.add(1, GPU, range(6, 30))  # a gap at block 5: nothing after it is usable as GPU
    hits = ix.match(list(range(40)))
    assert hits[0] == Hits(10, 10, 5, 5)
    assert hits[1] == Hits(5, 0, 0, 0)
    assert hits[2] == Hits(0, 0, 0, 0)


@pytest.mark.parametrize("workers", [3, 17])  # 17: masks of two 64-bit words
def test_match_agrees_with_a_per_block_model(workers: int) -> None:
    """Random holders: the run-length walk equals a block-by-block reference, for short
    prompts (looked up key by key) and long ones (at once)."""
    rng = random.Random(7)
    for i in range(200):
        ix = PrefixIndex(workers, 10_000)
        held: dict[tuple[int, int], set[int]] = {}
        blocks, p = (30, 0.6) if i % 2 else (SCALAR + 50, 0.8)
        for holder in [(w, t) for w in range(workers) for t in range(3)] + [(SHARED, 0)]:
            keys = {k for k in range(blocks) if rng.random() < p}
            ix.add(holder[0], holder[1], keys)
            held[holder] = keys
        keys = list(range(blocks))
        for w, got in enumerate(ix.match(keys)):
            counts, in_gpu = [0, 0, 0, 0], True
            for k in keys:
                if in_gpu and k in held[(w, GPU)]:
                    counts[0] += 1
                    continue
                in_gpu = False
                tier = next((t for t in (DRAM, DISK) if k in held[(w, t)]), None)
                if tier is not None:
                    counts[tier] += 1
                elif k in held[(SHARED, 0)]:
                    counts[3] += 1
                else:
                    break
            assert got == Hits(*counts)


@pytest.mark.parametrize("workers", [3, 17])
def test_match_one_is_that_workers_share_of_match(workers: int) -> None:
    """Random holders: matching one worker's prefix equals its entry of the full match."""
    rng = random.Random(11)
    for i in range(200):
        ix = PrefixIndex(workers, 10_000)
        blocks, p = (30, 0.7) if i % 2 else (SCALAR + 50, 0.85)
        for w, tier in [(w, t) for w in range(workers) for t in range(4)] + [(SHARED, 0)]:
            ix.add(w, tier, [k for k in range(blocks) if rng.random() < p])
        keys = list(range(rng.randrange(blocks + 1)))
        assert [ix.match_one(keys, w) for w in range(workers)] == ix.match(keys)


@pytest.mark.parametrize("policy", ["round-robin", "least-load"])
def test_a_policy_blind_to_hits_books_what_a_full_match_would(policy: str) -> None:
    """Round-robin and least-load get no hits, yet each booking carries the chosen worker's
    hits (an affinity's credit included) and predicts the same blocks as with a full match."""
    rng = random.Random(5)
    blind = Pool(["http://a", "http://b", "http://c"], make_policy(policy), 16, 1000)
    full = Pool(["http://a", "http://b", "http://c"], make_policy(policy), 16, 1000)
    full.policy.reads_hits = True
    for i in range(300):
        keys = [rng.randrange(40) for _ in range(rng.randrange(1, 12))]
        bound = Bound(rng.randrange(3), len(keys), keys[-1]) if i % 3 == 0 else None
        got, want = (
            blind.route(keys, 16 * len(keys) + 3, 8, bound),
            full.route(keys, 16 * len(keys) + 3, 8, bound),
        )
        assert (got.worker, got.hits, got.keys, got.tokens) == (
            want.worker, want.hits, want.keys, want.tokens,
        )  # fmt: skip
        if rng.random() < 0.5:
            blind.finished(got)
            full.finished(want)


def test_holders_are_bounded_lrus_and_remove_clear_work() -> None:
    """A holder past capacity forgets its least recently added key; remove and clear forget."""
    ix = PrefixIndex(2, 3)
    ix.add(0, GPU, [1, 2, 3])
    ix.add(0, GPU, [1])  # touch 1
    ix.add(0, GPU, [4])  # evicts 2
    assert ix.match([1])[0].gpu == 1 and ix.match([2])[0].gpu == 0
    ix.remove(0, GPU, [1])
    assert ix.match([1])[0].gpu == 0
    ix.add(1, GPU, [3])
    ix.clear(0, GPU)
    assert ix.match([3]) == [Hits(0, 0, 0, 0), Hits(1, 0, 0, 0)]
    assert len(ix) == 1


def test_removing_a_key_twice_in_one_call_removes_it_once() -> None:
    """An event can name one gateway key twice (two engine hashes of the same tokens)."""
    ix = PrefixIndex(1, 100)
    ix.add(0, GPU, [1, 2, 3])
    ix.remove(0, GPU, [2, 2])
    assert ix.match([1, 2, 3])[0].gpu == 1
    ix.clear(0, GPU)
    assert ix.match([1, 2, 3])[0] == Hits(0, 0, 0, 0) and len(ix) == 0


def _metrics(
    prompt: int, cached: int, prefill_s: float, hits: dict[str, int], load: dict[str, float]
) -> str:
    lines = [
        f'vllm:prompt_tokens_total{{model_name="m"}} {prompt}',
        f'vllm:prompt_tokens_cached_total{{model_name="m"}} {cached}',
        f'vllm:request_prefill_time_seconds_sum{{model_name="m"}} {prefill_s}',
        "# HELP something ignored",
        "garbage line",
    ]
    lines += [f'kvtier_vllm_hit_tokens_total{{tier="{t}"}} {n}' for t, n in hits.items()]
    lines += [f'kvtier_vllm_load_seconds_total{{tier="{t}"}} {s}' for t, s in load.items()]
    return "\n".join(lines)


def test_costs_come_from_counter_deltas() -> None:
    """compute = (prefill - load) s / computed tokens; load = load s / hit tokens, per tier."""
    c = Costs(Priors(compute_s_per_token=1.0, load_s_per_token=(1.0, 2.0, 3.0)))
    c.observe(_metrics(0, 0, 0.0, {"dram": 0}, {"dram": 0.0}))
    assert c.compute_s(10) == 10.0  # the prior until two scrapes
    c.observe(_metrics(1000, 400, 1.4, {"dram": 400}, {"dram": 0.2}))
    assert c.compute_s(600) == pytest.approx(1.2)  # (1.4 - 0.2) s over 600 computed tokens
    assert c.load_s(DRAM, 400) == pytest.approx(0.2)
    assert c.load_s(DISK, 10) == 20.0  # a tier never measured keeps its prior...
    c2 = Costs(Priors(load_s_per_token=(1.0, 1e-9, 1e-9)))
    c2.observe(_metrics(0, 0, 0, {"dram": 0}, {"dram": 0}))
    c2.observe(_metrics(100, 100, 1.0, {"dram": 100}, {"dram": 1.0}))
    assert c2.load_s(SHARED_TIER, 1) >= c2.load_s(DRAM, 1)  # ...never cheaper than a nearer one
    assert c.load_s(GPU, 100) == 0.0


def test_a_tier_the_worker_does_not_load_from_costs_its_recompute() -> None:
    """A worker whose connector leaves the disk out (`load_tiers`, exported as
    `kvtier_vllm_load_tier{tier="disk"} 0`) recomputes what its disk holds: a disk prefix
    there costs what computing it costs, while its DRAM keeps its load cost."""
    c = Costs(Priors(compute_s_per_token=1.0, load_s_per_token=(0.1, 0.2, 0.3)))
    gauge = "kvtier_vllm_load_tier"
    c.observe(f'{gauge}{{tier="dram"}} 1\n{gauge}{{tier="disk"}} 0\n{gauge}{{tier="remote"}} 1')
    assert c.load_s(DISK, 10) == c.compute_s(10) == 10.0
    assert c.load_s(DRAM, 10) == pytest.approx(1.0)
    assert c.load_s(SHARED_TIER, 10) == pytest.approx(3.0)
    c.observe(f'{gauge}{{tier="disk"}} 1')  # loaded again
    assert c.load_s(DISK, 10) == pytest.approx(2.0)


def test_unlabelled_load_seconds_are_averaged_over_all_hits() -> None:
    """vLLM's connector does not label load seconds by tier: one average for every tier."""
    c = Costs()

    def text(dram: int, disk: int, seconds: float) -> str:
        hits = "kvtier_vllm_hit_tokens_total"
        return "\n".join(
            [f'{hits}{{tier="dram"}} {dram}', f'{hits}{{tier="disk"}} {disk}',
             f"kvtier_vllm_load_seconds_total {seconds}"]
        )  # fmt: skip

    c.observe(text(0, 0, 0.0))
    c.observe(text(300, 100, 0.4))
    assert c.load_s(DRAM, 1) == pytest.approx(1e-3) and c.load_s(DISK, 1) == pytest.approx(1e-3)


def _candidates(hits: list[Hits], loads: list[Load] | None = None) -> list[Candidate]:
    loads = loads or [Load() for _ in hits]
    priors = Priors(compute_s_per_token=1e-3, load_s_per_token=(1e-4, 3e-4, 5e-4))
    pairs = enumerate(zip(hits, loads, strict=True))
    return [Candidate(i, h, load, Costs(priors)) for i, (h, load) in pairs]


def test_kvtier_policy_credits_tiers_by_cost_and_yields_to_load() -> None:
    """A DRAM hit beats a miss; a far cheaper idle worker beats a loaded cache-rich one."""
    policy = make_policy("kvtier")
    req = Request(prompt_tokens=1600, block_tokens=16)
    cands = _candidates([Hits(0, 0, 0, 0), Hits(0, 90, 0, 0), Hits(0, 0, 0, 90)])
    assert policy.pick(req, cands).worker == 1  # DRAM cheaper than shared, both beat compute
    busy = Load(requests=3, tokens=5000, prefill_s=10.0)
    cands = _candidates([Hits(0, 0, 0, 0), Hits(100, 0, 0, 0)], [Load(), busy])
    assert policy.pick(req, cands).worker == 0  # 10 s of queue outweighs 1.6 s of compute
    assert expected_ttft_s(req, cands[1]) == pytest.approx(10.0)


def test_kvtier_guard_keeps_a_worker_under_twice_the_mean() -> None:
    """A cache-rich worker holding most in-flight tokens is skipped, even if it is fastest."""
    policy = make_policy("kvtier")
    req = Request(1600, 16)
    loads = [Load(), Load(), Load(requests=GUARD_MIN_REQUESTS, tokens=9000)]
    cands = _candidates([Hits(0, 0, 0, 0), Hits(0, 0, 0, 0), Hits(100, 0, 0, 0)], loads)
    assert loads[2].tokens > GUARD * sum(load.tokens for load in loads) / len(loads)
    assert policy.pick(req, cands).worker != 2


def test_kvtier_keeps_a_small_burst_of_one_family_on_its_worker() -> None:
    """A few siblings already sent to the worker that holds their prefix (over GUARD x a mean
    the idle workers keep small) do not trip the guard: the next sibling still goes there
    rather than recomputing the prefix elsewhere."""
    policy = make_policy("kvtier")
    req = Request(1600, 16)
    home = Load(requests=GUARD_MIN_REQUESTS - 1, tokens=1400, prefill_s=0.2)
    loads = [Load(), Load(), home]
    cands = _candidates([Hits(0, 0, 0, 0), Hits(0, 0, 0, 0), Hits(90, 0, 0, 0)], loads)
    assert home.tokens > GUARD * sum(load.tokens for load in loads) / len(loads)
    assert policy.pick(req, cands).worker == 2


def test_ties_rotate_so_misses_spread() -> None:
    """With nothing cached anywhere, no worker gets more than its share of misses."""
    for name in ("kvtier", "least-load", "prefix", "round-robin"):
        policy = make_policy(name)
        picks = [
            policy.pick(Request(100, 16), _candidates([Hits(0, 0, 0, 0)] * 4)).worker
            for _ in range(400)
        ]
        assert max(picks.count(i) for i in range(4)) <= 0.4 * len(picks), name


def test_prefix_policy_sticks_to_a_gpu_match_unless_imbalanced() -> None:
    """Best GPU match over half the prompt wins; a large load gap routes by load."""
    policy = make_policy("prefix")
    req = Request(1600, 16)
    assert policy.pick(req, _candidates([Hits(0, 0, 0, 0), Hits(60, 0, 0, 0)])).worker == 1
    assert policy.pick(req, _candidates([Hits(0, 0, 0, 0), Hits(0, 90, 0, 0)])).worker in (0, 1)
    loads = [Load(requests=1), Load(requests=20)]
    assert policy.pick(req, _candidates([Hits(0, 0, 0, 0), Hits(60, 0, 0, 0)], loads)).worker == 0


def test_unknown_policy_is_refused() -> None:
    """A typo in --policy names the choices."""
    with pytest.raises(ValueError, match="round-robin"):
        make_policy("fastest")


def test_events_are_rehashed_into_the_gateways_own_keys() -> None:
    """BlockStored chains (parent by engine hash, salt in extra_keys) land on block_keys()."""
    pool = Pool(["http://a", "http://b"], make_policy("kvtier"), 4, 1000)
    tokens = tokenize("x" * 4 * 12)  # 12 tokens: three blocks of 4
    keys = block_keys(tokens, 4, "salty")
    first = events.BlockStored(
        block_hashes=[b"e1", b"e2"], parent_block_hash=None, token_ids=[int(t) for t in tokens[:8]],
        block_size=4, medium="GPU", extra_keys=[("salty",), None],
    )  # fmt: skip
    second = events.BlockStored(
        block_hashes=[b"e3"], parent_block_hash=b"e2", token_ids=[int(t) for t in tokens[8:12]],
        block_size=4, medium="CPU",
    )  # fmt: skip
    pool.apply_event(1, first)
    pool.apply_event(1, second)
    assert pool.index.match(keys)[1] == Hits(2, 1, 0, 0)
    assert pool.index.match(block_keys(tokens, 4, "other"))[1] == Hits(0, 0, 0, 0)
    pool.apply_event(1, events.BlockRemoved(block_hashes=[b"e2"], medium="GPU"))
    assert pool.index.match(keys)[1].gpu == 1
    orphan = events.BlockStored(
        block_hashes=[b"e9"], parent_block_hash=b"never-seen", token_ids=[1, 2, 3, 4],
        block_size=4, medium="GPU",
    )  # fmt: skip
    pool.apply_event(1, orphan)
    assert pool.stats.events_unchained == 1
    pool.apply_event(1, events.AllBlocksCleared())
    assert pool.index.match(keys)[1] == Hits(0, 0, 0, 0)
    assert chain_keys(root_key("salty"), tokens, 4) == keys


def test_route_books_and_unbooks_load_and_predicts_the_prompt() -> None:
    """A routed request counts on its worker until finished; its blocks are predicted there."""
    pool = Pool(["http://a", "http://b"], make_policy("kvtier"), 16, 1000)
    keys = list(range(100, 110))
    booking = pool.route(keys, 170, 30, None)
    w = pool.workers[booking.worker]
    assert (w.load.requests, w.load.tokens) == (1, 200) and w.load.prefill_s > 0
    again = pool.route(keys, 170, 30, None)
    assert again.worker == booking.worker and again.hits.gpu == 10
    for b in (booking, again):
        pool.finished(b)
        pool.finished(b)  # twice is harmless
    assert (w.load.requests, w.load.tokens) == (0, 0) and w.load.prefill_s == pytest.approx(0)


def test_a_prefix_cache_reset_forgets_the_gpu_tier_only() -> None:
    """AllBlocksCleared (vLLM's reset) leaves kvtier's DRAM entries and the chain map."""
    pool = Pool(["http://a"], make_policy("kvtier"), 4, 1000)
    tokens = [int(t) for t in tokenize("y" * 4 * 8)]
    stored = events.BlockStored(
        block_hashes=[1, 2], parent_block_hash=None, token_ids=tokens, block_size=4, medium="CPU"
    )
    pool.apply_event(0, stored)
    pool.apply_event(0, events.BlockStored([1, 2], None, tokens, 4, medium="GPU"))
    pool.apply_event(0, events.AllBlocksCleared())
    assert pool.index.match(block_keys(tokens, 4))[0] == Hits(0, 2, 0, 0)
    pool.apply_event(0, events.BlockStored([3], 2, tokens[:4], 4, medium="GPU"))
    assert pool.stats.events_unchained == 0


def test_predictions_and_events_are_kept_apart() -> None:
    """A worker's BlockRemoved does not erase what the gateway predicted, and a refused
    request's prediction is withdrawn."""
    pool = Pool(["http://a", "http://b"], make_policy("kvtier"), 16, 1000)
    keys = list(range(1, 11))
    booking = pool.route(keys, 170, 10, None)
    w = booking.worker
    pool.index.add(w, 0, keys)
    pool.index.remove(w, 0, keys)
    assert pool.index.match(keys)[w].gpu == 10
    pool.rejected(booking)
    assert pool.index.match(keys)[w].gpu == 0 and pool.workers[w].load.requests == 0


def test_an_affinity_is_credited_only_to_a_prompt_that_has_its_blocks() -> None:
    """The bound worker's prefix counts only when the prompt's block there is the same."""
    pool = Pool(["http://a", "http://b"], make_policy("kvtier"), 16, 1000)
    keys = list(range(100, 120))
    fits = pool.route(keys, 330, 10, Bound(1, 12, keys[11]))
    assert fits.worker == 1 and fits.hits.gpu == 12
    other = Pool(["http://a", "http://b"], make_policy("kvtier"), 16, 1000)
    stale = other.route(keys, 330, 10, Bound(1, 12, 999))
    assert stale.hits.gpu == 0


def test_a_restarted_worker_resets_the_baseline_instead_of_a_negative_rate() -> None:
    """Counters that went backwards give no sample; the next scrape measures from there."""
    c = Costs()
    c.observe(_metrics(1000, 0, 1.0, {"dram": 500}, {"dram": 0.5}))
    c.observe(_metrics(2000, 0, 2.0, {"dram": 1000}, {"dram": 1.0}))
    before = (c.compute_s(1), c.load_s(DRAM, 1))
    c.observe(_metrics(10, 0, 0.5, {"dram": 700}, {"dram": 0.1}))  # restarted, mixed deltas
    assert (c.compute_s(1), c.load_s(DRAM, 1)) == before
    c.observe(_metrics(110, 0, 0.6, {"dram": 800}, {"dram": 0.2}))
    assert c.compute_s(1) > 0 and c.load_s(DRAM, 1) > 0


def test_a_worker_whose_counters_went_back_loses_its_gpu_entries() -> None:
    """A scrape showing a restart (counters lower than before) clears the worker's GPU
    entries, its DRAM ones kept; another worker's stay."""
    pool = Pool(["http://a", "http://b"], make_policy("kvtier"), 4, 1000)
    tokens = [int(t) for t in tokenize("z" * 4 * 8)]
    for worker in (0, 1):
        pool.apply_event(worker, events.BlockStored([1, 2], None, tokens, 4, medium="GPU"))
    pool.apply_event(0, events.BlockStored([1, 2], None, tokens, 4, medium="CPU"))
    pool.observe_metrics(0, _metrics(1000, 0, 1.0, {}, {}))
    pool.observe_metrics(0, _metrics(2000, 0, 2.0, {}, {}))
    keys = block_keys(tokens, 4)
    assert pool.index.match(keys)[0] == Hits(2, 0, 0, 0)
    pool.observe_metrics(0, _metrics(10, 0, 0.1, {}, {}))  # restarted
    assert pool.index.match(keys)[0] == Hits(0, 2, 0, 0)
    assert pool.index.match(keys)[1] == Hits(2, 0, 0, 0)
    # A restart the events showed already is not cleared again at the next scrape: the
    # blocks the worker stored since stay.
    pool.observe_metrics(1, _metrics(1000, 0, 1.0, {}, {}))
    pool.apply_event(1, events.AllBlocksCleared())
    pool.apply_event(1, events.BlockStored([1, 2], None, tokens, 4, medium="GPU"))
    pool.observe_metrics(1, _metrics(10, 0, 0.1, {}, {}))
    assert pool.index.match(keys)[1] == Hits(2, 0, 0, 0)


def test_shared_and_remote_labels_are_one_tier_counted_once() -> None:
    """A scrape naming the shared tier both ways gives one sample over both."""
    c = Costs()
    c.observe(_metrics(0, 0, 0.0, {"shared": 0, "remote": 0}, {"shared": 0.0, "remote": 0.0}))
    c.observe(_metrics(0, 0, 0.0, {"shared": 100, "remote": 300}, {"shared": 0.1, "remote": 0.3}))
    assert c.load_s(SHARED_TIER, 1) == pytest.approx(1e-3)
