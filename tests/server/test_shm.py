"""The same-host fast path: MAP, GET_LOCAL and RELEASE against a real server whose DRAM tier
lives in a shared file, and the remote tier's loads through that mapping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.server.conftest import read_frame, server_store

import kvtier
from kvtier.config import parse_remote
from kvtier.keys import Key
from kvtier.pool import aligned
from kvtier.protocol import COUNT, SIZE, Header, Limits, Op, Status, pack_header
from kvtier.server.auth import Auth, tenant_key
from kvtier.server.server import ServerThread
from kvtier.tiers.remote import RemoteTier

CHUNK = 64 << 10
TOKENS = {"alice": "alice-token", "bob": "bob-token-1"}


def _store(tmp_path: Path, dram_chunks: int = 16, disk: bool = True) -> kvtier.Store:
    (tmp_path / "shm").mkdir(exist_ok=True)
    lower: dict[str, object] = {"disk_dir": tmp_path / "disk", "disk_bytes": 8 << 20}
    return kvtier.Store(
        kvtier.StoreConfig(
            dram_bytes=dram_chunks * CHUNK,
            dram_shm=tmp_path / "shm",
            **(lower if disk else {}),  # type: ignore[arg-type]
        )
    )


def _serve(tmp_path: Path, store: kvtier.Store) -> ServerThread:
    path = tmp_path / "auth"
    path.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    return ServerThread(store, auth=Auth.from_file(path))


@pytest.fixture
def shm_server(tmp_path: Path) -> Iterator[ServerThread]:
    handle = _serve(tmp_path, _store(tmp_path))
    yield handle
    handle.stop()
    handle.server.store.close()


def _key(i: int) -> Key:
    return i.to_bytes(16, "little")


def _chunk(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, CHUNK, dtype=np.uint8)


def _tier(handle: ServerThread, tenant: str = "alice") -> RemoteTier:
    return RemoteTier(parse_remote(handle.url), TOKENS[tenant])


def _dram_bytes(handle: ServerThread) -> int:
    return handle.server.store.stats().tier("dram").bytes


class RawClient:
    """A bare socket speaking the protocol, to hold pins without the remote tier's care."""

    def __init__(self, handle: ServerThread, tenant: str = "alice") -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", handle.port))
        header, _ = self.call(Op.HELLO, [], TOKENS[tenant].encode())
        assert header.status == Status.OK

    def call(self, op: Op, keys: list[Key], payload: bytes = b"") -> tuple[Header, bytes]:
        self.sock.sendall(pack_header(op, 1, len(keys), len(payload)) + b"".join(keys) + payload)
        return read_frame(self.sock)

    def get_local(self, keys: list[Key]) -> bytes:
        header, body = self.call(Op.GET_LOCAL, keys, SIZE.pack(CHUNK) * len(keys))
        assert header.status == Status.OK
        return body


def test_load_through_the_shared_mapping_is_byte_exact(shm_server: ServerThread) -> None:
    """A chunk loaded by a same-host client is copied from the server's shared DRAM file
    (GET_LOCAL + RELEASE, no GET), byte for byte, into one view or scattered over several,
    and leaves no pin behind."""
    tier = _tier(shm_server)
    data = _chunk(1)
    assert tier.put(_key(1), [memoryview(data)])
    out = np.zeros(CHUNK, dtype=np.uint8)
    assert tier.get_into(_key(1), [memoryview(out)])
    assert np.array_equal(out, data)
    out[:] = 0
    rows = out.reshape(4, -1)
    assert tier.get_into(_key(1), [memoryview(row) for row in rows])
    assert np.array_equal(out, data)
    assert tier.stats().hits == 2  # STATS follows the last RELEASE on its connection
    counters = shm_server.server.counters
    assert counters["requests_get_local"] == 2 and counters["requests_release"] == 2
    assert counters["requests_get"] == 0
    assert counters["connections_total"] == 1  # one pooled connection, its replies settled
    store = shm_server.server.store
    store.flush()
    assert store.delete_chunk(tenant_key("alice", _key(1)))
    assert _dram_bytes(shm_server) == 0  # no pin left behind by the client
    tier.close()
    shm_server.server.store.check_integrity()


def test_a_server_without_shared_dram_is_loaded_with_get(tmp_path: Path) -> None:
    """MAP is answered UNSUPPORTED by a server whose DRAM is not shared: the client keeps that
    connection and loads with plain GET, correctly."""
    store = server_store(tmp_path)
    handle = ServerThread(store)
    try:
        tier = RemoteTier(parse_remote(handle.url), None)
        data = _chunk(2)
        assert tier.put(_key(2), [memoryview(data)])
        out = np.zeros(CHUNK, dtype=np.uint8)
        assert tier.get_into(_key(2), [memoryview(out)])
        assert np.array_equal(out, data)
        counters = handle.server.counters
        assert counters["requests_map"] == 1 and counters["requests_get_local"] == 0
        assert counters["requests_get"] == 1 and counters["connections_total"] == 1
        tier.close()
    finally:
        handle.stop()
        store.close()


