"""Store behaviour: round trips, tiers, promotion, persistence."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import CHUNK, LAYOUT, make_config, make_kv, prefix_kv

import kvtier
from kvtier.errors import StoreClosed


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


def _saved(store: kvtier.Store, chunks: int) -> tuple[kvtier.BoundCache, list[int], np.ndarray]:
    cache = store.bind("m", LAYOUT)
    tokens = list(range(chunks * CHUNK))
    kv = make_kv(len(tokens))
    cache.save(tokens, kv)
    return cache, tokens, kv


def test_load_into_out_in_place(store: kvtier.Store) -> None:
    """load(out=buf) fills the caller's contiguous array in place and returns it."""
    cache, tokens, kv = _saved(store, 2)
    buf = np.zeros_like(kv)
    assert cache.load(tokens, out=buf) is buf
    np.testing.assert_array_equal(buf, kv)


@pytest.mark.parametrize("kind", ["strided", "transposed", "sliced_tokens"])
def test_load_into_non_contiguous_out(store: kvtier.Store, kind: str) -> None:
    """load(out=view) fills a non-contiguous view byte-exact and leaves the rest untouched."""
    cache, tokens, kv = _saved(store, 2)
    L, _, T, H, D = kv.shape
    if kind == "strided":
        base = np.zeros((L, 2, T, H, 2 * D), kv.dtype)
        out = base[..., ::2]
    elif kind == "transposed":
        base = np.zeros((L, 2, H, T, D), kv.dtype)
        out = base.transpose(0, 1, 3, 2, 4)
    else:
        base = np.zeros((L, 2, T + 3, H, D), kv.dtype)
        out = base[:, :, 1 : T + 1]
    assert not out.flags.c_contiguous
    cache.load(tokens, out=out)
    np.testing.assert_array_equal(out, kv)
    assert np.count_nonzero(base) == np.count_nonzero(kv)


def test_long_prefix_keeps_its_head_in_small_dram(tmp_path: Path) -> None:
    """A prefix longer than a DRAM-only store keeps its head chunks; later saves evict tails."""
    config = make_config(tmp_path, dram_bytes=3 * 4096, disk_dir=None, disk_bytes=None)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(6 * CHUNK))
        kv = make_kv(len(tokens))
        cache.save(tokens, kv)
        assert cache.lookup(tokens) == 3 * CHUNK
        np.testing.assert_array_equal(cache.load(tokens[: 3 * CHUNK]), kv[:, :, : 3 * CHUNK])
        other = [7] * CHUNK
        cache.save(other, make_kv(CHUNK, seed=1))
        assert cache.lookup(other) == CHUNK
        assert cache.lookup(tokens) == 2 * CHUNK
        assert store.stats().tier("dram").bytes <= store.stats().tier("dram").capacity_bytes
        store.check_integrity()


def test_close_while_a_view_is_held(tmp_path: Path) -> None:
    """close() with an acquired chunk view still alive succeeds and releases the disk dir."""
    store = kvtier.Store(make_config(tmp_path))
    cache, tokens, kv = _saved(store, 1)
    store.flush()
    held = store.acquire_chunk(cache.keys(tokens)[0], cache.chunk_bytes)
    assert held is not None
    assert bytes(held.view) == kv.tobytes()
    store.close()
    with kvtier.Store(make_config(tmp_path)) as again:
        assert again.bind("m", LAYOUT).lookup(tokens) == CHUNK
    del held


def test_delete_chunk_removes_from_every_local_tier(store: kvtier.Store) -> None:
    """delete_chunk drops a chunk from DRAM and disk: lookup stops before it, reopen too."""
    cache = store.bind("m", LAYOUT)
    tokens = list(range(3 * CHUNK))
    cache.save(tokens, make_kv(len(tokens)))
    store.flush()
    assert store.delete_chunk(cache.keys(tokens)[1])
    assert cache.lookup(tokens) == CHUNK
    assert not store.delete_chunk(cache.keys(tokens)[1])
    store.check_integrity()


def test_delete_while_pinned_frees_after_release(store: kvtier.Store) -> None:
    """A chunk deleted under a reader stays readable to it and is freed on release."""
    cache = store.bind("m", LAYOUT)
    tokens = list(range(CHUNK))
    kv = make_kv(CHUNK)
    cache.save(tokens, kv)
    store.flush()
    key = cache.keys(tokens)[0]
    held = store.acquire_chunk(key, cache.chunk_bytes)
    assert held is not None
    assert store.delete_chunk(key)
    assert cache.lookup(tokens) == 0
    assert bytes(held.view) == kv.tobytes()
    store.release_chunk(key)
    assert store.stats().tier("dram").chunks == 0
    store.check_integrity()


@pytest.mark.parametrize("dram_only", [False, True])
def test_resave_after_delete_under_a_reader(tmp_path: Path, dram_only: bool) -> None:
    """A chunk deleted while a reader holds it and then saved again is stored (not skipped as
    already present): the new bytes load, the reader keeps the old ones until it releases."""
    extra = {"disk_dir": None, "disk_bytes": None} if dram_only else {}
    with kvtier.Store(make_config(tmp_path, **extra)) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(CHUNK))
        old, new = make_kv(CHUNK, seed=1), make_kv(CHUNK, seed=2)
        cache.save(tokens, old)
        store.flush()
        key = cache.keys(tokens)[0]
        held = store.acquire_chunk(key, cache.chunk_bytes)
        assert held is not None
        assert store.delete_chunk(key)
        cache.save(tokens, new)
        store.flush()
        assert cache.lookup(tokens) == CHUNK
        np.testing.assert_array_equal(cache.load(tokens), new)
        assert bytes(held.view) == old.tobytes()
        store.release_chunk(key)
        np.testing.assert_array_equal(cache.load(tokens), new)
        store.check_integrity()


