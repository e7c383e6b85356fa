"""Store behaviour: round trips, tiers, promotion, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvtier
from tests.conftest import CHUNK, LAYOUT, make_config, make_kv


def test_round_trip_dram(store: kvtier.Store) -> None:
    """Saved full chunks are found by lookup and loaded byte-exact."""
    cache = store.bind("m", LAYOUT)
    tokens = list(range(3 * CHUNK + 2))
    kv = make_kv(len(tokens))
    cache.save(tokens, kv)
    n = cache.lookup(tokens)
    assert n == 3 * CHUNK
    np.testing.assert_array_equal(cache.load(tokens[:n]), kv[:, :, :n])


def test_reopen_hits_disk(tmp_path: Path) -> None:
    """After close and reopen, chunks are served from disk and promoted to DRAM."""
    tokens = list(range(2 * CHUNK))
    kv = make_kv(len(tokens))
    with kvtier.Store(make_config(tmp_path)) as s:
        s.bind("m", LAYOUT).save(tokens, kv)
    with kvtier.Store(make_config(tmp_path)) as s:
        cache = s.bind("m", LAYOUT)
        assert cache.locate(tokens).tiers == ("disk", "disk")
        np.testing.assert_array_equal(cache.load(tokens), kv)
        assert cache.locate(tokens).tiers == ("dram", "dram")


def test_load_rejects_partial_chunk(store: kvtier.Store) -> None:
    """Loading a length that is not a multiple of chunk_tokens is a clear ValueError."""
    with pytest.raises(ValueError, match="multiple of chunk_tokens"):
        store.bind("m", LAYOUT).load(list(range(CHUNK + 1)))