def test_release_unpins(shm_server: ServerThread) -> None:
    """GET_LOCAL pins the chunk for the connection (a delete cannot free it) until RELEASE."""
    tier = _tier(shm_server)
    assert tier.put(_key(3), [memoryview(_chunk(3))])
    shm_server.server.store.flush()
    client = RawClient(shm_server)
    reply = client.get_local([_key(3)])
    assert reply[0] == 1 and len(reply) == 1 + SIZE.size
    assert shm_server.server.store.delete_chunk(tenant_key("alice", _key(3)))
    assert _dram_bytes(shm_server) == aligned(CHUNK)  # pinned: still held
    header, body = client.call(Op.RELEASE, [_key(3), _key(4)])
    assert header.status == Status.OK and COUNT.unpack(body) == (1,)
    assert _dram_bytes(shm_server) == 0
    shm_server.server.store.check_integrity()
    client.sock.close()
    tier.close()


KILLED_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    from kvtier.protocol import HEADER_BYTES, SIZE, Op, pack_header
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    def call(op, keys, payload):
        sock.sendall(pack_header(op, 1, len(keys), len(payload)) + b"".join(keys) + payload)
        head = sock.recv(HEADER_BYTES, socket.MSG_WAITALL)
        n = int.from_bytes(head[-8:], "little")
        return sock.recv(n, socket.MSG_WAITALL) if n else b""
    call(Op.HELLO, [], sys.argv[2].encode())
    keys = [i.to_bytes(16, "little") for i in (5, 6)]
    print(call(Op.GET_LOCAL, keys, SIZE.pack(int(sys.argv[3])) * 2)[:2].hex(), flush=True)
    time.sleep(60)
    """
)


def test_a_killed_client_leaks_no_pins(shm_server: ServerThread) -> None:
    """A client process killed (SIGKILL) while holding GET_LOCAL pins loses them when its
    connection closes: the chunks can be freed again."""
    tier = _tier(shm_server)
    for i in (5, 6):
        assert tier.put(_key(i), [memoryview(_chunk(i))])
    store = shm_server.server.store
    store.flush()
    args = [str(shm_server.port), TOKENS["alice"], str(CHUNK)]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "0101"  # both found and pinned
    for i in (5, 6):
        assert store.delete_chunk(tenant_key("alice", _key(i)))
    assert _dram_bytes(shm_server) == 2 * aligned(CHUNK)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while _dram_bytes(shm_server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _dram_bytes(shm_server) == 0
    store.check_integrity()
    tier.close()


def test_another_tenant_cannot_get_local_a_chunk(shm_server: ServerThread) -> None:
    """GET_LOCAL looks keys up in the caller's tenant key space, as GET does: bob finds
    nothing of alice's, through the remote tier or a raw request, and pins nothing."""
    alice, bob = _tier(shm_server, "alice"), _tier(shm_server, "bob")
    assert alice.put(_key(7), [memoryview(_chunk(7))])
    out = np.zeros(CHUNK, dtype=np.uint8)
    assert not bob.get_into(_key(7), [memoryview(out)])
    assert not out.any()
    raw = RawClient(shm_server, "bob")
    assert raw.get_local([_key(7)]) == b"\x00"
    assert alice.get_into(_key(7), [memoryview(out)])
    assert bob.stats().misses == 1
    raw.sock.close()
    alice.close()
    bob.close()


def test_evicted_and_unknown_chunks_are_misses(tmp_path: Path) -> None:
    """Without a disk tier, a chunk evicted from DRAM, and a key never stored, are counted
    misses, once each (after a GET_LOCAL miss the client asks whether the server holds the
    chunk at all, and, as it does not, sends no GET); the chunks still held load correctly,
    over the mapping alone."""
    handle = _serve(tmp_path, _store(tmp_path, dram_chunks=4, disk=False))
    try:
        tier = _tier(handle)
        for i in range(6):
            assert tier.put(_key(i), [memoryview(_chunk(i))])
        out = np.zeros(CHUNK, dtype=np.uint8)
        assert not tier.get_into(_key(0), [memoryview(out)])
        assert not tier.get_into(_key(99), [memoryview(out)])
        assert tier.get_into(_key(5), [memoryview(out)])
        assert np.array_equal(out, _chunk(5))
        stats = tier.stats()
        assert (stats.hits, stats.misses, stats.errors) == (1, 2, 0)
        assert handle.server.counters["requests_get"] == 0
        assert handle.server.store.stats().tier("dram").misses == 2
        tier.close()
        handle.server.store.check_integrity()
    finally:
        handle.stop()
        handle.server.store.close()


