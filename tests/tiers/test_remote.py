"""The remote tier: rendezvous placement, one lookup round trip per server, misses (never
exceptions) while a server is down, reconnection after it comes back, thread safety."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.server.conftest import recv_n, server_store

import kvtier
from kvtier.bench.remote_io import free_port
from kvtier.config import Endpoint, parse_remote
from kvtier.protocol import (
    HEADER_BYTES,
    LIMITS,
    Header,
    Limits,
    Op,
    Status,
    pack_header,
    parse_header,
)
from kvtier.server.server import ServerThread
from kvtier.tiers.remote import RemoteTier, owner


def _keys(n: int, tag: bytes = b"k") -> list[bytes]:
    return [hashlib.blake2b(tag + b"%d" % i, digest_size=16).digest() for i in range(n)]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerThread]]:
    handles = [ServerThread(server_store(tmp_path, f"s{i}")) for i in range(3)]
    yield handles
    for handle in handles:
        handle.stop()
        handle.server.store.close()


def _url(handles: list[ServerThread]) -> str:
    return "kvtier://" + ",".join(f"127.0.0.1:{h.port}" for h in handles)


def test_adding_a_server_moves_about_one_nth_of_the_keys() -> None:
    """Going from 4 to 5 servers moves ~1/5 of the keys, all of them to the new server."""
    four = [Endpoint(f"10.0.0.{i}", 7400) for i in range(4)]
    five = [*four, Endpoint("10.0.0.9", 7400)]
    keys = _keys(20000)
    moved = [k for k in keys if owner(four, k) != owner(five, k)]
    assert 0.17 < len(moved) / len(keys) < 0.23
    assert all(owner(five, k) == 4 for k in moved)
    shares = np.bincount([owner(five, k) for k in keys], minlength=5) / len(keys)
    assert shares.min() > 0.17 and shares.max() < 0.23


def test_prefix_over_several_servers_is_one_request_each(servers: list[ServerThread]) -> None:
    """contains_prefix combines per-server answers and sends each server one request."""
    tier = RemoteTier(parse_remote(_url(servers)), None)
    keys = _keys(60)
    data = memoryview(bytes(1000))
    for i, key in enumerate(keys):
        if i != 41:
            assert tier.put(key, [data])
    before = [h.server.counters["requests_exists_prefix"] for h in servers]
    assert tier.contains_prefix(keys) == 41
    after = [h.server.counters["requests_exists_prefix"] for h in servers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert tier.contains_prefix(keys[:41]) == 41
    tier.close()


def _save_until_found(store: kvtier.Store, cache: Any, kv: np.ndarray, wait_s: float) -> None:
    """Saves `kv` for tokens 0-7 until the store finds all of them (200 tries), then checks
    they load back."""
    for _ in range(200):
        if cache.lookup(range(8)) == 8:
            break
        cache.save(range(8), kv)
        store.flush()
        threading.Event().wait(wait_s)
    np.testing.assert_array_equal(cache.load(range(8)), kv)


def test_a_down_server_yields_misses_and_is_reconnected(tmp_path: Path) -> None:
    """While its server is down the tier misses without raising; it recovers once it is back."""
    port = free_port()
    url = f"kvtier://127.0.0.1:{port}"
    cfg = kvtier.StoreConfig(chunk_tokens=4, dram_bytes=None, remote=url)
    layout = kvtier.KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
    kv = np.ones(layout.shape(8), np.float32)
    with kvtier.Store(cfg) as store:
        cache = store.bind("m", layout)
        cache.save(range(8), kv)
        store.flush()
        assert cache.lookup(range(8)) == 0
        with pytest.raises(kvtier.ChunkMissing):
            cache.load(range(8))
        assert store.stats().tier("remote").errors >= 1
        handle = ServerThread(server_store(tmp_path), port=port)
        try:
            _save_until_found(store, cache, kv, 0.05)  # backoff is at most a few seconds
        finally:
            handle.stop()
            handle.server.store.close()
        assert cache.lookup(range(8)) == 0, "stopped again: a miss, not an exception"


def test_threads_share_the_connection_pool(servers: list[ServerThread]) -> None:
    """Concurrent puts and gets from many threads all return their own bytes."""
    tier = RemoteTier(parse_remote(_url(servers)), None)
    errors: list[str] = []

    def work(t: int) -> None:
        for i, key in enumerate(_keys(20, b"t%d:" % t)):
            data = np.full(3000 + i, t * 7 + i, np.uint8)
            out = np.zeros_like(data)
            if not (tier.put(key, [memoryview(data)]) and tier.get_into(key, [memoryview(out)])):
                errors.append(f"thread {t} key {i} missing")
            elif not np.array_equal(out, data):
                errors.append(f"thread {t} key {i} wrong bytes")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert tier.stats().errors == 0
    tier.close()


Answer = Callable[[Header], tuple[int, bytes]]


class FakeServer:
    """A scripted kvtier peer on 127.0.0.1: answers each request frame with `answer(header)`
    (status, payload); sets `closed` when the client closes its connection."""

    def __init__(self, answer: Answer) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.closed = threading.Event()
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            try:
                while True:
                    header = parse_header(recv_n(conn, HEADER_BYTES))
                    recv_n(conn, header.body_bytes)
                    status, payload = self._answer(header)
                    reply = pack_header(header.opcode, header.request_id, 0, len(payload), status)
                    conn.sendall(reply + payload)
            except (OSError, ConnectionError):
                self.closed.set()

    def stop(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)


def _hello_then(status: int) -> Answer:
    def answer(header: Header) -> tuple[int, bytes]:
        return (Status.OK, b"tenant") if header.opcode == Op.HELLO else (status, b"odd")

    return answer


def test_unknown_reply_status_is_a_counted_miss() -> None:
    """A reply with a status this client does not know is a miss and an error, not a crash."""
    fake = FakeServer(_hello_then(250))
    try:
        tier = RemoteTier(parse_remote(f"kvtier://127.0.0.1:{fake.port}"), None)
        assert tier.contains_prefix(_keys(3)) == 0
        assert tier.stats().errors == 1
        tier.close()
    finally:
        fake.stop()


def test_rejected_token_on_a_later_server_closes_the_earlier_sockets() -> None:
    """An AuthError from the second server does not leak the first server's pooled socket."""
    good = FakeServer(_hello_then(Status.OK))
    bad = FakeServer(lambda header: (Status.AUTH_FAILED, b"token rejected"))
    url = parse_remote(f"kvtier://127.0.0.1:{good.port},127.0.0.1:{bad.port}")
    try:
        with pytest.raises(kvtier.AuthError) as raised:
            RemoteTier(url, "wrong")
        assert good.closed.wait(timeout=5), "the first server's socket was left open"
        assert isinstance(raised.value, kvtier.AuthError)  # the traceback is still alive here
    finally:
        good.stop()
        bad.stop()


