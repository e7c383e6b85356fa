"""SlabPool: first-fit extents over one mapping, coalescing frees, checked against a model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import ConfigError
from kvtier.pool import ALIGN, Extent, SlabPool, StagingPool, aligned

PAGES = 16


def free_runs(capacity: int, used: list[Extent]) -> list[int]:
    """Sizes of the free gaps between allocated extents (the model of the pool)."""
    runs, at = [], 0
    for ext in sorted(used):
        if ext.offset > at:
            runs.append(ext.offset - at)
        at = ext.offset + ext.nbytes
    if capacity > at:
        runs.append(capacity - at)
    return runs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * ALIGN), st.integers(0, 99))))
def test_alloc_free_against_model(ops: list[tuple[bool, int, int]]) -> None:
    """Extents never overlap nor leave the pool; alloc fails only when no free run is big
    enough; used bytes and free runs add up; frees coalesce."""
    pool = SlabPool(PAGES * ALIGN, prefault=False)
    used: list[Extent] = []
    try:
        for do_alloc, nbytes, pick in ops:
            if do_alloc or not used:
                ext = pool.alloc(nbytes)
                fits = max(free_runs(pool.capacity_bytes, used), default=0) >= aligned(nbytes)
                assert (ext is not None) == fits
                if ext is not None:
                    assert ext.nbytes == aligned(nbytes) and ext.offset % ALIGN == 0
                    assert ext.offset >= 0 and ext.offset + ext.nbytes <= pool.capacity_bytes
                    assert all(
                        ext.offset + ext.nbytes <= o.offset or o.offset + o.nbytes <= ext.offset
                        for o in used
                    )
                    used.append(ext)
            else:
                pool.free(used.pop(pick % len(used)))
            assert pool.used_bytes == sum(e.nbytes for e in used)
            pool.check_integrity()
        for ext in used:
            pool.free(ext)
        assert pool.alloc(pool.capacity_bytes) == Extent(0, pool.capacity_bytes)
    finally:
        pool.close()


def test_slots_are_writable_views_of_the_pool() -> None:
    """Two extents are disjoint writable views; a freed extent of the same size is reused."""
    pool = SlabPool(3 * ALIGN, prefault=True)
    pool.wait_prefaulted()
    a, b = pool.alloc(100), pool.alloc(ALIGN + 1)
    assert a is not None and b is not None
    pool.slot(a)[:3] = b"abc"
    pool.slot(b)[:3] = b"xyz"
    assert bytes(pool.slot(a)[:3]) == b"abc"
    assert pool.slot(b).nbytes == 2 * ALIGN
    pool.free(a)
    assert pool.alloc(ALIGN) == a
    assert pool.alloc(1) is None
    pool.check_integrity()
    pool.close()


def test_too_small_pool_is_refused() -> None:
    """A pool smaller than one page is a clear error."""
    with pytest.raises(ValueError, match="at least 4096 bytes"):
        SlabPool(100)


def test_staging_pool_grows_and_old_extents_stay_valid() -> None:
    """A StagingPool maps nothing until used, grows for a larger chunk, and an extent handed
    out before it grew keeps its bytes and frees into its own (retired) pool."""
    staging = StagingPool(slots=2)
    assert staging.capacity_bytes == 0
    old = staging.alloc(100)
    assert old is not None and staging.capacity_bytes == 2 * ALIGN
    view = old.pool.slot(old.extent)
    view[:3] = b"abc"
    new = staging.alloc(3 * ALIGN)
    assert new is not None and new.pool is not old.pool
    assert staging.capacity_bytes == 6 * ALIGN
    assert bytes(view[:3]) == b"abc"
    old.pool.free(old.extent)
    new.pool.free(new.extent)
    new.pool.check_integrity()
    assert staging.alloc(3 * ALIGN) is not None and staging.alloc(3 * ALIGN) is not None
    assert staging.alloc(3 * ALIGN) is None  # two slots, both taken
    staging.close()


def test_shared_pool_is_a_0600_file_that_another_mapping_sees(tmp_path: Path) -> None:
    """With shm_dir the pool is an unlinked 0600 file (nothing left in the directory), reachable
    through its advertised path, whose identity matches, and whose bytes are the pool's; the
    offset of a slot is where its bytes are in that file."""
    pool = SlabPool(4 * ALIGN, prefault=True, shm_dir=tmp_path)
    shared = pool.shared
    assert shared is not None and shared.capacity_bytes == 4 * ALIGN
    assert list(tmp_path.iterdir()) == []
    extent = pool.alloc(10)
    assert extent is not None
    extent = pool.alloc(10) or extent  # a second extent: offset 4096
    slot = pool.slot(extent)
    slot[:5] = b"hello"
    assert pool.offset_of(slot) == extent.offset == ALIGN
    st = os.stat(shared.path)
    assert (st.st_dev, st.st_ino, st.st_mode & 0o777) == (shared.device, shared.inode, 0o600)
    with open(shared.path, "rb") as f:
        f.seek(extent.offset)
        assert f.read(5) == b"hello"
    pool.wait_prefaulted()
    pool.close()
    assert not os.path.exists(shared.path)


def test_anonymous_pool_shares_nothing() -> None:
    """Without shm_dir the pool is anonymous memory: no shared file to offer."""
    pool = SlabPool(ALIGN, prefault=False)
    assert pool.shared is None
    pool.close()


def test_shared_pool_in_a_bad_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A directory that does not exist gives a ConfigError naming dram_shm."""
    with pytest.raises(ConfigError, match="dram_shm: cannot create a file in"):
        SlabPool(ALIGN, prefault=False, shm_dir=tmp_path / "missing")