def test_a_chunk_on_disk_is_promoted_or_copied_when_dram_is_pinned_full(
    tmp_path: Path,
) -> None:
    """GET_LOCAL of a chunk evicted to disk promotes it into DRAM and serves it from the
    mapping; while every DRAM slot is pinned by another client it cannot, and the GET asked
    after that miss serves a copy read straight from disk."""
    handle = _serve(tmp_path, _store(tmp_path, dram_chunks=2))
    try:
        tier = _tier(handle)
        for i in range(4):
            assert tier.put(_key(i), [memoryview(_chunk(i))])
        handle.server.store.flush()
        out = np.zeros(CHUNK, dtype=np.uint8)
        assert tier.get_into(_key(0), [memoryview(out)])  # from disk, through DRAM
        assert np.array_equal(out, _chunk(0))
        hog = RawClient(handle)
        assert hog.get_local([_key(0), _key(1)])[:2] == b"\x01\x01"  # both slots pinned
        gets = handle.server.counters["requests_get"]
        assert tier.get_into(_key(2), [memoryview(out)])
        assert np.array_equal(out, _chunk(2))
        assert handle.server.counters["requests_get"] == gets + 1
        assert handle.server.store.acquire_chunk(_key(2), CHUNK, promote=False) is None
        hog.sock.close()
        tier.close()
    finally:
        handle.stop()
        handle.server.store.close()


def test_acquire_without_promotion_only_pins_dram_chunks(tmp_path: Path) -> None:
    """Store.acquire_chunk(promote=False), which the server runs on its event loop, pins a
    chunk already in DRAM, returns None (counting no miss) for one only on disk, and leaves
    that one to the promoting call, which counts the miss once."""
    with _store(tmp_path, dram_chunks=2) as store:
        for i in range(4):
            store.write_chunk(_key(i), [memoryview(_chunk(i))])
        store.flush()
        assert store.acquire_chunk(_key(0), CHUNK, promote=False) is None
        assert store.stats().tier("dram").misses == 0
        got = store.acquire_chunk(_key(0), CHUNK)
        assert got is not None and got.tier == "disk"
        store.release_chunk(_key(0))
        hit = store.acquire_chunk(_key(0), CHUNK, promote=False)
        assert hit is not None and bytes(hit.view) == _chunk(0).tobytes()
        store.release_chunk(_key(0))
        dram = store.stats().tier("dram")
        assert (dram.hits, dram.misses) == (1, 1)
        store.check_integrity()


def test_a_connection_may_hold_at_most_max_keys_pins(tmp_path: Path) -> None:
    """A GET_LOCAL that would take a connection past `max_keys` pins is refused with an error
    and closes that connection, whose pins are then released."""
    store = _store(tmp_path)
    handle = ServerThread(store, limits=Limits(max_keys=2))
    try:
        tier = RemoteTier(parse_remote(handle.url), None)
        for i in range(3):
            assert tier.put(_key(i), [memoryview(_chunk(i))])
        store.flush()
        raw = RawClient(handle)
        assert raw.get_local([_key(0), _key(1)])[:2] == b"\x01\x01"
        header, body = raw.call(Op.GET_LOCAL, [_key(2)], SIZE.pack(CHUNK))
        assert header.status == Status.ERROR and b"pinned by one connection" in body
        for i in range(2):
            assert store.delete_chunk(tenant_key("", _key(i)))
        deadline = time.monotonic() + 30
        while _dram_bytes(handle) > aligned(CHUNK) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _dram_bytes(handle) == aligned(CHUNK)  # only chunk 2 is left
        raw.sock.close()
        tier.close()
    finally:
        handle.stop()
        store.close()


def test_a_same_host_server_names_the_tier_of_each_chunk(tmp_path: Path) -> None:
    """LOCATE answers the server's own tier per leading chunk present (DRAM, or disk once
    evicted there), in the caller's key space; a client that has not mapped the server (so
    may be on another host) calls all of them remote, and a client store passes the names
    on through `locate`."""
    store = _store(tmp_path, dram_chunks=4)
    handle = _serve(tmp_path, store)
    try:
        tier = _tier(handle)
        keys = [_key(i) for i in range(7)]
        for i, key in enumerate(keys[:6]):
            assert tier.put(key, [memoryview(_chunk(i))])
        store.flush()
        assert tier.locate(keys) == ("disk", "disk") + ("dram",) * 4
        far = RemoteTier(parse_remote(handle.url), TOKENS["alice"], local_map=False)
        assert far.locate(keys) == ("remote",) * 6
        raw = RawClient(handle, "bob")
        header, body = raw.call(Op.LOCATE, keys)
        assert header.status == Status.OK and body == b""
        raw.sock.close()
        client = kvtier.Store(
            kvtier.StoreConfig(dram_bytes=None, remote=handle.url, remote_token=TOKENS["alice"])
        )
        assert client.locate(keys).tiers == ("disk", "disk") + ("dram",) * 4
        client.close()
        for t in (tier, far):
            t.close()
    finally:
        handle.stop()
        store.close()