def test_a_hung_server_yields_quick_misses() -> None:
    """A server that accepts TCP but never answers makes Store() and lookups miss within the
    short reply timeout (not the transfer timeout), and no request is sent while backing off."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as hung:  # never accept()ed
        url = f"kvtier://127.0.0.1:{hung.getsockname()[1]}"
        layout = kvtier.KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
        start = time.monotonic()
        store = kvtier.Store(kvtier.StoreConfig(chunk_tokens=4, dram_bytes="1MiB", remote=url))
        with store:
            cache = store.bind("m", layout)
            assert cache.lookup(range(8)) == 0
            assert store.stats().tier("remote").errors >= 1, "the failed handshake is counted"
            cache.save(range(8), np.ones(layout.shape(8), np.float32))
            store.flush()  # the remote put does not wait for the hung server
            assert cache.lookup(range(8)) == 8
            assert time.monotonic() - start < 5, "stalled on the hung server"
        tier = RemoteTier(parse_remote(url), None, timeout_s=0.2)
        assert tier.stats().errors == 1
        assert tier.contains_prefix(_keys(2)) == 0
        assert tier.stats().errors == 1, "no new attempt during the backoff window"
        tier.close()


def test_a_chunk_at_the_wire_limit_round_trips(tmp_path: Path) -> None:
    """A chunk of exactly LIMITS.max_chunk_bytes (256 MiB: Llama-3-8B at chunk_tokens=2048)
    is stored and loaded byte-exact; the server stays usable (its frame limit includes the
    key and size that come with the chunk)."""
    size = LIMITS.max_chunk_bytes
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=size + (16 << 20)))
    handle = ServerThread(store)
    tier = RemoteTier(parse_remote(handle.url), None)
    try:
        data = np.zeros(size, dtype=np.uint8)  # (chunk bytes,)
        data[::4093] = 7
        data[-1] = 9
        assert tier.put(b"L" * 16, [memoryview(data)])
        out = np.empty_like(data)
        assert tier.get_into(b"L" * 16, [memoryview(out)])
        assert np.array_equal(out, data)
        assert tier.put(b"s" * 16, [memoryview(bytes(4096))])
        assert tier.stats().errors == 0
    finally:
        tier.close()
        handle.stop()
        store.close()


def test_an_oversized_chunk_is_refused_locally_without_backing_off(
    servers: list[ServerThread],
) -> None:
    """A chunk over the wire limit is an error counted by the client, sent nowhere; the
    server is not backed off, so the next chunk is stored."""
    tier = RemoteTier(parse_remote(servers[0].url), None)
    try:
        bytes_in = servers[0].server.counters["bytes_in"]
        huge = np.zeros(LIMITS.max_chunk_bytes + 1, dtype=np.uint8)  # never touched: lazy
        assert not tier.put(b"h" * 16, [memoryview(huge)])
        assert not tier.get_into(b"h" * 16, [memoryview(huge)])
        assert servers[0].server.counters["bytes_in"] == bytes_in, "nothing was sent"
        assert tier.stats().errors == 2
        assert tier.put(b"k" * 16, [memoryview(bytes(4096))])
    finally:
        tier.close()


def test_an_error_reply_closes_the_connection_but_does_not_back_off(tmp_path: Path) -> None:
    """A server that refuses one request (here: a chunk size over its own, smaller limit)
    answers an error; the client counts it and keeps using the server right away."""
    handle = ServerThread(server_store(tmp_path), limits=Limits(max_chunk_bytes=64 << 10))
    tier = RemoteTier(parse_remote(handle.url), None)
    try:
        assert not tier.get_into(b"g" * 16, [memoryview(bytearray(128 << 10))])
        assert tier.stats().errors == 1
        assert tier.put(b"k" * 16, [memoryview(bytes(4096))]), "not backed off"
    finally:
        tier.close()
        handle.stop()
        handle.server.store.close()


@pytest.mark.parametrize("squatter", [False, True])
def test_a_located_server_that_moves_is_found_again(
    tmp_path: Path, squatter: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store given `locate_remote` (as engines are, for the node-local process) follows
    its server to a new port and token once the old one is gone, or once another server on
    its old port rejects its token, at once (not after its backoff, made 30 s here): misses
    meanwhile, never an exception; `locate` is not asked while the server answers."""
    from kvtier.server.auth import Auth
    from kvtier.tiers import link

    monkeypatch.setattr(link, "BACKOFF_S", (30.0, 30.0))

    def serve(name: str, token: str, port: int = 0) -> ServerThread:
        auth = Auth({hashlib.sha256(token.encode()).digest(): "engine"})
        return ServerThread(server_store(tmp_path, name), auth, port=port)

    old, new = serve("old", "token-old"), serve("new", "token-new")
    servers = [old, new]
    where = {"url": f"kvtier://127.0.0.1:{old.port}", "token": "token-old"}
    asked = []

    def locate() -> tuple[str, str]:
        asked.append(time.monotonic())
        return where["url"], where["token"]

    cfg = kvtier.StoreConfig(
        chunk_tokens=4, dram_bytes=None, remote=where["url"], remote_token=where["token"]
    )
    layout = kvtier.KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
    kv = np.ones(layout.shape(8), np.float32)
    try:
        with kvtier.Store(cfg, locate_remote=locate) as store:
            cache = store.bind("m", layout)
            cache.save(range(8), kv)
            store.flush()
            assert cache.lookup(range(8)) == 8 and not asked
            old.stop()
            if squatter:
                servers.append(serve("squatter", "token-squatter", old.port))
            where.update(url=f"kvtier://127.0.0.1:{new.port}", token="token-new")
            _save_until_found(store, cache, kv, 0.02)  # the old chunks went with their server
            assert new.server.store.stats().tier("dram").chunks == 2
            assert asked
    finally:
        for handle in servers:
            handle.stop()
            handle.server.store.close()


def test_only_a_single_kvtier_server_can_be_located(servers: list[ServerThread]) -> None:
    with pytest.raises(kvtier.ConfigError, match="one server"):
        kvtier.Store(kvtier.StoreConfig(remote=_url(servers)), locate_remote=lambda: ("", ""))
