"""Journal: append-only records that stay readable after a short write or a failed rewrite."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kvtier.journal import Journal


def records(path: Path) -> list[bytes]:
    journal = Journal(path, sync=False)
    journal.close()
    return journal.records


def test_an_append_cut_short_is_undone_and_later_records_stay_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record the file system takes only half of (then ENOSPC) raises and is truncated
    away: the records appended afterwards are all read back."""
    path = tmp_path / "journal"
    journal = Journal(path, sync=True)
    journal.append(b"first")
    real_write, calls = os.write, []

    def full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        journal.append(b"second")
    monkeypatch.undo()
    journal.append(b"third")
    journal.close()
    assert records(path) == [b"first", b"third"]


def test_a_short_write_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the OS cuts short but that can go on is resumed: the record is whole."""
    path = tmp_path / "journal"
    journal = Journal(path, sync=False)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    journal.append(b"a record longer than three bytes")
    journal.rewrite([b"rewritten", b"records"])
    journal.append(b"and one more")
    monkeypatch.undo()
    journal.close()
    assert records(path) == [b"rewritten", b"records", b"and one more"]


def test_a_failed_rewrite_keeps_the_records_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite refused by a full disk raises, keeps the old records, removes its temporary
    file, and appends still work."""
    path = tmp_path / "journal"
    journal = Journal(path, sync=False)
    journal.append(b"one")
    journal.append(b"two")

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        journal.rewrite([b"compacted"])
    monkeypatch.undo()
    assert not path.with_name(path.name + ".tmp").exists()
    journal.append(b"three")
    journal.close()
    assert records(path) == [b"one", b"two", b"three"]
