"""DiskTier TTLs: the expiry journal on a full disk, its compaction under concurrent puts,
and expired chunks dropped first when a reopened tier no longer fits."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from tests.tiers.test_disk import CHUNK_FILE, get, key, payload
from tests.tiers.test_disk_space import full_disk, open_tier

from kvtier import expiry
from kvtier.journal import Journal
from kvtier.tiers import disk_io
from kvtier.tiers.disk import DiskTier

HOUR_NS = 3600 * 10**9


def ttl_put(tier: DiskTier, i: int, expires_ns: int) -> bool:
    return tier.put(key(i), [memoryview(payload(i))], expires_ns=expires_ns)


def journaled(root: Path, i: int) -> int:
    """How many records of chunk i the expiry journal holds (the tier closed)."""
    journal = Journal(root / "kvtier-v1" / "expiry", sync=False)
    journal.close()
    return sum(record[:16] == key(i) for record in journal.records)


def test_a_full_disk_refusing_the_expiry_record_is_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TTL'd put whose expiry record meets ENOSPC does not raise: it counts in
    out_of_space (not errors), the tier evicts its oldest chunk and retries; the chunk is
    stored with its expiry, journaled once, known again after reopening."""
    tier = open_tier(tmp_path, 10)
    for i in range(3):
        assert ttl_put(tier, i, 0)
    real_write, refused = os.write, []

    def full_once(fd: int, data: bytes) -> int:
        if not refused:
            refused.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_once)
    at = time.time_ns() + HOUR_NS
    assert ttl_put(tier, 9, at)
    monkeypatch.undo()
    stats = tier.stats()
    assert (stats.out_of_space, stats.errors, stats.evictions) == (1, 0, 1)
    assert get(tier, 9) == payload(9) and tier.expires_ns(key(9)) == at
    tier.check_integrity()
    tier.close()
    assert journaled(tmp_path, 9) == 1
    again = DiskTier(tmp_path, 10 * CHUNK_FILE)
    assert again.expires_ns(key(9)) == at
    again.close()


def test_a_retried_write_journals_its_expiry_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TTL'd chunk whose write meets a full disk is retried after evicting; its expiry is
    journaled once, not once per try."""
    fs = full_disk(monkeypatch, tmp_path, 1000 * CHUNK_FILE, errno.ENOSPC, visible=False)
    tier = open_tier(tmp_path, 10)
    for i in range(3):
        assert ttl_put(tier, i, 0)
    fs.fill()
    at = time.time_ns() + HOUR_NS
    assert ttl_put(tier, 9, at)
    assert fs.refused >= 1 and tier.stats().out_of_space == fs.refused
    assert get(tier, 9) == payload(9)
    tier.close()
    assert journaled(tmp_path, 9) == 1


def test_a_compaction_keeps_the_expiry_of_a_put_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put whose expiry is journaled but whose chunk is still being written when another
    put compacts the journal keeps its record: after reopening, the chunk has its expiry."""
    monkeypatch.setattr(expiry, "COMPACT_SLACK", -(10**9))  # compacted at every append
    real_write, writing, release = disk_io._write_views, threading.Event(), threading.Event()

    def slow_for_chunk_1(path: Path, views: list[memoryview], flags: int) -> None:
        if path.name.startswith(key(1).hex()):
            writing.set()
            release.wait(10)
        real_write(path, views, flags)

    monkeypatch.setattr(disk_io, "_write_views", slow_for_chunk_1)
    tier = open_tier(tmp_path, 10)
    at = time.time_ns() + HOUR_NS
    first = threading.Thread(target=ttl_put, args=(tier, 1, at + 1))
    first.start()
    assert writing.wait(10)
    assert ttl_put(tier, 2, at + 2)  # compacts while chunk 1 is in flight
    release.set()
    first.join()
    tier.close()
    monkeypatch.undo()
    again = DiskTier(tmp_path, 10 * CHUNK_FILE)
    assert [again.expires_ns(key(i)) for i in (1, 2)] == [at + 1, at + 2]
    again.close()


def test_reopening_smaller_drops_expired_chunks_first(tmp_path: Path) -> None:
    """A tier reopened with room for fewer chunks drops those past their TTL before any live
    one, though they are the most recently written."""
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(4):
        assert ttl_put(tier, i, 1 if i >= 2 else 0)  # 2 and 3: expired long ago
        os.utime(tier.path(key(i)), ns=(i * 10**9, i * 10**9))
    tier.close()
    small = DiskTier(tmp_path, 2 * CHUNK_FILE)
    kept = small.keys()
    assert sorted(int.from_bytes(k, "little") for k in kept) == [0, 1]
    assert small.stats().expired == 2
    small.check_integrity()
    small.close()
