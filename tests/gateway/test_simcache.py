"""The worker-sim cache model: prefix lookup across tiers, LRU eviction, and KV events that
a subscriber can replay and rehash into exactly the tiers' contents."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.gateway.events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_SHARED,
    BlockRemoved,
    BlockStored,
    Event,
    salt_of,
)
from kvtier.gateway.simcache import CacheHit, SharedTier, SimCache
from kvtier.gateway.tokens import block_keys, chain_keys, root_key, tokenize

BT = 4  # tokens per block in these tests


def prompt(text: str) -> np.ndarray:
    return tokenize(text)


def admit(cache: SimCache, text: str, salt: str = "") -> tuple[list[int], list[Event]]:
    tokens = prompt(text)
    keys = block_keys(tokens, BT, salt)
    return keys, cache.admit(keys, tokens, salt)


def of(events: list[Event], kind: type, medium: str) -> list[Event]:
    return [e for e in events if isinstance(e, kind) and getattr(e, "medium", None) == medium]


def test_second_lookup_hits_every_full_block_on_gpu() -> None:
    """After admitting a prompt, a lookup of it finds all its full blocks on GPU."""
    cache = SimCache(gpu_blocks=64, block_tokens=BT)
    keys, _ = admit(cache, "x" * 70)  # 18 tokens: 4 full blocks and a tail
    assert len(keys) == 4
    assert cache.lookup(keys) == CacheHit(4, 0, 0)
    assert cache.lookup(block_keys(prompt("x" * 70), BT, "other")) == CacheHit(0, 0, 0)


def test_stored_events_rehash_to_the_keys() -> None:
    """BlockStored token ids rehashed from root_key(salt) or the parent give block_hashes."""
    cache = SimCache(gpu_blocks=64, block_tokens=BT)
    for salt in ("", "tenant-a"):
        cache.gpu.clear()
        keys, events = admit(cache, "shared head " * 4, salt)
        (stored,) = events
        assert isinstance(stored, BlockStored) and stored.medium == MEDIUM_GPU
        assert stored.parent_block_hash is None and stored.block_hashes == keys
        assert chain_keys(root_key(salt), stored.token_ids, stored.block_size) == keys
        assert salt_of(stored) == salt
        assert stored.extra_keys == (None if not salt else [(salt,)] + [None] * (len(keys) - 1))
        longer, more = admit(cache, "shared head " * 4 + "and a new tail!!", salt)
        (tail,) = more
        assert isinstance(tail, BlockStored) and tail.parent_block_hash == keys[-1]
        assert tail.extra_keys is None
        parent = tail.parent_block_hash
        assert isinstance(parent, int)
        assert chain_keys(parent, tail.token_ids, BT) == longer[len(keys) :]


def test_lru_evicts_the_oldest_blocks_with_block_removed() -> None:
    """At capacity the least recently used blocks go, reported as GPU BlockRemoved."""
    cache = SimCache(gpu_blocks=4, block_tokens=BT)
    a, _ = admit(cache, "a" * 48)  # 3 blocks
    b, events = admit(cache, "b" * 48)  # 3 more: two of a's must go
    removed = of(events, BlockRemoved, MEDIUM_GPU)
    assert [k for e in removed for k in e.block_hashes] == a[:2]  # type: ignore[attr-defined]
    assert cache.lookup(a) == CacheHit(0, 0, 0)
    assert cache.lookup(b) == CacheHit(3, 0, 0)
    cache.gpu.check_integrity()


def test_dram_tier_serves_blocks_evicted_from_gpu() -> None:
    """With a DRAM tier, blocks evicted from GPU come back from DRAM (stored there as CPU)."""
    cache = SimCache(gpu_blocks=3, block_tokens=BT, dram_blocks=32)
    a, events = admit(cache, "a" * 48)
    assert len(of(events, BlockStored, MEDIUM_CPU)) == 1
    admit(cache, "b" * 48)
    assert cache.lookup(a) == CacheHit(0, 3, 0)
    head = block_keys(prompt("b" * 32 + "a" * 16), BT)
    assert cache.lookup(head)[:1] == (2,)


def test_shared_tier_serves_every_worker() -> None:
    """A block one worker admitted is a shared hit for another worker over the same tier."""
    shared = SharedTier(64)
    one = SimCache(gpu_blocks=16, block_tokens=BT, shared=shared)
    two = SimCache(gpu_blocks=16, block_tokens=BT, shared=shared)
    keys, events = admit(one, "s" * 40)
    assert len(of(events, BlockStored, MEDIUM_SHARED)) == 1
    assert two.lookup(keys) == CacheHit(0, 0, len(keys))


def test_lookup_takes_each_block_from_dram_or_shared_and_stops_at_a_miss() -> None:
    """After the GPU prefix, each block comes from DRAM or else shared; a miss ends it."""
    shared = SharedTier(64)
    cache = SimCache(gpu_blocks=2, block_tokens=BT, dram_blocks=2, shared=shared)
    keys, _ = admit(cache, "p" * 64)  # 4 blocks: GPU and DRAM keep the last two
    assert cache.lookup(keys) == CacheHit(0, 2, 2)  # blocks 0-1 from shared, 2-3 from DRAM
    admit(cache, "p" * 32)  # the first two again: on GPU and in DRAM now
    assert cache.lookup(keys) == CacheHit(2, 0, 2)
    assert cache.lookup([*keys[:2], 12345, keys[3]]) == CacheHit(2, 0, 0)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 40), st.sampled_from(["", "s"])),
        max_size=25,
    ),
    st.integers(1, 6),
    st.integers(1, 8),
)
def test_replayed_events_match_every_tier(
    requests: list[tuple[int, int, str]], gpu_blocks: int, dram_blocks: int
) -> None:
    """Replaying the events of any admit sequence into per-medium sets, rehashing every
    stored run, gives exactly the keys each tier holds."""
    shared = SharedTier(5)
    cache = SimCache(gpu_blocks, BT, dram_blocks, shared)
    model: dict[str | None, set[int | bytes]] = {MEDIUM_GPU: set(), MEDIUM_CPU: set()}
    model[MEDIUM_SHARED] = set()
    for head, length, salt in requests:
        _, events = admit(cache, "abcd"[head] * 8 + "z" * length, salt)
        for event in events:
            if isinstance(event, BlockStored):
                parent = event.parent_block_hash
                seed = root_key(salt_of(event)) if parent is None else parent
                assert isinstance(seed, int)
                assert chain_keys(seed, event.token_ids, BT) == event.block_hashes
                assert not model[event.medium] & set(event.block_hashes)
                model[event.medium] |= set(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= model[event.medium]
                model[event.medium] -= set(event.block_hashes)
    assert model[MEDIUM_GPU] == set(cache.gpu.keys())
    assert cache.dram is not None and model[MEDIUM_CPU] == set(cache.dram.keys())
    assert model[MEDIUM_SHARED] == set(shared.keys())
    for tier in (cache.gpu, cache.dram, shared):
        tier.check_integrity()
