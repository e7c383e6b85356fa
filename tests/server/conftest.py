"""Fixtures: a real cache server on 127.0.0.1 (port 0) over a real Store in tmp_path."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvtier
from kvtier.protocol import HEADER_BYTES, Header, parse_header
from kvtier.server.server import ServerThread


def server_store(tmp_path: Path, name: str = "srv") -> kvtier.Store:
    return kvtier.Store(
        kvtier.StoreConfig(dram_bytes=8 << 20, disk_dir=tmp_path / name, disk_bytes=32 << 20)
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    store = server_store(tmp_path)
    handle = ServerThread(store)
    yield handle
    handle.stop()
    store.close()


def client_config(tmp_path: Path, url: str, name: str, **extra: object) -> kvtier.StoreConfig:
    values: dict[str, object] = {
        "chunk_tokens": 4,
        "dram_bytes": 1 << 20,
        "disk_dir": tmp_path / name,
        "disk_bytes": 4 << 20,
        "remote": url,
    }
    values.update(extra)
    return kvtier.StoreConfig(**values)  # type: ignore[arg-type]


def read_frame(sock: socket.socket) -> tuple[Header, bytes]:
    """One reply frame from a raw socket."""
    head = recv_n(sock, HEADER_BYTES)
    header = parse_header(head)
    return header, recv_n(sock, header.body_bytes)


def recv_n(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += part
    return buf


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while part := sock.recv(65536):
        data += part
    return data
