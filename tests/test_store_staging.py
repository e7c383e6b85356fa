"""A store without a DRAM tier stages saves in a pool sized to its chunks, not a fixed one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import kvtier

# 8 layers x 2 x 128 tokens x 8 heads x 64 x 2 bytes = 2 MiB a chunk
LAYOUT = kvtier.KVLayout(num_layers=8, num_kv_heads=8, head_dim=64, dtype="float16")
CHUNK_TOKENS = 128
CHUNKS = 8


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


def test_store_without_dram_stays_small_and_saves_large_chunks(tmp_path: Path) -> None:
    """With dram_bytes=None, resident memory grows by far less than the old 256 MiB staging
    pool (it is sized to a few chunks in flight), and 2 MiB chunks still save and load."""
    tokens = list(range(CHUNKS * CHUNK_TOKENS))
    kv = np.random.default_rng(0).standard_normal(LAYOUT.shape(len(tokens)))
    kv = kv.astype(LAYOUT.storage_dtype)  # (L, 2, T, H, D), faulted in before measuring
    config = kvtier.StoreConfig(
        chunk_tokens=CHUNK_TOKENS, dram_bytes=None, disk_dir=tmp_path, disk_bytes=64 << 20
    )
    before = _rss_bytes()
    with kvtier.Store(config) as store:
        store.warm()
        cache = store.bind("m", LAYOUT)
        store.warm()
        cache.save(tokens, kv)
        store.flush()
        grown = _rss_bytes() - before
        assert grown < 96 << 20, f"resident memory grew by {grown >> 20} MiB"
        assert cache.lookup(tokens) == len(tokens)
        np.testing.assert_array_equal(cache.load(tokens), kv)


def test_staging_grows_for_a_larger_chunk(tmp_path: Path) -> None:
    """A chunk larger than any bound so far (a second layout, or a key-level write without
    bind, as the cache server does) grows the staging pool and is stored byte-exact."""
    config = kvtier.StoreConfig(
        chunk_tokens=CHUNK_TOKENS, dram_bytes=None, disk_dir=tmp_path, disk_bytes=64 << 20
    )
    small = kvtier.KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16")
    with kvtier.Store(config) as store:
        first = store.bind("small", small)
        tokens = list(range(CHUNK_TOKENS))
        first.save(tokens, np.ones(small.shape(CHUNK_TOKENS), small.storage_dtype))
        payload = np.arange(3 << 20, dtype=np.uint8)  # larger than anything bound
        key = bytes(range(16))
        store.write_chunk(key, [memoryview(payload)])
        second = store.bind("m", LAYOUT)
        kv = np.full(LAYOUT.shape(CHUNK_TOKENS), 7, LAYOUT.storage_dtype)
        second.save(tokens, kv)
        store.flush()
        out = np.zeros_like(payload)
        assert store.read_chunk(key, [memoryview(out)]) == "disk"
        np.testing.assert_array_equal(out, payload)
        np.testing.assert_array_equal(second.load(tokens), kv)
        assert first.lookup(tokens) == CHUNK_TOKENS
