"""Many threads on one Store: only ChunkMissing may surface, every load is byte-exact."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import CHUNK, LAYOUT, make_config, prefix_kv

import kvtier
from kvtier.pool import ALIGN
from kvtier.tiers.disk import HEADER_BYTES

THREADS = 8
OPS_PER_THREAD = 120
DISK_CHUNK = HEADER_BYTES + LAYOUT.chunk_bytes(CHUNK)
_rng = np.random.default_rng(11)
HEADS = [[int(t) for t in _rng.integers(0, 100, 8 * CHUNK)] for _ in range(4)]


def run_threads(work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return errors


def worker(cache: kvtier.BoundCache, seed: int) -> int:
    """Random save / lookup / load / prefetch on overlapping prefixes; returns loads checked."""
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(OPS_PER_THREAD):
        head = HEADS[int(rng.integers(len(HEADS)))]
        tokens = head[: int(rng.integers(CHUNK, len(head) + 1))]
        if rng.random() < 0.3:
            tokens = tokens + [int(rng.integers(100))] * CHUNK  # a private tail
        op = rng.random()
        if op < 0.4:
            cache.save(tokens, prefix_kv(tokens))
        elif op < 0.9:
            n = cache.lookup(tokens)
            out = np.zeros(LAYOUT.shape(n), LAYOUT.storage_dtype)
            try:
                cache.load(tokens[:n], out=out)
                checked += 1
                loaded = n
            except kvtier.ChunkMissing as exc:
                loaded = exc.loaded_tokens
            np.testing.assert_array_equal(out[:, :, :loaded], prefix_kv(tokens[:loaded]))
        else:
            cache.prefetch(tokens)
    return checked


@pytest.mark.parametrize(
    "tiers",
    [
        {"dram_bytes": 6 * ALIGN, "disk_bytes": 30 * DISK_CHUNK},
        {"dram_bytes": 6 * ALIGN, "disk_dir": None, "disk_bytes": None},
        {"dram_bytes": None, "disk_bytes": 20 * DISK_CHUNK},
    ],
    ids=["dram+disk", "dram", "disk"],
)
def test_threads_share_a_store(tmp_path: Path, tiers: dict[str, object]) -> None:
    """8 threads saving, looking up, loading and prefetching overlapping prefixes: no error
    but ChunkMissing, exact data, bounded tiers, a consistent store."""
    with kvtier.Store(make_config(tmp_path, **tiers)) as store:
        cache = store.bind("m", LAYOUT)
        checked: list[int] = []
        errors = run_threads(lambda i: checked.append(worker(cache, i)))
        assert not errors, errors[:3]
        assert sum(checked) > 0
        store.flush()
        store.check_integrity()
        for tier in store.stats().tiers:
            assert tier.bytes <= tier.capacity_bytes
            assert tier.checksum_failures == tier.errors == 0


def test_held_chunk_survives_concurrent_eviction(tmp_path: Path) -> None:
    """A chunk acquired by a reader keeps its bytes while other threads churn the DRAM tier."""
    config = make_config(tmp_path, dram_bytes=4 * ALIGN, disk_dir=None, disk_bytes=None)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        tokens = HEADS[0][:CHUNK]
        cache.save(tokens, prefix_kv(tokens))
        key = cache.keys(tokens)[0]
        held = store.acquire_chunk(key, cache.chunk_bytes)
        assert held is not None
        want = prefix_kv(tokens).tobytes()
        churn = [[1000 + i] * CHUNK for i in range(40)]
        errors = run_threads(
            lambda i: [cache.save(t, prefix_kv(t)) for t in churn[i::THREADS]] and None
        )
        assert not errors
        assert bytes(held.view) == want
        assert store.stats().tier("dram").evictions > 0
        store.release_chunk(key)
        del held
        store.check_integrity()
