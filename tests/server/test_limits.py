"""Resource bounds of the server: a shared receive budget whatever headers announce, timeouts
for silent, idle and stalled connections, a connection cap that a flood cannot use to lock out
a client with a token, and slow answers to wrong tokens."""

from __future__ import annotations

import json
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.server.conftest import read_frame, server_store

import kvtier
from kvtier.bench.remote_io import ServeProcess
from kvtier.config import parse_remote
from kvtier.protocol import SIZE, Op, Status, pack_header
from kvtier.server.admission import ServerPolicy
from kvtier.server.auth import Auth
from kvtier.server.server import ServerThread
from kvtier.tiers.remote import RemoteTier

TOKEN = "alice-token-1"
DATA = np.arange(4096, dtype=np.uint8) % 251


def _auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth"
    path.write_text(f"alice {TOKEN}\n")
    return path


def _put_header(key: bytes, chunk_bytes: int) -> bytes:
    """A PUT's header, key and size: everything but the chunk itself."""
    return pack_header(Op.PUT, 1, 1, SIZE.size + chunk_bytes) + key + SIZE.pack(chunk_bytes)


def _works(tier: RemoteTier, key: bytes = b"w" * 16) -> None:
    """A put, a lookup and a byte-exact get all succeed."""
    assert tier.put(key, [memoryview(DATA)])
    assert tier.contains_prefix([key]) == 1
    out = np.zeros_like(DATA)
    assert tier.get_into(key, [memoryview(out)])
    np.testing.assert_array_equal(out, DATA)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _server_counters(port: int) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(pack_header(Op.STATS, 1, 0, 0))
        _, body = read_frame(sock)
    counters: dict[str, int] = json.loads(body)["server"]
    return counters


def _wait_for(condition: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_announced_puts_do_not_grow_memory_beyond_the_receive_budget() -> None:
    """12 connections announcing 24 MiB PUTs and sending no body grow the server's resident
    memory by less than its 32 MiB receive budget (+ margin); a good client still works."""
    budget, chunk = 32 << 20, 24 << 20
    with ServeProcess("--dram", "8MiB", "--recv-budget", "32MiB") as server:
        before = _rss_bytes(server.proc.pid)
        attackers = [socket.create_connection(("127.0.0.1", server.port), 5) for _ in range(12)]
        try:
            for i, sock in enumerate(attackers):
                sock.sendall(_put_header(bytes([i]) * 16, chunk))
            header_bytes = len(_put_header(b"k" * 16, chunk))
            _wait_for(
                lambda: _server_counters(server.port).get("bytes_in", 0) >= 12 * header_bytes,
                "the server read every header",
            )
            grown = _rss_bytes(server.proc.pid) - before
            assert grown < budget + (64 << 20), f"resident memory grew by {grown >> 20} MiB"
            tier = RemoteTier(parse_remote(server.url), None)
            try:
                _works(tier)
            finally:
                tier.close()
        finally:
            for sock in attackers:
                sock.close()


@pytest.fixture
def tight() -> Iterator[ServerThread]:
    """A server with a 1 MiB receive budget and short timeouts."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=16 << 20))
    policy = ServerPolicy(recv_budget_bytes=1 << 20, stall_timeout_s=0.5, idle_timeout_s=0.5)
    handle = ServerThread(store, policy=policy)
    yield handle
    handle.stop()
    store.close()


def test_a_put_waits_for_budget_and_is_served_once_a_stalled_frame_is_dropped(
    tight: ServerThread,
) -> None:
    """A PUT that finds the budget taken waits (it is not refused); the connection that took
    it and stopped sending is closed after the stall timeout, and the waiting PUT succeeds."""
    with socket.create_connection(("127.0.0.1", tight.port), 5) as stalled:
        stalled.sendall(_put_header(b"s" * 16, 900 << 10))
        _wait_for(lambda: tight.server.budget.used_bytes > 0, "the stalled PUT got the budget")
        tier = RemoteTier(parse_remote(tight.url), None)
        try:
            chunk = np.full(600 << 10, 3, dtype=np.uint8)
            assert tier.put(b"p" * 16, [memoryview(chunk)])
            assert tier.stats().errors == 0
        finally:
            tier.close()
    counters = tight.server.counters
    assert counters["budget_waits"] >= 1 and counters["stall_timeouts"] >= 1
    assert counters["budget_timeouts"] == 0


def test_idle_connections_are_closed_and_the_client_reconnects_without_backing_off(
    tight: ServerThread,
) -> None:
    """A pooled connection closed by the idle timeout is not used again: the next request
    opens a new one and succeeds, with no error counted."""
    tier = RemoteTier(parse_remote(tight.url), None)
    try:
        _works(tier, b"a" * 16)
        _wait_for(lambda: tight.server.counters["idle_timeouts"] >= 1, "an idle timeout")
        _works(tier, b"b" * 16)
        assert tier.stats().errors == 0
    finally:
        tier.close()


def _auth_server(tmp_path: Path, policy: ServerPolicy) -> ServerThread:
    store = server_store(tmp_path)
    return ServerThread(store, auth=Auth.from_file(_auth_file(tmp_path)), policy=policy)


def test_silent_connections_are_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    """A connection that never sends a byte is closed after handshake_timeout_s."""
    handle = _auth_server(tmp_path, ServerPolicy(handshake_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", handle.port), 5) as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b"", "the server closed the silent connection"
        assert handle.server.counters["handshake_timeouts"] == 1
    finally:
        handle.stop()
        handle.server.store.close()


def test_wrong_tokens_are_answered_slowly(tmp_path: Path) -> None:
    """20 wrong HELLOs from one address at once get at most a few answers in 1.5 s (each
    wrong token delays that address's next check by auth_delay_s)."""
    handle = _auth_server(tmp_path, ServerPolicy(auth_delay_s=0.5))
    socks = [socket.create_connection(("127.0.0.1", handle.port), 5) for _ in range(20)]
    try:
        token = b"wrong-token-123"
        for sock in socks:
            sock.sendall(pack_header(Op.HELLO, 1, 0, len(token)) + token)
        answered: set[socket.socket] = set()
        deadline = time.monotonic() + 1.5
        while len(answered) < len(socks) and time.monotonic() < deadline:
            waiting = [s for s in socks if s not in answered]
            readable, _, _ = select.select(waiting, [], [], 0.05)
            answered.update(readable)
        assert 1 <= len(answered) <= 6, f"{len(answered)} of 20 wrong tokens answered"
        header, _ = read_frame(next(iter(answered)))
        assert header.status == Status.AUTH_FAILED
    finally:
        for sock in socks:
            sock.close()
        handle.stop()
        handle.server.store.close()


def test_a_flood_of_silent_connections_does_not_lock_out_a_client_with_a_token(
    tmp_path: Path,
) -> None:
    """150 silent connections against a server with 96 descriptors and a cap of 20: a client
    with a valid token still connects, logs in and works; the server keeps accepting."""
    args = ("--auth-file", str(_auth_file(tmp_path)), "--max-connections", "20")
    with ServeProcess(*args, "--dram", "8MiB") as server:
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (96, 96))
        flood = []
        try:
            for _ in range(150):
                flood.append(socket.create_connection(("127.0.0.1", server.port), 5))
            for attempt in range(2):
                tier = RemoteTier(parse_remote(server.url), TOKEN)
                try:
                    _works(tier, bytes([attempt]) * 16)
                finally:
                    tier.close()
        finally:
            for sock in flood:
                sock.close()
        assert server.proc.poll() is None, "the server is still running"
