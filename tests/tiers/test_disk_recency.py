"""DiskTier recency journal: the LRU order (not write order) survives a restart, clean or
`kill -9`; a damaged journal only makes the order staler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.tiers.test_disk import CHUNK_FILE, get, key, payload, put

from kvtier.tiers import disk_recency
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk_recency import MAGIC, RECORD

REPO = Path(__file__).resolve().parents[2]
A, B, C, D, E, F = range(1, 7)


def journal(tmp_path: Path) -> Path:
    return tmp_path / "kvtier-v1" / "RECENCY"


def write_abcd_hit_ab(tier: DiskTier) -> None:
    for i in (A, B, C, D):
        assert put(tier, i)
    tier.touch([key(A)])
    tier.touch([key(B)])


def held(tier: DiskTier) -> set[int]:
    keys = tier.keys()
    return {int.from_bytes(k, "little") for k in keys}


def assert_c_and_d_go_first(tmp_path: Path) -> None:
    """Reopened with room for four chunks, two new ones evict C and D, not A and B."""
    tier = DiskTier(tmp_path, 4 * CHUNK_FILE)
    assert put(tier, E) and put(tier, F)
    assert held(tier) == {A, B, E, F}
    assert get(tier, A) == payload(A) and get(tier, B) == payload(B)
    tier.check_integrity()
    tier.close()


def test_hits_outlive_later_writes_after_a_clean_close(tmp_path: Path) -> None:
    """Write A, B, C, D; hit A and B; close; reopen full: C and D are evicted first."""
    tier = DiskTier(tmp_path, 1 << 20)
    write_abcd_hit_ab(tier)
    tier.close()
    assert_c_and_d_go_first(tmp_path)


def test_reopening_smaller_keeps_the_most_recently_used(tmp_path: Path) -> None:
    """Reopened with room for two chunks, the tier keeps the two it used last (A and B),
    not the two it wrote last."""
    tier = DiskTier(tmp_path, 1 << 20)
    write_abcd_hit_ab(tier)
    tier.close()
    small = DiskTier(tmp_path, 2 * CHUNK_FILE)
    assert held(small) == {A, B}
    small.close()


KILLED = """
import sys, time
from tests.tiers.test_disk import key, put
from kvtier.tiers.disk import DiskTier

tier = DiskTier(sys.argv[1], 1 << 20, recency_flush_s=0.02)
for i in (1, 2, 3, 4):
    assert put(tier, i)
tier.touch([key(1)])
tier.touch([key(2)])
print("touched", flush=True)
time.sleep(600)
"""


def test_hits_outlive_later_writes_after_kill_9(tmp_path: Path) -> None:
    """A process that wrote A, B, C, D and hit A and B is killed with SIGKILL once its
    journal was flushed in the background: after reopening, C and D are evicted first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "touched", proc.stderr.read() if proc.stderr else line
        flushed = len(MAGIC) + 6 * RECORD.size  # four writes and two hits
        deadline = time.monotonic() + 60
        while not journal(tmp_path).exists() or journal(tmp_path).stat().st_size < flushed:
            assert time.monotonic() < deadline, "the journal was never flushed"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert_c_and_d_go_first(tmp_path)


def test_torn_or_foreign_journal_only_loses_order(tmp_path: Path) -> None:
    """A journal cut mid-record keeps its whole records (and is cut back so appends stay on
    record boundaries); a file that is not a journal is ignored and replaced; every chunk is
    served either way."""
    tier = DiskTier(tmp_path, 1 << 20)
    write_abcd_hit_ab(tier)
    tier.close()
    with open(journal(tmp_path), "ab") as f:
        f.write(RECORD.pack(key(C), 0)[:10])  # a record torn by a crash
    whole = journal(tmp_path).stat().st_size - 10
    tier = DiskTier(tmp_path, 1 << 20)
    assert journal(tmp_path).stat().st_size == whole
    tier.close()
    assert_c_and_d_go_first(tmp_path)

    journal(tmp_path).write_bytes(b"not a journal at all" * 7)
    tier = DiskTier(tmp_path, 1 << 20)
    assert all(get(tier, i) == payload(i) for i in (A, B, E, F))
    tier.close()
    assert journal(tmp_path).read_bytes()[: len(MAGIC)] == MAGIC


def test_journal_is_compacted_to_one_record_per_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many hits grow the journal only until the flush thread rewrites it; close leaves one
    record per chunk, in LRU order."""
    monkeypatch.setattr(disk_recency, "COMPACT_MIN_BYTES", 4096)
    tier = DiskTier(tmp_path, 1 << 20, recency_flush_s=0.01)
    for i in range(8):
        assert put(tier, i)
    for round_ in range(400):  # 3,200 hits: 75 KiB of records
        tier.touch([key((round_ + i) % 8) for i in range(8)])
    deadline = time.monotonic() + 60
    while tier._journal._file_bytes > 8192 or tier._journal._notes:
        assert time.monotonic() < deadline, "the journal was never compacted"
        time.sleep(0.01)
    order = [key((399 + i) % 8) for i in range(8)]
    tier.close()
    data = journal(tmp_path).read_bytes()
    assert data[: len(MAGIC)] == MAGIC
    assert [k for k, _ in RECORD.iter_unpack(data[len(MAGIC) :])] == order
    assert os.path.getsize(journal(tmp_path)) == len(MAGIC) + 8 * RECORD.size
