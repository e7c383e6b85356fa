"""Pins against a model: random save / pin / unpin / lookup / reopen on tiers too small for
what is saved. Whatever a pin returned stays found and loads byte-exact until unpinned,
across reopen; unpin reports the longest pinned prefix it removed; pinned bytes stay within
each tier's bound."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from tests.conftest import CHUNK, prefix_kv
from tests.test_store_model import SmallDiskModel, tokens_strategy

import kvtier


class PinnedModel(SmallDiskModel):
    """DRAM 4 chunks, disk 7 (3.5 pinnable); the model: the pinned prefixes (as tuples)."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned: set[tuple[int, ...]] = set()

    @rule(tokens=tokens_strategy)
    def pin(self, tokens: list[int]) -> None:
        self.pin_tokens(tokens)

    @rule(index=st.integers(0, 1000), extra=st.integers(0, CHUNK + 1))
    def pin_saved(self, index: int, extra: int) -> None:
        """Pin (and extend by a little) one of the prefixes saved so far."""
        if self.saved:
            saved = sorted(self.saved)
            self.pin_tokens([*saved[index % len(saved)], *([1] * extra)])

    def pin_tokens(self, tokens: list[int]) -> None:
        try:
            n = self.cache.pin(tokens)
        except kvtier.PinRefused:
            return
        assert n % CHUNK == 0 and n <= len(tokens)
        if n:
            self.pinned.add(tuple(tokens[:n]))

    @rule(tokens=tokens_strategy)
    def unpin(self, tokens: list[int]) -> None:
        gone = {p for p in self.pinned if tuple(tokens[: len(p)]) == p}
        assert self.cache.unpin(tokens) == max([0, *(len(p) for p in gone)])
        self.pinned -= gone

    @invariant()
    def pinned_prefixes_stay(self) -> None:
        for prefix in self.pinned:
            tokens = list(prefix)
            assert self.cache.lookup(tokens) == len(tokens), "a pinned prefix was lost"
            np.testing.assert_array_equal(self.cache.load(tokens), prefix_kv(tokens))
        for tier in self.store.stats().tiers:
            assert tier.pinned_bytes <= tier.capacity_bytes // 2, tier


TestPinnedStore = PinnedModel.TestCase
TestPinnedStore.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
