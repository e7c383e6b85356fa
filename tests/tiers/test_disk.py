"""DiskTier: checksummed chunk files, crash-safe publish, persistence, bounded by capacity."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier.tiers.disk import HEADER, HEADER_BYTES, DiskTier

PAYLOAD = 1000
CHUNK_FILE = HEADER_BYTES + PAYLOAD


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, PAYLOAD, dtype=np.uint8).tobytes()


def put(tier: DiskTier, i: int) -> bool:
    return tier.put(key(i), [memoryview(payload(i))])


def get(tier: DiskTier, i: int) -> bytes | None:
    buf = bytearray(PAYLOAD)
    return bytes(buf) if tier.get_into(key(i), [memoryview(buf)]) else None


def test_put_get_round_trip_and_scatter(tmp_path: Path) -> None:
    """A chunk written from several views reads back byte-exact into several other views."""
    tier = DiskTier(tmp_path, 1 << 20)
    data = payload(1)
    assert tier.put(key(1), [memoryview(data[:100]), memoryview(data[100:])])
    parts = [bytearray(333), bytearray(PAYLOAD - 333)]
    assert tier.get_into(key(1), [memoryview(p) for p in parts])
    assert bytes(parts[0] + parts[1]) == data
    assert tier.contains_prefix([key(1), key(2)]) == 1
    assert get(tier, 2) is None
    tier.check_integrity()
    tier.close()


def test_persists_across_reopen_and_cleans_tmp(tmp_path: Path) -> None:
    """Published chunks are found after reopening; leftovers in tmp/ are deleted, not indexed."""
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(5):
        assert put(tier, i)
    tier.close()
    leftover = tmp_path / "kvtier-v1" / "tmp" / (key(9).hex() + ".kv.123.456")
    leftover.write_bytes(b"torn")
    tier = DiskTier(tmp_path, 1 << 20)
    assert not leftover.exists()
    assert tier.contains_prefix([key(i) for i in range(5)]) == 5
    assert all(get(tier, i) == payload(i) for i in range(5))
    assert tier.stats().chunks == 5
    tier.check_integrity()
    tier.close()


def test_second_open_of_same_dir_is_refused(tmp_path: Path) -> None:
    """Two tiers on one directory at once is a clear error; after close it opens again."""
    tier = DiskTier(tmp_path, 1 << 20)
    with pytest.raises(kvtier.ConfigError, match="in use by another kvtier store"):
        DiskTier(tmp_path, 1 << 20)
    tier.close()
    DiskTier(tmp_path, 1 << 20).close()


def test_capacity_bounds_and_lru_eviction(tmp_path: Path) -> None:
    """Bytes never exceed capacity; the least recently touched chunk is evicted first."""
    tier = DiskTier(tmp_path, 3 * CHUNK_FILE)
    for i in range(3):
        assert put(tier, i)
    tier.touch([key(0)])  # 1 is now the least recently used
    assert put(tier, 3)
    assert tier.contains_prefix([key(1)]) == 0
    assert [tier.contains_prefix([key(i)]) for i in (0, 2, 3)] == [1, 1, 1]
    assert not (tier.path(key(1))).exists()
    stats = tier.stats()
    assert stats.bytes == 3 * CHUNK_FILE <= stats.capacity_bytes
    assert stats.evictions == 1
    assert not tier.put(key(99), [memoryview(bytes(4 * CHUNK_FILE))])
    tier.check_integrity()
    tier.close()


def test_reopen_with_smaller_capacity_trims(tmp_path: Path) -> None:
    """Reopening with less capacity than the directory holds drops files until it fits."""
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(5):
        put(tier, i)
    tier.close()
    tier = DiskTier(tmp_path, 2 * CHUNK_FILE)
    assert tier.stats().chunks == 2
    assert tier.stats().bytes <= 2 * CHUNK_FILE
    assert len(list((tmp_path / "kvtier-v1").glob("??/*.kv"))) == 2
    tier.check_integrity()
    tier.close()


def test_wrong_size_read_is_plain_miss(tmp_path: Path) -> None:
    """Asking for another size is a miss that keeps the (valid) chunk."""
    tier = DiskTier(tmp_path, 1 << 20)
    put(tier, 1)
    assert not tier.get_into(key(1), [memoryview(bytearray(PAYLOAD + 8))])
    assert tier.stats().checksum_failures == 0
    assert get(tier, 1) == payload(1)
    tier.close()


def _flip(offset: int) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x5A
        path.write_bytes(data)

    return corrupt


def _truncate(size: int) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        os.truncate(path, size)

    return corrupt


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 7)


# Header fields: magic, version, key, payload size, checksum (flags and ns are not verified
# because they carry no data: flipping them leaves a chunk whose bytes are still right).
HEADER_FIELDS = {"magic": 3, "version": 8, "key": 20, "size": 28, "size_high": 33, "sum": 40}
CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    **{f"header_{name}": _flip(at) for name, at in HEADER_FIELDS.items()},
    "payload_first": _flip(HEADER_BYTES),
    "payload_last": _flip(CHUNK_FILE - 1),
    "truncated_empty": _truncate(0),
    "truncated_header": _truncate(HEADER.size // 2),
    "truncated_payload": _truncate(HEADER_BYTES + PAYLOAD // 2),
    "extra_bytes": _grow,
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_file_is_counted_deleted_and_missed(tmp_path: Path, name: str) -> None:
    """A damaged chunk file is never served: a miss, counted, its file deleted."""
    tier = DiskTier(tmp_path, 1 << 20)
    put(tier, 1)
    put(tier, 2)
    tier.close()
    CORRUPTIONS[name](tier.path(key(1)))
    tier = DiskTier(tmp_path, 1 << 20)
    assert get(tier, 1) is None
    assert tier.stats().checksum_failures == 1
    assert not tier.path(key(1)).exists()
    assert tier.contains_prefix([key(1)]) == 0
    assert get(tier, 2) == payload(2)
    tier.check_integrity()
    tier.close()


def test_file_renamed_to_another_key_is_rejected(tmp_path: Path) -> None:
    """A valid chunk file under another chunk's name is a checksum failure, never served."""
    tier = DiskTier(tmp_path, 1 << 20)
    put(tier, 1)
    put(tier, 2)
    tier.close()
    os.replace(tier.path(key(1)), tier.path(key(2)))
    tier = DiskTier(tmp_path, 1 << 20)
    assert get(tier, 2) is None
    assert get(tier, 1) is None
    assert tier.stats().checksum_failures == 1
    assert not tier.path(key(2)).exists()
    tier.check_integrity()
    tier.close()


