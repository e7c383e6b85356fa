"""A client's mapping of a server's shared DRAM file: only the file the server named, read-only,
within its bounds; MAP replies and loopback addresses parsed strictly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier.config import is_loopback
from kvtier.errors import ProtocolError
from kvtier.pool import ALIGN, SharedFile, SlabPool
from kvtier.protocol import MAP_INFO
from kvtier.tiers.shm import SharedMapping, parse_map_reply


def test_mapping_reads_the_pool_and_checks_bounds(tmp_path: Path) -> None:
    """The mapping shows the pool's bytes; bytes outside the file are a ProtocolError."""
    pool = SlabPool(2 * ALIGN, prefault=False, shm_dir=tmp_path)
    assert pool.shared is not None
    pool.view[ALIGN : ALIGN + 3] = b"abc"
    mapping = SharedMapping(pool.shared)
    assert bytes(mapping.chunk(ALIGN, 3)) == b"abc"
    assert mapping.chunk(0, 1).readonly
    with pytest.raises(ProtocolError, match="outside its DRAM file"):
        mapping.chunk(ALIGN + 1, ALIGN)
    pool.close()


def test_a_path_naming_another_file_is_not_mapped(tmp_path: Path) -> None:
    """A path that opens some other file (wrong inode, e.g. a pid reused in another namespace)
    or a shorter file is refused with OSError, so the client stays on GET."""
    other = tmp_path / "other"
    other.write_bytes(b"x" * ALIGN)
    st = os.stat(other)
    with pytest.raises(OSError, match="not the server's DRAM file"):
        SharedMapping(SharedFile(str(other), ALIGN, st.st_dev, st.st_ino + 1))
    with pytest.raises(OSError, match="shorter"):
        SharedMapping(SharedFile(str(other), 2 * ALIGN, st.st_dev, st.st_ino))
    with pytest.raises(OSError):
        SharedMapping(SharedFile(str(tmp_path / "gone"), ALIGN, 0, 0))


def test_map_replies_parse_strictly() -> None:
    """A MAP reply gives capacity, identity and path; one without a path is a ProtocolError."""
    shared = parse_map_reply(MAP_INFO.pack(8192, 3, 4) + b"/proc/1/fd/3")
    assert shared == SharedFile("/proc/1/fd/3", 8192, 3, 4)
    with pytest.raises(ProtocolError):
        parse_map_reply(MAP_INFO.pack(8192, 3, 4))
    with pytest.raises(ProtocolError):
        parse_map_reply(MAP_INFO.pack(8192, 3, 4) + b"\xff")


@pytest.mark.parametrize(
    ("host", "local"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("10.0.0.5", False), ("h1", False)],
)
def test_only_loopback_servers_are_asked_to_map(host: str, local: bool) -> None:
    """Only a server on this machine's loopback address can share its file with us."""
    assert is_loopback(host) is local
