"""Malformed, oversized and truncated frames close only their own connection; a client killed
mid-PUT leaves no chunk behind; memory stays within the frame limits."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.server.conftest import read_frame, read_until_closed, server_store

import kvtier
from kvtier.config import parse_remote
from kvtier.protocol import HEADER, MAGIC, SIZE, VERSION, Limits, Op, Status, pack_header
from kvtier.server.auth import tenant_key
from kvtier.server.server import ServerThread
from kvtier.tiers.remote import RemoteTier

LIMITS = Limits(max_keys=64, max_chunk_bytes=1 << 20)
GOOD_KEY = b"g" * 16
GOOD_DATA = np.arange(4096, dtype=np.uint8)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, RemoteTier]]:
    store = server_store(tmp_path_factory.mktemp("srv"))
    handle = ServerThread(store, limits=LIMITS)
    good = RemoteTier(parse_remote(handle.url), None)
    assert good.put(GOOD_KEY, [memoryview(GOOD_DATA)])
    yield handle, good
    good.close()
    handle.stop()
    store.close()


def _good_client_works(good: RemoteTier) -> None:
    out = np.zeros_like(GOOD_DATA)
    assert good.contains_prefix([GOOD_KEY]) == 1
    assert good.get_into(GOOD_KEY, [memoryview(out)])
    np.testing.assert_array_equal(out, GOOD_DATA)


def _send_and_drain(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        with contextlib.suppress(OSError):  # the server may have closed it already
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        try:
            return read_until_closed(sock)
        except ConnectionResetError:
            return b""


headers = st.builds(
    lambda magic, version, op, status, rid, n, payload: HEADER.pack(
        magic, version, op, status, rid, n, payload
    ),
    st.sampled_from([MAGIC, b"XXXX"]),
    st.sampled_from([VERSION, 0, 255]),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 2**64 - 1),
)
frames = st.one_of(
    st.binary(max_size=200),
    st.tuples(headers, st.binary(max_size=300)).map(lambda p: p[0] + p[1]),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=frames)
def test_malformed_frames_never_disturb_other_clients(
    limited: tuple[ServerThread, RemoteTier], data: bytes
) -> None:
    """Random, oversized, truncated or unknown-opcode frames: a good client keeps working."""
    handle, good = limited
    _send_and_drain(handle.port, data)
    _good_client_works(good)


def test_oversized_frame_is_refused_before_its_body_is_read(
    limited: tuple[ServerThread, RemoteTier],
) -> None:
    """A header declaring more than the frame limit gets an error and a closed connection."""
    handle, good = limited
    with socket.create_connection(("127.0.0.1", handle.port), 5) as sock:
        sock.sendall(pack_header(Op.PUT, 9, 1, 1 << 40))
        header, body = read_frame(sock)
        assert header.status == Status.ERROR and b"limit" in body
        assert read_until_closed(sock) == b""
    _good_client_works(good)


def test_unknown_opcode_closes_only_that_connection(
    limited: tuple[ServerThread, RemoteTier],
) -> None:
    """A bad opcode closes its connection; an already open good connection is untouched."""
    handle, good = limited
    with socket.create_connection(("127.0.0.1", handle.port), 5) as other:
        reply = _send_and_drain(handle.port, pack_header(99, 1, 0, 0))
        assert b"unknown opcode" in reply
        other.sendall(pack_header(Op.PING, 7, 0, 0))
        header, _ = read_frame(other)
        assert header.request_id == 7 and header.status == Status.OK
    _good_client_works(good)


def _half_put(key: bytes, size: int) -> bytes:
    head = pack_header(Op.PUT, 1, 1, SIZE.size + size) + key + SIZE.pack(size)
    return head + b"\x07" * (size // 2)


def test_half_put_then_close_leaves_no_chunk(limited: tuple[ServerThread, RemoteTier]) -> None:
    """A PUT cut off mid-payload stores nothing, not even a partial chunk."""
    handle, good = limited
    key = b"h" * 16
    _send_and_drain(handle.port, _half_put(key, 8192))
    assert good.contains_prefix([key]) == 0
    assert not good.get_into(key, [memoryview(bytearray(8192))])
    assert not good.get_into(key, [memoryview(bytearray(4096))])
    _good_client_works(good)


def test_client_killed_mid_put_leaves_no_chunk(
    limited: tuple[ServerThread, RemoteTier], tmp_path: Path
) -> None:
    """A client process SIGKILLed after sending half a PUT leaves nothing visible."""
    handle, good = limited
    key = b"q" * 16
    script = (
        "import socket, sys, time\n"
        f"s = socket.create_connection(('127.0.0.1', {handle.port}))\n"
        "from tests.server.test_robustness import _half_put\n"
        f"s.sendall(_half_put({key!r}, 65536))\n"
        "print('sent', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        assert good.contains_prefix([key]) == 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert good.contains_prefix([key]) == 0
    assert not good.get_into(key, [memoryview(bytearray(65536))])
    _good_client_works(good)


def test_put_whose_sizes_disagree_with_its_payload_is_refused(
    limited: tuple[ServerThread, RemoteTier],
) -> None:
    """PUT sizes that do not add up to the payload close the connection; nothing is stored."""
    handle, good = limited
    key = b"z" * 16
    frame = pack_header(Op.PUT, 1, 1, 8 + 100) + key + struct.pack("<Q", 50) + b"\x01" * 100
    assert b"PUT sizes" in _send_and_drain(handle.port, frame)
    assert good.contains_prefix([key]) == 0
    _good_client_works(good)


def test_get_whose_reply_exceeds_the_frame_limit_is_refused(
    limited: tuple[ServerThread, RemoteTier],
) -> None:
    """A GET of chunks that together exceed the frame limit gets an error and a closed
    connection, so one request cannot pin more than a frame's worth of DRAM."""
    handle, good = limited
    sizes = [LIMITS.max_chunk_bytes] * 3  # each allowed, together over the frame limit
    keys = b"".join(bytes([i]) * 16 for i in range(3))
    frame = pack_header(Op.GET, 1, 3, 8 * 3) + keys + struct.pack("<3Q", *sizes)
    reply = _send_and_drain(handle.port, frame)
    assert b"fewer chunks per GET" in reply
    _good_client_works(good)


def test_client_that_never_reads_its_get_loses_the_connection_and_its_pins() -> None:
    """A GET whose reply is never read is dropped after drain_timeout_s and its chunk is
    unpinned (a delete then frees it)."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=64 << 20))
    handle = ServerThread(store, limits=Limits(drain_timeout_s=0.3))
    key, size = b"p" * 16, 32 << 20
    try:
        writer = RemoteTier(parse_remote(handle.url), None)
        assert writer.put(key, [memoryview(bytes(size))])
        writer.close()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", handle.port))
            sock.sendall(pack_header(Op.GET, 1, 1, 8) + key + SIZE.pack(size))
            deadline = time.monotonic() + 10
            while handle.server.counters["bytes_out"] < size and time.monotonic() < deadline:
                time.sleep(0.01)  # until the reply (pinned views) is queued on the transport
            assert store.delete_chunk(tenant_key("", key))
            while store.stats().tier("dram").chunks and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.stats().tier("dram").chunks == 0, "the unread GET still pins its chunk"
        assert handle.server.counters["drain_timeouts"] == 1
    finally:
        handle.stop()
        store.close()