def test_file_deleted_behind_the_tier_is_a_miss(tmp_path: Path) -> None:
    """A chunk file removed by someone else is a plain miss, not an error or a failure."""
    tier = DiskTier(tmp_path, 1 << 20)
    put(tier, 1)
    tier.path(key(1)).unlink()
    assert get(tier, 1) is None
    stats = tier.stats()
    assert (stats.checksum_failures, stats.errors, stats.chunks) == (0, 0, 0)
    tier.check_integrity()
    tier.close()


def test_open_error_other_than_missing_keeps_the_chunk(tmp_path: Path) -> None:
    """An open() failure that is not ENOENT (here ELOOP) is a counted miss; the chunk stays
    indexed and serves again once the file is readable."""
    tier = DiskTier(tmp_path, 1 << 20)
    assert put(tier, 1)
    path = tier.path(key(1))
    saved = path.with_name("saved")
    path.rename(saved)
    path.symlink_to(path.name)  # a link to itself: open() fails with ELOOP
    assert get(tier, 1) is None
    assert tier.contains_prefix([key(1)]) == 1
    assert tier.stats().errors == 1 and tier.stats().checksum_failures == 0
    path.unlink()
    saved.rename(path)
    assert get(tier, 1) == payload(1)


def test_reopening_smaller_keeps_the_newest_chunks(tmp_path: Path) -> None:
    """A disk tier reopened with room for fewer chunks keeps the most recently written."""
    tier = DiskTier(tmp_path, 1 << 20)
    for i in range(4):
        assert put(tier, i)
        os.utime(tier.path(key(i)), ns=(i * 10**9, i * 10**9))  # distinct write times
    tier.close()
    small = DiskTier(tmp_path, 2 * CHUNK_FILE)
    kept = small.keys()
    assert sorted(int.from_bytes(k, "little") for k in kept) == [2, 3]
    small.check_integrity()


def test_failed_open_releases_the_lock(tmp_path: Path) -> None:
    """A DiskTier whose index scan fails after it took the lock releases the lock: once the
    cause is fixed, the same process can open the directory again."""
    root = tmp_path / "kvtier-v1"
    root.mkdir()
    loop = root / "ab"
    loop.symlink_to(loop)  # a shard directory that cannot be listed (ELOOP), even for root
    with pytest.raises(kvtier.ConfigError, match="cannot read"):
        DiskTier(tmp_path, 1 << 20)
    loop.unlink()
    tier = DiskTier(tmp_path, 1 << 20)
    assert put(tier, 1) and get(tier, 1) == payload(1)
    tier.close()


def aligned_payload(i: int, nbytes: int = 64 << 10) -> memoryview:
    """A page-aligned buffer (what the DRAM tier's slots are), filled with chunk i."""
    import mmap

    buf = mmap.mmap(-1, nbytes)
    buf.write(np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return memoryview(buf)


def test_page_aligned_chunks_bypass_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose views are page-aligned whole pages is written with O_DIRECT (others
    are not); either way it reads back byte-exact, and a byte flipped in its file is still
    caught by the checksum."""
    from kvtier.tiers import disk_io

    flags: list[int] = []
    real = disk_io._write_views
    monkeypatch.setattr(
        disk_io, "_write_views", lambda path, views, f: flags.append(f) or real(path, views, f)
    )
    tier = DiskTier(tmp_path, 1 << 20)
    data = aligned_payload(1)
    assert tier.put(key(1), [data])
    assert flags[0] == os.O_DIRECT
    assert put(tier, 2)  # 1000 bytes: not whole pages
    assert flags[-1] == 0
    out = bytearray(data.nbytes)
    assert tier.get_into(key(1), [memoryview(out)]) and out == data
    assert get(tier, 2) == payload(2)
    path = tier.path(key(1))
    raw = bytearray(path.read_bytes())
    assert len(raw) == HEADER_BYTES + data.nbytes
    raw[HEADER_BYTES + 1234] ^= 0xFF
    path.write_bytes(raw)
    assert not tier.get_into(key(1), [memoryview(out)])
    assert tier.stats().checksum_failures == 1


def test_a_file_system_without_o_direct_gets_plain_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where opening with O_DIRECT fails with EINVAL (tmpfs, some overlays), the chunk is
    written plainly and O_DIRECT is not tried again."""
    import errno

    real_open = os.open
    tried = []

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            tried.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    tier = DiskTier(tmp_path, 1 << 20)
    monkeypatch.setattr(os, "open", no_direct)
    for i in (1, 2):
        assert tier.put(key(i), [aligned_payload(i)])
    monkeypatch.undo()
    assert len(tried) == 1
    for i in (1, 2):
        out = bytearray(64 << 10)
        assert tier.get_into(key(i), [memoryview(out)]) and out == aligned_payload(i)
    assert tier.stats().errors == 0