def test_use_after_close_is_a_clear_error(tmp_path: Path) -> None:
    """Every call on a closed store raises StoreClosed; close is idempotent."""
    store = kvtier.Store(make_config(tmp_path))
    cache, tokens, kv = _saved(store, 1)
    store.close()
    store.close()
    for call in (
        lambda: cache.lookup(tokens),
        lambda: cache.load(tokens),
        lambda: cache.save(tokens, kv),
        lambda: cache.prefetch(tokens),
    ):
        with pytest.raises(StoreClosed, match="closed; create a new one"):
            call()


def test_two_stores_on_one_disk_dir(tmp_path: Path) -> None:
    """A second store on a disk_dir in use is refused with a clear error."""
    first = kvtier.Store(make_config(tmp_path))
    with pytest.raises(kvtier.ConfigError, match="in use by another kvtier store"):
        kvtier.Store(make_config(tmp_path))
    first.close()
    kvtier.Store(make_config(tmp_path)).close()


def test_bad_remote_url_in_store_config(tmp_path: Path) -> None:
    """A bad remote URL fails at config time, saying what a good one looks like."""
    with pytest.raises(kvtier.KvtierError, match=r"kvtier://host:port"):
        make_config(tmp_path, remote="kvtier://h:99999")


def test_demoted_chunks_load_from_disk(tmp_path: Path) -> None:
    """With DRAM far smaller than the data, every saved prefix still loads (from disk)."""
    config = make_config(tmp_path, dram_bytes=3 * 4096)
    prefixes = [[i] * (3 * CHUNK) for i in range(8)]
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        for tokens in prefixes:
            cache.save(tokens, prefix_kv(tokens))
        store.flush()
        assert store.stats().tier("dram").evictions > 0
        assert store.stats().dropped_chunks == 0
        for tokens in prefixes:
            assert cache.lookup(tokens) == len(tokens)
            np.testing.assert_array_equal(cache.load(tokens), prefix_kv(tokens))
        assert store.stats().tier("disk").hits > 0
        store.check_integrity()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 8)), min_size=1, max_size=25))
def test_tiers_never_exceed_capacity(saves: list[tuple[int, int]]) -> None:
    """Random saves keep DRAM within its bytes and disk within its bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(Path(tmp), dram_bytes=5 * 4096, disk_bytes=9 * (4096 + 512))
        with kvtier.Store(config) as store:
            cache = store.bind("m", LAYOUT)
            for first, chunks in saves:
                tokens = [first] + [first + 1] * (chunks * CHUNK - 1)
                cache.save(tokens, prefix_kv(tokens))
                for tier in store.stats().tiers:
                    assert tier.bytes <= tier.capacity_bytes, tier
            store.flush()
            store.check_integrity()


def test_a_chunk_larger_than_dram_is_refused_at_bind(tmp_path: Path) -> None:
    """Binding a layout whose chunk cannot fit in the DRAM tier is a clear ConfigError."""
    big = kvtier.KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, dtype="float16")
    with (
        kvtier.Store(make_config(tmp_path, dram_bytes=64 << 10)) as s,
        pytest.raises(kvtier.ConfigError, match="raise dram_bytes or lower chunk_tokens"),
    ):
        s.bind("m", big)


def test_prefetch_of_an_unknown_prefix_evicts_nothing(tmp_path: Path) -> None:
    """Promotion asks the lower tier first: a miss there never evicts a DRAM chunk."""
    one_chunk = LAYOUT.chunk_bytes(CHUNK)
    with kvtier.Store(make_config(tmp_path, dram_bytes=max(one_chunk, 4096))) as s:
        cache = s.bind("m", LAYOUT)
        cache.save(list(range(CHUNK)), make_kv(CHUNK))
        s.flush()
        cache.prefetch([7] * (3 * CHUNK))
        s.flush()
        dram = s.stats().tier("dram")
        assert dram.chunks == 1 and dram.evictions == 0


def test_save_after_close_is_refused(tmp_path: Path) -> None:
    """A store used after close() raises StoreClosed, and close() stays idempotent."""
    s = kvtier.Store(make_config(tmp_path))
    cache = s.bind("m", LAYOUT)
    s.close()
    with pytest.raises(kvtier.KvtierError, match="closed"):
        cache.save(list(range(CHUNK)), make_kv(CHUNK))
    s.close()


def test_delete_right_after_save_stays_deleted(store: kvtier.Store) -> None:
    """A delete issued while the chunk's disk write is still pending wins: after flush and a
    reopen-free lookup the chunk is gone from every tier."""
    cache = store.bind("m", LAYOUT)
    for round_ in range(20):
        tokens = [round_] * CHUNK
        cache.save(tokens, make_kv(CHUNK, seed=round_))
        assert store.delete_chunk(cache.keys(tokens)[0])
        store.flush()
        assert cache.lookup(tokens) == 0
    store.check_integrity()
