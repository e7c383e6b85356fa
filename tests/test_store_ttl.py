"""TTL per bound cache (`store.bind(..., ttl_s=...)`): expired chunks are misses, their space
is reclaimed and counted, the expiry survives a restart of the disk tier, pins win."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
from tests.conftest import CHUNK, LAYOUT, make_config, make_kv

import kvtier
import kvtier.tiers.disk as disk_module
import kvtier.tiers.dram as dram_module
from kvtier import expiry
from kvtier.expiry import RECORD
from kvtier.journal import FRAME
from kvtier.tiers.disk import HEADER, HEADER_BYTES, parse_header

SHORT_S = 0.3  # expired after a sleep of EXPIRED_S; never asserted on the other side
EXPIRED_S = 0.5
LONG_S = 3600.0
PAGE = 4096


def toks(seed: int, chunks: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 1000, chunks * CHUNK)]


class Clock:
    """The wall clock expiries are read on, moved by hand."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    for module in (expiry, dram_module, disk_module):
        monkeypatch.setattr(module, "now_ns", fake)
    return fake


def test_expired_chunks_are_misses_reclaimed_and_counted(tmp_path: Path) -> None:
    """Past its TTL a prefix is a miss in lookup and load, in DRAM and on disk; its bytes are
    freed and `expired` counts it; a cache without a TTL and a long TTL keep theirs."""
    with kvtier.Store(make_config(tmp_path)) as store:
        short = store.bind("m", LAYOUT, ttl_s=SHORT_S)
        plain, long = store.bind("m", LAYOUT), store.bind("m", LAYOUT, ttl_s=LONG_S)
        a, b, c = toks(1, 2), toks(2, 2), toks(3, 2)
        kv = make_kv(len(a))
        short.save(a, kv)
        plain.save(b, kv)
        long.save(c, kv)
        store.flush()
        before = store.stats()
        time.sleep(EXPIRED_S)
        assert plain.lookup(a) == 0  # any cache bound to the model sees it expired
        with pytest.raises(kvtier.ChunkMissing):
            short.load(a)
        assert short.lookup(b) == len(b) and short.lookup(c) == len(c)
        np.testing.assert_array_equal(long.load(c), kv)
        after = store.stats()
        for tier in ("dram", "disk"):
            assert after.tier(tier).expired == 2
            assert after.tier(tier).chunks == before.tier(tier).chunks - 2
            assert after.tier(tier).bytes < before.tier(tier).bytes
        store.check_integrity()


def test_expired_chunks_go_before_live_ones_are_evicted(tmp_path: Path) -> None:
    """When room is needed, chunks past their TTL are reclaimed first: a full DRAM tier of
    expired chunks takes new saves without evicting the live ones."""
    config = make_config(tmp_path, dram_bytes=16 * PAGE, disk_dir=None, disk_bytes=None)
    with kvtier.Store(config) as store:
        short, plain = store.bind("m", LAYOUT, ttl_s=SHORT_S), store.bind("m", LAYOUT)
        live = toks(1, 4)
        plain.save(live, make_kv(len(live)))
        for i in range(6):
            doc = toks(10 + i, 2)
            short.save(doc, make_kv(len(doc)))
        time.sleep(EXPIRED_S)
        for i in range(6):
            doc = toks(100 + i, 2)
            plain.save(doc, make_kv(len(doc)))
        dram = store.stats().tier("dram")
        assert (dram.expired, dram.evictions) == (12, 0)
        assert plain.lookup(live) == len(live)
        store.check_integrity()


def test_ttl_survives_a_restart(tmp_path: Path) -> None:
    """The disk tier keeps each chunk's expiry: after a restart an expired chunk is a miss
    (and is deleted), one with a long TTL is still found and keeps its expiry in DRAM."""
    config = make_config(tmp_path)
    soon, later = toks(1, 2), toks(2, 2)
    with kvtier.Store(config) as store:
        store.bind("m", LAYOUT, ttl_s=SHORT_S).save(soon, make_kv(len(soon)))
        store.bind("m", LAYOUT, ttl_s=LONG_S).save(later, make_kv(len(later)))
        key = store.bind("m", LAYOUT).keys(later)[0]
    path = tmp_path / "disk" / "kvtier-v1" / key.hex()[:2] / f"{key.hex()}.kv"
    expiry = parse_header(path.read_bytes()[:HEADER_BYTES])
    assert expiry is not None and expiry.expires_ns > time.time_ns() + 3000e9
    time.sleep(EXPIRED_S)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        assert cache.lookup(soon) == 0
        assert store.stats().tier("disk").expired == 1  # the lookup stops at the first
        np.testing.assert_array_equal(cache.load(later), make_kv(len(later)))
        assert store._dram is not None and store._dram.expires_ns(key) == expiry.expires_ns
        store.check_integrity()


