"""Disk admission: with disk_admit_after=2 a chunk reaches the disk only on its second use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import CHUNK, LAYOUT, make_config, make_kv

import kvtier
from kvtier.admission import AdmitAfter, AdmitAll, disk_admission

DRAM_CHUNKS = 2  # every chunk takes one 4 KiB page of DRAM


def _store(tmp_path: Path, admit_after: int, **overrides: object) -> kvtier.Store:
    values: dict[str, object] = {"dram_bytes": DRAM_CHUNKS * 4096}
    values.update(overrides)
    return kvtier.Store(make_config(tmp_path, disk_admit_after=admit_after, **values))


def _evict_dram(cache: kvtier.BoundCache, seed: int = 100) -> None:
    """Save DRAM_CHUNKS single chunks of other tokens, pushing everything else out of DRAM."""
    for i in range(DRAM_CHUNKS):
        tokens = [seed + i] * CHUNK
        cache.save(tokens, make_kv(CHUNK, seed=seed + i))
    cache.store.flush()


@pytest.mark.parametrize(("admit_after", "on_disk"), [(1, True), (2, False)])
def test_chunk_saved_once_is_kept_off_disk(tmp_path: Path, admit_after: int, on_disk: bool) -> None:
    """A chunk saved once and then evicted from DRAM is found on disk with admit-after 1, and
    is gone (dropped, counted as rejected) with admit-after 2."""
    with _store(tmp_path, admit_after) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(CHUNK))
        cache.save(tokens, make_kv(CHUNK))
        store.flush()
        _evict_dram(cache)
        assert cache.locate(tokens).tiers == (("disk",) if on_disk else ())
        stats = store.stats()
        assert stats.admission_rejected == (0 if on_disk else 1 + DRAM_CHUNKS)
        assert stats.disk_written_bytes == (1 + DRAM_CHUNKS if on_disk else 0) * 512
        assert stats.tier("disk").chunks == (1 + DRAM_CHUNKS if on_disk else 0)


def test_hit_in_dram_admits_chunk_to_disk(tmp_path: Path) -> None:
    """With admit-after 2, a DRAM hit is the second use: the chunk is written to disk, so it
    survives DRAM eviction and loads byte-exact from disk."""
    with _store(tmp_path, 2) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(2 * CHUNK))
        kv = make_kv(len(tokens))
        cache.save(tokens, kv)
        store.flush()
        assert store.stats().tier("disk").chunks == 0
        cache.load(tokens)  # second use of both chunks
        store.flush()
        assert store.stats().tier("disk").chunks == 2
        _evict_dram(cache)
        assert cache.locate(tokens).tiers == ("disk", "disk")
        np.testing.assert_array_equal(cache.load(tokens), kv)
        assert store.stats().disk_written_bytes == 2 * 512
        store.check_integrity()


@pytest.mark.parametrize("way", ["reading", "acquire_chunk"])
def test_in_place_hit_admits_chunk_to_disk(tmp_path: Path, way: str) -> None:
    """A DRAM hit through the in-place views (`reading`, `acquire_chunk`) is a use too."""
    with _store(tmp_path, 2) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(CHUNK))
        cache.save(tokens, make_kv(CHUNK))
        store.flush()
        (key,) = cache.keys(tokens)
        if way == "reading":
            with store.reading([key], cache.chunk_bytes) as views:
                assert views is not None and views[0] is not None
        else:
            assert store.acquire_chunk(key, cache.chunk_bytes) is not None
            store.release_chunk(key)
        store.flush()
        assert store.stats().tier("disk").chunks == 1


def test_second_save_after_eviction_admits_chunk(tmp_path: Path) -> None:
    """A chunk dropped from DRAM before its second use is remembered: saving it again writes
    it to disk."""
    with _store(tmp_path, 2) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(CHUNK))
        kv = make_kv(CHUNK)
        cache.save(tokens, kv)
        store.flush()
        _evict_dram(cache, seed=100)
        assert cache.lookup(tokens) == 0
        cache.save(tokens, kv)  # recomputed and saved again: second use
        store.flush()
        _evict_dram(cache, seed=200)
        assert cache.locate(tokens).tiers == ("disk",)
        np.testing.assert_array_equal(cache.load(tokens), kv)


def test_repeated_saves_of_a_held_chunk_are_not_uses(tmp_path: Path) -> None:
    """Saving a chunk DRAM still holds takes nothing and counts no use: it stays off disk."""
    with _store(tmp_path, 2) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(CHUNK))
        for _ in range(3):
            cache.save(tokens, make_kv(CHUNK))
        store.flush()
        assert store.stats().tier("disk").chunks == 0


def test_without_dram_unadmitted_saves_free_their_staging_slot(tmp_path: Path) -> None:
    """Without a DRAM tier, a save kept off disk gives its staging slot back: many such saves
    are never dropped for lack of memory; the second save of a chunk reaches disk."""
    with _store(tmp_path, 2, dram_bytes=None) as store:
        cache = store.bind("m", LAYOUT)
        for i in range(20):
            cache.save([i] * CHUNK, make_kv(CHUNK, seed=i))
        store.flush()
        stats = store.stats()
        assert (stats.dropped_chunks, stats.admission_rejected) == (0, 20)
        assert stats.tier("disk").chunks == 0
        cache.save([0] * CHUNK, make_kv(CHUNK, seed=0))
        store.flush()
        assert cache.locate([0] * CHUNK).tiers == ("disk",)


def test_ghost_list_is_bounded() -> None:
    """The seen-set never holds more than its capacity, forgets the least recently used key
    first, and keeps counting the keys it remembers."""
    admission = AdmitAfter(2, capacity_keys=8)
    keys = [os.urandom(16) for _ in range(1000)]
    assert not any(admission.on_save(k) for k in keys)
    assert len(admission) == 8
    assert admission.on_save(keys[-1])  # remembered: second use
    assert not admission.on_save(keys[0])  # forgotten long ago: a first use again
    assert len(admission) == 8
    assert admission.rejected == 1001


def test_on_hit_admits_once() -> None:
    """Only the use that reaches `uses` answers True to on_hit, so a chunk is written once."""
    admission = AdmitAfter(3)
    key = os.urandom(16)
    assert [admission.on_hit(key) for _ in range(5)] == [False, False, True, False, False]
    assert admission.on_save(key)


def test_admit_all_is_the_default() -> None:
    """disk_admit_after=1, or a store without disk, admits every save and remembers nothing."""
    assert isinstance(disk_admission(1, has_disk=True), AdmitAll)
    assert isinstance(disk_admission(2, has_disk=False), AdmitAll)
    assert kvtier.StoreConfig().disk_admit_after == 1


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "2", None])
def test_bad_disk_admit_after_is_a_clear_error(value: object) -> None:
    """0, negatives and non-ints are refused, saying what the setting means."""
    with pytest.raises(kvtier.ConfigError, match=r"disk_admit_after: must be an int >= 1"):
        kvtier.StoreConfig(disk_admit_after=value)  # type: ignore[arg-type]


def test_disk_admit_after_from_env() -> None:
    """KVTIER_DISK_ADMIT_AFTER sets the field; off means 1; junk names the variable."""
    assert kvtier.StoreConfig.from_env({"KVTIER_DISK_ADMIT_AFTER": "2"}).disk_admit_after == 2
    assert kvtier.StoreConfig.from_env({"KVTIER_DISK_ADMIT_AFTER": "off"}).disk_admit_after == 1
    with pytest.raises(kvtier.ConfigError, match="KVTIER_DISK_ADMIT_AFTER: expected an integer"):
        kvtier.StoreConfig.from_env({"KVTIER_DISK_ADMIT_AFTER": "twice"})
    with pytest.raises(kvtier.ConfigError, match="disk_admit_after: must be an int >= 1"):
        kvtier.StoreConfig.from_env({"KVTIER_DISK_ADMIT_AFTER": "0"})


def test_serve_refuses_a_bad_disk_admit_after() -> None:
    """`kvtier serve --disk-admit-after 0` exits with the config error, not a traceback."""
    cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--port", "0", "--disk-admit-after", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "disk_admit_after: must be an int >= 1" in result.stderr
    assert "Traceback" not in result.stderr
