"""DiskTier on a full file system: evict its own LRU chunks and retry, hold less until room
returns, never show a partly written chunk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.conftest import SAVE_CHUNKS
from tests.tiers.test_disk import CHUNK_FILE, get, key, payload, put

from kvtier.tiers import disk_space
from kvtier.tiers.disk import DiskTier

BLOCK = 4096


class FullDisk:
    """A file system of `limit_bytes` under `root` (file sizes summed), enforced where the
    tier writes: `os.pwritev` writes what fits, then fails with `error` (as the kernel does).
    statvfs reports the free space, or (`visible=False`, a quota) plenty of it."""

    def __init__(self, root: Path, limit_bytes: int, error: int, visible: bool) -> None:
        self.root, self.limit_bytes, self.error, self.visible = root, limit_bytes, error, visible
        self.refused = 0

    def free_bytes(self) -> int:
        used = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return max(0, self.limit_bytes - used)

    def pwritev(self, real: object, fd: int, views: list[memoryview], offset: int) -> int:
        free = self.free_bytes()
        if free == 0:
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error))
        room, fitting = free, []
        for view in views:
            if room == 0:
                break
            fitting.append(view[:room])
            room -= fitting[-1].nbytes
        return real(fd, fitting, offset)  # type: ignore[operator, no-any-return]

    def statvfs(self, path: object) -> os.statvfs_result:
        free = self.free_bytes() if self.visible else 1 << 40
        blocks = free // BLOCK
        return os.statvfs_result((BLOCK, BLOCK, 1 << 30, blocks, blocks, 0, 0, 0, 0, 255))

    def fill(self) -> Path:
        """Another program takes every free byte."""
        other = self.root / "other-program.dat"
        other.write_bytes(bytes(self.free_bytes()))
        return other


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(disk_space, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def full_disk(
    monkeypatch: pytest.MonkeyPatch, root: Path, limit: int, error: int, visible: bool
) -> FullDisk:
    fs = FullDisk(root, limit, error, visible)
    real_pwritev = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda *a: fs.pwritev(real_pwritev, *a))
    monkeypatch.setattr(os, "statvfs", fs.statvfs)
    return fs


def open_tier(root: Path, chunks: int) -> DiskTier:
    """A tier of `chunks` chunk files whose recency journal is written only on close (its
    background appends would take room the fake disk does not account for)."""
    return DiskTier(root, chunks * CHUNK_FILE, recency_flush_s=3600)


@pytest.mark.parametrize(
    ("error", "visible"), [(errno.ENOSPC, True), (errno.EDQUOT, False)], ids=["enospc", "quota"]
)
def test_full_disk_evicts_lru_first_and_keeps_every_new_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock, error: int, visible: bool
) -> None:
    """Disk filled by another program: 100 new chunks are all stored and read back exact; the
    tier's least recently used chunks made the room; later writes evict first (one refused
    write in all); once room returns the capacity is the configured one again."""
    fs = full_disk(monkeypatch, tmp_path, 1000 * CHUNK_FILE, error, visible)
    tier = open_tier(tmp_path, 400)
    for i in range(150):
        assert put(tier, i)
    tier.touch([key(i) for i in range(50)])  # LRU order now: 50..149, then 0..49
    lru = [*range(50, 150), *range(50)]
    other = fs.fill()
    assert all(put(tier, 1000 + i) for i in range(100))
    assert all(get(tier, 1000 + i) == payload(1000 + i) for i in range(100))
    old = [i for i in lru if tier.contains_prefix([key(i)])]
    assert old and old == lru[-len(old) :], "old chunks were not evicted LRU-first"
    assert all(get(tier, i) == payload(i) for i in old)
    stats = tier.stats()
    assert (stats.out_of_space, fs.refused, stats.errors) == (1, 1, 0)
    assert stats.effective_capacity_bytes < stats.capacity_bytes
    assert stats.evictions == 150 - len(old)
    assert not list((tmp_path / "kvtier-v1" / "tmp").iterdir())
    tier.check_integrity()

    other.unlink()  # room returns; the next write after space_check_s sees it
    clock.now += 1.0
    assert put(tier, 2000)
    assert tier.stats().effective_capacity_bytes == tier.capacity_bytes
    evictions = tier.stats().evictions
    assert all(put(tier, 3000 + i) for i in range(20))
    assert tier.stats().evictions == evictions, "evicted although there was room again"
    tier.check_integrity()
    tier.close()


def test_write_cut_short_by_a_full_disk_is_never_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """With nothing of its own to evict, a chunk whose write ran out of room half-way is
    refused: no file under its name, nothing left in tmp/, not found after reopening."""
    fs = full_disk(monkeypatch, tmp_path, CHUNK_FILE // 2, errno.ENOSPC, visible=False)
    tier = open_tier(tmp_path, 10)
    assert not put(tier, 1)
    assert fs.refused == 1  # the first pwritev wrote half the file, the second was refused
    assert not tier.path(key(1)).exists()
    assert not list((tmp_path / "kvtier-v1" / "tmp").iterdir())
    stats = tier.stats()
    assert (stats.out_of_space, stats.chunks, stats.bytes) == (1, 0, 0)
    tier.close()
    monkeypatch.undo()
    tier = DiskTier(tmp_path, 10 * CHUNK_FILE)
    assert get(tier, 1) is None and tier.stats().chunks == 0
    assert put(tier, 1) and get(tier, 1) == payload(1)
    tier.close()


def test_statvfs_lowers_the_capacity_before_any_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    """A disk that filled between two space checks: the next write evicts first and never
    meets ENOSPC."""
    fs = full_disk(monkeypatch, tmp_path, 100 * CHUNK_FILE, errno.ENOSPC, True)
    tier = open_tier(tmp_path, 400)
    for i in range(50):
        assert put(tier, i)
    fs.fill()
    clock.now += 1.0
    assert all(put(tier, 100 + i) for i in range(30))
    stats = tier.stats()
    assert stats.out_of_space == 0 and fs.refused == 0
    assert stats.effective_capacity_bytes <= 50 * CHUNK_FILE
    assert [tier.contains_prefix([key(100 + i)]) for i in range(30)] == [1] * 30
    tier.check_integrity()
    tier.close()


def test_other_write_errors_are_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error that is not about room (EIO) fails the put once, counted, and evicts
    nothing."""
    tier = open_tier(tmp_path, 10)
    for i in range(5):
        assert put(tier, i)
    calls = []

    def broken(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwritev", broken)
    assert not put(tier, 9)
    monkeypatch.undo()
    stats = tier.stats()
    assert (len(calls), stats.errors, stats.out_of_space, stats.evictions) == (1, 1, 0, 0)
    assert stats.effective_capacity_bytes == stats.capacity_bytes
    assert stats.chunks == 5
    tier.close()


REPO = Path(__file__).resolve().parents[2]
TMPFS_MIB = 16
ON_TMPFS = """
import errno, json, os, sys
import numpy as np
import kvtier
from tests.conftest import CHUNK, LAYOUT, SAVE_CHUNKS, prefix_kv, tokens_for

disk = sys.argv[1]
config = kvtier.StoreConfig(chunk_tokens=CHUNK, dram_bytes=None, disk_dir=disk,
                            disk_bytes=15 << 20)
store = kvtier.Store(config)
cache = store.bind("m", LAYOUT)
for i in range(200):
    cache.save(tokens_for(i), prefix_kv(tokens_for(i)))
store.flush()
for i in range(150, 200):  # used again: these must outlive 0..149
    tokens = tokens_for(i)
    assert cache.lookup(tokens) == SAVE_CHUNKS * CHUNK
    cache.load(tokens[: SAVE_CHUNKS * CHUNK])
with open(os.path.join(disk, "other-program.dat"), "wb", buffering=0) as f:  # fill it up
    for block in (1 << 20, 4096):
        try:
            while True:
                f.write(bytes(block))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
free_after_fill = os.statvfs(disk).f_bavail
for i in range(1000, 1100):
    cache.save(tokens_for(i), prefix_kv(tokens_for(i)))
store.flush()
found = {}
wrong = 0
for i in [*range(200), *range(1000, 1100)]:
    tokens = tokens_for(i)
    n = cache.lookup(tokens)
    found[i] = n // CHUNK
    if n and not np.array_equal(cache.load(tokens[:n]), prefix_kv(tokens[:n])):
        wrong += 1
stats = store.stats().tier("disk")
store.check_integrity()
store.close()
print(json.dumps({"found": found, "wrong": wrong, "stats": stats._asdict(),
                  "free_after_fill": free_after_fill}))
"""


def _tmpfs_available(mount: Path) -> bool:
    """Whether an unprivileged user + mount namespace can mount a tmpfs here."""
    cmd = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_store_on_a_really_full_tmpfs_keeps_every_new_prefix(tmp_path: Path) -> None:
    """A real 16 MiB tmpfs (in a user namespace, no root needed) filled by another file after
    200 saves: 100 new prefixes are all found whole and exact afterwards, the 50 prefixes used
    again after saving all survive, only older chunks were evicted, no byte is wrong."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not _tmpfs_available(mount):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    script = f'mount -t tmpfs -o size={TMPFS_MIB}m tmpfs "$1" && exec "$2" -c "$3" "$1"'
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), sys.executable, ON_TMPFS]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    found = {int(i): n for i, n in result["found"].items()}
    assert result["free_after_fill"] == 0
    assert [found[i] for i in range(1000, 1100)] == [SAVE_CHUNKS] * 100
    assert [found[i] for i in range(150, 200)] == [SAVE_CHUNKS] * 50
    assert sum(found[i] for i in range(150)) < 150 * SAVE_CHUNKS  # the room came from these
    assert result["wrong"] == 0
    stats = result["stats"]
    assert stats["checksum_failures"] == 0 and stats["errors"] == 0
    assert stats["effective_capacity_bytes"] < stats["capacity_bytes"]


def test_a_write_that_raises_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk write stopped by an exception that is not an OSError leaves no chunk: put
    raises, nothing is indexed and its bytes are given back."""
    from kvtier.tiers import disk_io

    tier = open_tier(tmp_path, 10)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(disk_io, "_write_views", interrupted)
    with pytest.raises(KeyboardInterrupt):
        put(tier, 1)
    monkeypatch.undo()
    stats = tier.stats()
    assert (stats.chunks, stats.bytes) == (0, 0)
    assert tier.contains_prefix([key(1)]) == 0
    assert put(tier, 1) and get(tier, 1) == payload(1)
    tier.check_integrity()
    tier.close()
