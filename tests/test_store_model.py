"""The Store against a dict model: random save / lookup / load / prefetch / flush / reopen.

Whatever lookup reports loads byte-exact (or raises ChunkMissing naming a correct count);
tiers stay within capacity; with a disk tier larger than all data nothing saved is ever lost,
across close and reopen.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tests.conftest import CHUNK, LAYOUT, prefix_kv

import kvtier
from kvtier.pool import ALIGN
from kvtier.tiers.disk import HEADER_BYTES

CHUNK_BYTES = LAYOUT.chunk_bytes(CHUNK)
DISK_CHUNK = HEADER_BYTES + CHUNK_BYTES
MAX_TOKENS = 6 * CHUNK + 2
_rng = np.random.default_rng(7)
DOCS = [list(_rng.integers(0, 50, MAX_TOKENS)) for _ in range(3)]
DOCS.append(DOCS[0][: 2 * CHUNK] + DOCS[1][2 * CHUNK :])  # shares a head with DOCS[0]

tokens_strategy = st.one_of(
    st.lists(st.integers(0, 1), max_size=MAX_TOKENS),
    st.builds(
        lambda doc, n: [int(t) for t in doc[:n]], st.sampled_from(DOCS), st.integers(0, MAX_TOKENS)
    ),
)


class StoreModel(RuleBasedStateMachine):
    """One store, its model: the set of chunk-aligned prefixes saved (and not reset)."""

    dram_chunks: int | None = 3
    disk_chunks: int | None = None  # None: larger than anything the test saves
    lossless = True
    visible_at_once = True  # a save is found by lookup before it is flushed (DRAM holds it)
    admit_after = 1

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-model-"))
        disk = self.disk_chunks or 4 * 20 * 7
        self.config = kvtier.StoreConfig(
            chunk_tokens=CHUNK,
            dram_bytes=self.dram_chunks * ALIGN if self.dram_chunks else None,
            disk_dir=self.dir,
            disk_bytes=disk * DISK_CHUNK,
            disk_admit_after=self.admit_after,
        )
        self.store = kvtier.Store(self.config)
        self.cache = self.store.bind("m", LAYOUT, salt="t")
        self.saved: set[tuple[int, ...]] = set()
        self.flushed: set[tuple[int, ...]] = set()

    def longest(self, tokens: list[int], saved: set[tuple[int, ...]]) -> int:
        n = 0
        while n + CHUNK <= len(tokens) and tuple(tokens[: n + CHUNK]) in saved:
            n += CHUNK
        return n

    @rule(tokens=tokens_strategy)
    def save(self, tokens: list[int]) -> None:
        self.cache.save(tokens, prefix_kv(tokens))
        for end in range(CHUNK, len(tokens) + 1, CHUNK):
            self.saved.add(tuple(tokens[:end]))

    @rule(tokens=tokens_strategy)
    def lookup_and_load(self, tokens: list[int]) -> None:
        n = self.cache.lookup(tokens)
        expected = self.longest(tokens, self.saved)
        assert n % CHUNK == 0 and n <= expected, (n, expected)
        if self.lossless:
            landed = self.longest(tokens, self.saved if self.visible_at_once else self.flushed)
            assert n >= landed, (n, landed)
        out = np.zeros(LAYOUT.shape(n), LAYOUT.storage_dtype)
        want = prefix_kv(tokens[:n])
        try:
            self.cache.load(tokens[:n], out=out)
        except kvtier.ChunkMissing as exc:
            assert not self.lossless, "a lossless store lost a chunk it reported"
            loaded = exc.loaded_tokens
            assert loaded % CHUNK == 0 and loaded < n and exc.requested_tokens == n
            np.testing.assert_array_equal(out[:, :, :loaded], want[:, :, :loaded])
        else:
            np.testing.assert_array_equal(out, want)

    @rule(tokens=tokens_strategy)
    def prefetch(self, tokens: list[int]) -> None:
        self.cache.prefetch(tokens)

    @rule()
    def flush(self) -> None:
        self.store.flush()
        assert self.store.stats().pending_writes == 0
        self.flushed = set(self.saved)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.flushed = set(self.saved)
        self.store = kvtier.Store(self.config)
        self.cache = self.store.bind("m", LAYOUT, salt="t")

    @invariant()
    def bounded_and_consistent(self) -> None:
        self.store.check_integrity()
        stats = self.store.stats()
        for tier in stats.tiers:
            assert tier.bytes <= tier.capacity_bytes, tier
            assert tier.checksum_failures == 0 and tier.errors == 0, tier
        if self.lossless:
            assert stats.dropped_chunks == 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SmallDiskModel(StoreModel):
    """Both tiers too small: chunks get evicted, but never served wrong."""

    dram_chunks = 4
    disk_chunks = 7
    lossless = False


class DiskOnlyModel(StoreModel):
    """No DRAM tier: saves go through staging to disk and are found once they land."""

    dram_chunks = None
    visible_at_once = False


class AdmissionModel(StoreModel):
    """Disk admission after two uses: chunks used once are dropped from DRAM, never served
    wrong."""

    admit_after = 2
    lossless = False


MODEL_SETTINGS = settings(max_examples=30, stateful_step_count=20, deadline=None)
TestLosslessStore = StoreModel.TestCase
TestLosslessStore.settings = MODEL_SETTINGS
TestSmallDiskStore = SmallDiskModel.TestCase
TestSmallDiskStore.settings = MODEL_SETTINGS
TestDiskOnlyStore = DiskOnlyModel.TestCase
TestDiskOnlyStore.settings = MODEL_SETTINGS
TestAdmissionStore = AdmissionModel.TestCase
TestAdmissionStore.settings = MODEL_SETTINGS
