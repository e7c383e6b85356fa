"""The cache server end to end: stores on two 'nodes' sharing chunks, tenants, pipelining."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import LAYOUT, make_kv
from tests.server.conftest import client_config, read_frame, server_store

import kvtier
from kvtier.protocol import COUNT, SIZE, Op, Status, pack_header
from kvtier.server.auth import Auth
from kvtier.server.server import ServerThread

TOKENS = list(range(40))


def test_chunks_saved_by_one_store_load_byte_exact_on_another(
    tmp_path: Path, server: ServerThread
) -> None:
    """A prefix saved through the server by node A is found and loaded byte-exact by node B."""
    kv = make_kv(len(TOKENS))
    with kvtier.Store(client_config(tmp_path, server.url, "a")) as a:
        a.bind("m", LAYOUT).save(TOKENS, kv)
    with kvtier.Store(client_config(tmp_path, server.url, "b")) as b:
        cache = b.bind("m", LAYOUT)
        located = cache.locate(TOKENS)
        assert located.chunks == 10 and set(located.tiers) == {"remote"}
        np.testing.assert_array_equal(cache.load(TOKENS), kv)
        assert b.stats().tier("remote").hits == 10


def _auth_server(tmp_path: Path) -> ServerThread:
    path = tmp_path / "auth"
    path.write_text("# tenant token\nalice alice-token-1\nbob bob-token-22\n")
    return ServerThread(server_store(tmp_path), auth=Auth.from_file(path))


def test_tenants_cannot_read_each_others_chunks(tmp_path: Path) -> None:
    """Tenant B sending the very same keys as tenant A finds none of A's chunks."""
    handle = _auth_server(tmp_path)
    try:
        kv = make_kv(len(TOKENS))
        cfg = client_config(tmp_path, handle.url, "a", remote_token="alice-token-1")
        with kvtier.Store(cfg) as a:
            a.bind("m", LAYOUT).save(TOKENS, kv)
        cfg = client_config(tmp_path, handle.url, "b", remote_token="bob-token-22")
        with kvtier.Store(cfg) as b:
            assert b.bind("m", LAYOUT).lookup(TOKENS) == 0
        cfg = client_config(tmp_path, handle.url, "a2", remote_token="alice-token-1")
        with kvtier.Store(cfg) as a2:
            np.testing.assert_array_equal(a2.bind("m", LAYOUT).load(TOKENS), kv)
    finally:
        handle.stop()
        handle.server.store.close()


@pytest.mark.parametrize("token", [None, "wrong-token-123"])
def test_missing_or_wrong_token_is_rejected_clearly(tmp_path: Path, token: str | None) -> None:
    """A wrong or missing token fails Store construction with an AuthError naming the fix."""
    handle = _auth_server(tmp_path)
    try:
        cfg = client_config(tmp_path, handle.url, "x", remote_token=token)
        with pytest.raises(
            kvtier.AuthError, match=r"token rejected by server .*KVTIER_REMOTE_TOKEN"
        ):
            kvtier.Store(cfg)
        with socket.create_connection(("127.0.0.1", handle.port), 5) as raw:
            raw.sendall(pack_header(Op.EXISTS_PREFIX, 1, 1, 0) + b"k" * 16)
            header, _ = read_frame(raw)
            assert header.status == Status.AUTH_REQUIRED
    finally:
        handle.stop()
        handle.server.store.close()


def test_pipelined_requests_are_answered_in_order(server: ServerThread) -> None:
    """Several requests sent at once get their replies in request order, with correct data."""
    key, data = b"k" * 16, bytes(range(256)) * 16
    frames = [
        pack_header(Op.PING, 1, 0, 0),
        pack_header(Op.PUT, 2, 1, 8 + len(data)) + key + SIZE.pack(len(data)) + data,
        pack_header(Op.EXISTS_PREFIX, 3, 2, 0) + key + b"x" * 16,
        pack_header(Op.GET, 4, 1, 8) + key + SIZE.pack(len(data)),
        pack_header(Op.GET, 5, 1, 8) + key + SIZE.pack(len(data) + 1),
        pack_header(Op.STATS, 6, 0, 0),
    ]
    with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        sock.sendall(b"".join(frames))
        replies = [read_frame(sock) for _ in frames]
    assert [h.request_id for h, _ in replies] == [1, 2, 3, 4, 5, 6]
    assert all(h.status == Status.OK for h, _ in replies)
    assert replies[1][1] == b"\x01"
    assert COUNT.unpack(replies[2][1])[0] == 1
    assert replies[3][1] == b"\x01" + data
    assert replies[4][1] == b"\x00", "a GET with another size is a miss"
    assert json.loads(replies[5][1])["server"]["requests_put"] == 1


def test_delete_removes_the_chunk_and_keeps_the_connection_usable(server: ServerThread) -> None:
    """DELETE counts what it removed; the chunk is gone afterwards and the connection works."""
    key, data = b"d" * 16, bytes(range(256)) * 16
    frames = [
        pack_header(Op.PUT, 1, 1, 8 + len(data)) + key + SIZE.pack(len(data)) + data,
        pack_header(Op.DELETE, 2, 2, 0) + key + b"n" * 16,
        pack_header(Op.EXISTS_PREFIX, 3, 1, 0) + key,
        pack_header(Op.DELETE, 4, 1, 0) + key,
        pack_header(Op.PING, 5, 0, 0),
    ]
    with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        sock.sendall(b"".join(frames))
        replies = [read_frame(sock) for _ in frames]
    assert all(h.status == Status.OK for h, _ in replies)
    assert COUNT.unpack(replies[1][1])[0] == 1, "one of the two keys existed"
    assert COUNT.unpack(replies[2][1])[0] == 0, "the deleted chunk is no longer found"
    assert COUNT.unpack(replies[3][1])[0] == 0, "deleting it again removes nothing"
    assert replies[4][0].request_id == 5