def test_the_header_is_the_truth_without_the_journal(tmp_path: Path) -> None:
    """With the expiry journal lost, an expired chunk found on disk is still never served:
    its header's expiry makes the load a miss and deletes it."""
    config = make_config(tmp_path, dram_bytes=None)
    doc = toks(1, 1)
    with kvtier.Store(config) as store:
        store.bind("m", LAYOUT, ttl_s=SHORT_S).save(doc, make_kv(len(doc)))
    (tmp_path / "disk" / "kvtier-v1" / "expiry").unlink()
    time.sleep(EXPIRED_S)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        assert cache.lookup(doc) == CHUNK  # not known to expire until its header is read
        with pytest.raises(kvtier.ChunkMissing):
            cache.load(doc)
        assert cache.lookup(doc) == 0
        assert store.stats().tier("disk").expired == 1


def test_a_chunk_promoted_without_its_journal_record_keeps_its_expiry(
    tmp_path: Path, clock: Clock
) -> None:
    """With the expiry journal lost, a chunk loaded from disk before its TTL takes its
    header's expiry into DRAM: past it, the DRAM copy is a miss too."""
    config = make_config(tmp_path)
    doc = toks(1, 2)
    kv = make_kv(len(doc))
    with kvtier.Store(config) as store:
        store.bind("m", LAYOUT, ttl_s=60).save(doc, kv)
    (tmp_path / "disk" / "kvtier-v1" / "expiry").unlink()
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        np.testing.assert_array_equal(cache.load(doc), kv)  # promoted into DRAM
        assert store.stats().tier("dram").chunks == 2
        clock.now += 120 * 10**9
        assert cache.lookup(doc) == 0
        with pytest.raises(kvtier.ChunkMissing):
            cache.load(doc)
        assert store.stats().tier("dram").expired == 2
        store.check_integrity()


def test_files_without_an_expiry_never_expire(tmp_path: Path) -> None:
    """A chunk file whose header has no expiry (0, as every file written before TTLs) is
    served whatever the journal says."""
    config = make_config(tmp_path, dram_bytes=None)
    doc = toks(1, 1)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(doc, make_kv(len(doc)))
        key = cache.keys(doc)[0]
    path = tmp_path / "disk" / "kvtier-v1" / key.hex()[:2] / f"{key.hex()}.kv"
    assert HEADER.unpack_from(path.read_bytes())[-1] == 0
    record = RECORD.pack(key, 1)  # a journal claiming it expired at 1 ns past the epoch
    frame = FRAME.pack(len(record), xxhash.xxh3_64_intdigest(record)) + record
    (tmp_path / "disk" / "kvtier-v1" / "expiry").write_bytes(frame)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        np.testing.assert_array_equal(cache.load(doc), make_kv(len(doc)))
        assert store.stats().tier("disk").expired == 0


def test_a_pin_wins_over_the_ttl(tmp_path: Path) -> None:
    """A pinned chunk past its TTL is still served (DRAM and disk, also after a restart);
    unpinning it makes it expire at once."""
    config = make_config(tmp_path)
    doc = toks(1, 2)
    kv = make_kv(len(doc))
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT, ttl_s=SHORT_S)
        cache.save(doc, kv)
        cache.pin(doc)
        time.sleep(EXPIRED_S)
        np.testing.assert_array_equal(cache.load(doc), kv)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        np.testing.assert_array_equal(cache.load(doc), kv)
        assert cache.unpin(doc) == len(doc)
        assert cache.lookup(doc) == 0
        stats = store.stats()
        assert stats.tier("dram").expired == 2 and stats.tier("disk").expired == 2
        store.check_integrity()


@pytest.mark.parametrize("ttl_s", [0, -1.0, True, "60"])
def test_bad_ttl_is_a_config_error(tmp_path: Path, ttl_s: object) -> None:
    """ttl_s must be a positive number of seconds."""
    with kvtier.Store(make_config(tmp_path)) as store, pytest.raises(kvtier.ConfigError):
        store.bind("m", LAYOUT, ttl_s=ttl_s)  # type: ignore[arg-type]


def test_ttl_with_a_remote_tier_is_refused(tmp_path: Path) -> None:
    """A store with a remote tier refuses a TTL (the shared tier would keep the chunks past
    it) with a message saying what to do."""
    config = make_config(tmp_path, remote="kvtier://127.0.0.1:9")  # nothing listens there
    with kvtier.Store(config) as store:
        with pytest.raises(kvtier.ConfigError, match="without remote="):
            store.bind("m", LAYOUT, ttl_s=60)
        store.bind("m", LAYOUT)
