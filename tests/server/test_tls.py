"""TLS for the kvtier protocol: `kvtier serve --tls-cert/--tls-key`, clients on `kvtiers://`
with `StoreConfig(remote_ca=...)`; every mismatch between the two ends is a clear TLSError.
Certificates are made here, for 127.0.0.1, by a throw-away CA (the `openssl` command)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import LAYOUT, make_kv
from tests.server.conftest import client_config, server_store

import kvtier
from kvtier.bench.certs import Certs, make_certs
from kvtier.bench.remote_io import ServeProcess
from kvtier.config import parse_remote
from kvtier.protocol import SIZE, Limits, Op, pack_header
from kvtier.server.admission import ServerPolicy
from kvtier.server.server import ServerThread
from kvtier.server.tls import server_context
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.tls import client_context

TOKENS = list(range(32))
OTHER = list(range(100, 132))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls_server(
    store: kvtier.Store,
    certs: Certs,
    policy: ServerPolicy | None = None,
    limits: Limits | None = None,
) -> ServerThread:
    context = server_context(certs.cert, certs.key)
    return ServerThread(store, limits=limits, policy=policy, tls=context)


@pytest.fixture
def tls_server(tmp_path: Path, certs: Certs) -> Iterator[ServerThread]:
    store = server_store(tmp_path)
    handle = _tls_server(store, certs)
    yield handle
    handle.stop()
    store.close()


def _remote_only(tmp_path: Path, url: str, **extra: object) -> kvtier.StoreConfig:
    """A client whose every load goes to the server (no local tiers)."""
    return client_config(
        tmp_path, url, "-", dram_bytes=None, disk_dir=None, disk_bytes=None, **extra
    )


def _wait_for(condition: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_chunks_saved_over_tls_load_byte_exact_on_another_store(
    tmp_path: Path, tls_server: ServerThread, certs: Certs
) -> None:
    """A Store on kvtiers:// with remote_ca saves; a second one finds every chunk and loads it
    byte-exact, twice, with a miss in between, and counts no error."""
    assert tls_server.url.startswith("kvtiers://127.0.0.1:")
    kv = make_kv(len(TOKENS))
    with kvtier.Store(client_config(tmp_path, tls_server.url, "a", remote_ca=certs.ca)) as a:
        a.bind("m", LAYOUT).save(TOKENS, kv)
    with kvtier.Store(_remote_only(tmp_path, tls_server.url, remote_ca=certs.ca)) as b:
        cache = b.bind("m", LAYOUT)
        assert cache.lookup([*TOKENS, 5]) == len(TOKENS)
        np.testing.assert_array_equal(cache.load(TOKENS), kv)
        assert cache.lookup(OTHER) == 0
        np.testing.assert_array_equal(cache.load(TOKENS), kv)
        assert b.stats().tier("remote").errors == 0
    assert tls_server.server.counters["requests_get"] >= 2 * len(TOKENS) // 4


def test_large_chunks_round_trip_on_one_pooled_tls_connection(certs: Certs) -> None:
    """Chunks of many TLS records (odd sizes) put and get byte-exact, misses in between, all
    on one pooled connection."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=32 << 20))
    handle = _tls_server(store, certs)
    tier = RemoteTier(parse_remote(handle.url), None, ca=certs.ca)
    try:
        for i, size in enumerate([(1 << 20) + 13, 70_001, 3 << 20]):
            data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
            key = bytes([i + 1]) * 16
            assert tier.put(key, [memoryview(data)])
            out = np.zeros_like(data)
            assert not tier.get_into(b"\xff" * 16, [memoryview(out)])
            assert tier.get_into(key, [memoryview(out)])
            np.testing.assert_array_equal(out, data)
        assert tier.stats().errors == 0
        assert handle.server.counters["connections_total"] == 1
    finally:
        tier.close()
        handle.stop()
        store.close()


def test_a_tls_client_that_never_reads_its_get_loses_the_connection(certs: Certs) -> None:
    """Over TLS a 32 MiB GET reply goes out piece by piece as the client reads: one that
    never reads is dropped after drain_timeout_s (the server does not buffer the reply)."""
    with _big_get(certs, drain_timeout_s=0.3) as (handle, _sock):
        _wait_for(lambda: handle.server.counters["drain_timeouts"] == 1, "a drain timeout")


def test_a_tls_client_that_reads_its_get_slowly_loses_the_connection_in_time(
    certs: Certs,
) -> None:
    """drain_timeout_s bounds the whole TLS GET reply, not each piece: a client reading a
    little every 0.1 s (a 32 MiB reply would take it ~25 s) is dropped about drain_timeout_s
    after asking, so the chunks pinned for it are released as over plaintext."""
    with _big_get(certs, drain_timeout_s=1.0) as (handle, sock):
        sock.settimeout(10)
        asked, got = time.monotonic(), 0
        while not handle.server.counters["drain_timeouts"]:
            assert time.monotonic() - asked < 8, f"not dropped after reading {got} bytes"
            burst = 0
            while burst < 128 << 10:  # 128 KiB every 0.1 s: a 256 KiB piece in 0.2 s
                data = sock.recv(1 << 16)  # the server's socket buffers outlast the drop
                assert data
                burst += len(data)
            got += burst
            time.sleep(0.1)
        dropped_after_s = time.monotonic() - asked
    assert got > 512 << 10  # it did read, piece after piece
    assert dropped_after_s < 2.5, f"dropped {dropped_after_s:.1f} s after its GET"


@contextlib.contextmanager
def _big_get(certs: Certs, drain_timeout_s: float) -> Iterator[tuple[ServerThread, ssl.SSLSocket]]:
    """A TLS server holding one 32 MiB chunk, and a client socket with a 4 KiB receive buffer
    that has just asked for it (and reads only as the test does)."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=64 << 20))
    handle = _tls_server(store, certs, limits=Limits(drain_timeout_s=drain_timeout_s))
    key, size = b"p" * 16, 32 << 20
    try:
        writer = RemoteTier(parse_remote(handle.url), None, ca=certs.ca)
        assert writer.put(key, [memoryview(bytes(size))])
        writer.close()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", handle.port))
        with client_context(certs.ca).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(pack_header(Op.GET, 1, 1, 8) + key + SIZE.pack(size))
            yield handle, sock
    finally:
        handle.stop()
        store.close()


def test_a_plaintext_client_of_a_tls_server_is_told_to_use_kvtiers(
    tmp_path: Path, tls_server: ServerThread
) -> None:
    """kvtier:// against a TLS server fails Store(...) with a TLSError naming kvtiers://."""
    url = tls_server.url.replace("kvtiers://", "kvtier://")
    where = url.removeprefix("kvtier://")
    with pytest.raises(kvtier.TLSError, match=f"server {where} speaks TLS: use kvtiers://{where}"):
        kvtier.Store(client_config(tmp_path, url, "a"))
    _wait_for(lambda: tls_server.server.counters["tls_required"] == 1, "TLS_REQUIRED counted")


def test_a_client_without_the_ca_gets_a_certificate_error(
    tmp_path: Path, tls_server: ServerThread
) -> None:
    """kvtiers:// without remote_ca (the system's CAs) refuses the server's certificate with
    a TLSError that names remote_ca; the server counts the failed handshake."""
    with pytest.raises(kvtier.TLSError, match=r"is not trusted \(.+\): give .*remote_ca"):
        kvtier.Store(client_config(tmp_path, tls_server.url, "a"))
    counters = tls_server.server.counters
    _wait_for(lambda: counters["tls_handshake_failures"] == 1, "the failed handshake counted")


def test_the_certificate_must_name_the_host_in_the_url(
    tmp_path: Path, tls_server: ServerThread, certs: Certs
) -> None:
    """A certificate for IP 127.0.0.1 is refused when the URL says localhost."""
    url = tls_server.url.replace("127.0.0.1", "localhost")
    with pytest.raises(kvtier.TLSError, match="Hostname mismatch"):
        kvtier.Store(client_config(tmp_path, url, "a", remote_ca=certs.ca))


def test_a_tls_client_of_a_plaintext_server_gets_a_clear_error(
    tmp_path: Path, server: ServerThread, certs: Certs
) -> None:
    """kvtiers:// against a server without TLS fails Store(...) with a TLSError naming both
    fixes."""
    url = server.url.replace("kvtier://", "kvtiers://")
    with pytest.raises(kvtier.TLSError, match=r"--tls-cert.*or use kvtier:// for a server without"):
        kvtier.Store(client_config(tmp_path, url, "a", remote_ca=certs.ca))


def test_same_host_loads_go_through_the_shared_mapping_over_tls(
    tmp_path: Path, certs: Certs
) -> None:
    """A TLS server with its DRAM in shared memory serves a loopback kvtiers:// client by
    GET_LOCAL (the bytes never cross the socket), byte-exact."""
    (tmp_path / "shm").mkdir()
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=8 << 20, dram_shm=tmp_path / "shm"))
    handle = _tls_server(store, certs)
    tier = RemoteTier(parse_remote(handle.url), None, ca=certs.ca)
    try:
        data = np.random.default_rng(7).integers(0, 256, 64 << 10, dtype=np.uint8)
        assert tier.put(b"s" * 16, [memoryview(data)])
        out = np.zeros_like(data)
        assert tier.get_into(b"s" * 16, [memoryview(out)])
        np.testing.assert_array_equal(out, data)
        assert handle.server.counters["local_hits"] == 1
        assert handle.server.counters["requests_get"] == 0
    finally:
        tier.close()
        handle.stop()
        store.close()


def test_silent_and_idle_tls_connections_are_closed_and_a_client_reconnects(
    certs: Certs,
) -> None:
    """A socket that never starts its handshake is closed after handshake_timeout_s; a
    pooled TLS connection closed by the idle timeout is replaced without an error."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=8 << 20))
    policy = ServerPolicy(handshake_timeout_s=0.5, idle_timeout_s=0.5)
    handle = _tls_server(store, certs, policy)
    tier = RemoteTier(parse_remote(handle.url), None, ca=certs.ca)
    data = np.arange(4096, dtype=np.uint8)
    try:
        with socket.create_connection(("127.0.0.1", handle.port), 5) as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b"", "the server closed the silent connection"
        assert handle.server.counters["handshake_timeouts"] == 1
        assert tier.put(b"a" * 16, [memoryview(data)])
        _wait_for(lambda: handle.server.counters["idle_timeouts"] >= 1, "an idle timeout")
        out = np.zeros_like(data)
        assert tier.get_into(b"a" * 16, [memoryview(out)])
        np.testing.assert_array_equal(out, data)
        assert tier.stats().errors == 0
    finally:
        tier.close()
        handle.stop()
        store.close()


def test_a_flood_of_silent_connections_does_not_lock_out_a_tls_client(certs: Certs) -> None:
    """30 sockets that never start a TLS handshake, against a cap of 8: each newcomer evicts
    the oldest, so a real client still connects and works."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=8 << 20))
    handle = _tls_server(store, certs, ServerPolicy(max_connections=8))
    flood = [socket.create_connection(("127.0.0.1", handle.port), 5) for _ in range(30)]
    try:
        tier = RemoteTier(parse_remote(handle.url), None, ca=certs.ca)
        try:
            data = np.arange(4096, dtype=np.uint8)
            assert tier.put(b"f" * 16, [memoryview(data)])
            assert tier.stats().errors == 0
        finally:
            tier.close()
        assert handle.server.counters["pending_evicted"] >= 30 - 4
    finally:
        for sock in flood:
            sock.close()
        handle.stop()
        store.close()


def test_kvtier_serve_takes_its_certificate_from_the_environment(
    tmp_path: Path, certs: Certs
) -> None:
    """`kvtier serve` with KVTIER_TLS_CERT / KVTIER_TLS_KEY listens with TLS (its banner says
    so); a kvtiers:// client with KVTIER_REMOTE_CA saves and another loads byte-exact."""
    env = {**os.environ, "KVTIER_TLS_CERT": str(certs.cert), "KVTIER_TLS_KEY": str(certs.key)}
    kv = make_kv(len(TOKENS), seed=3)
    with ServeProcess("--dram", "8MiB", env=env) as server:
        assert "(TLS)" in server.banner and server.url.startswith("kvtiers://")
        client_env = {"KVTIER_REMOTE": server.url, "KVTIER_REMOTE_CA": str(certs.ca)}
        config = kvtier.StoreConfig.from_env(client_env, chunk_tokens=4)
        assert config.remote_ca == certs.ca
        with kvtier.Store(config) as a:
            a.bind("m", LAYOUT).save(TOKENS, kv)
        with kvtier.Store(_remote_only(tmp_path, server.url, remote_ca=certs.ca)) as b:
            np.testing.assert_array_equal(b.bind("m", LAYOUT).load(TOKENS), kv)


def _serve(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--port", "0", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_serve_refuses_incomplete_or_unreadable_tls_options(tmp_path: Path, certs: Certs) -> None:
    """A certificate without its key, a missing file, and files that are not a certificate
    and its key each stop `kvtier serve` (exit 2) with a message naming the option."""
    alone = _serve("--tls-cert", certs.cert)
    assert alone.returncode == 2 and "--tls-cert and --tls-key go together" in alone.stderr
    missing = _serve("--tls-cert", tmp_path / "nope.pem", "--tls-key", certs.key)
    assert missing.returncode == 2 and "--tls-cert" in missing.stderr
    assert "nope.pem is not a file" in missing.stderr
    swapped = _serve("--tls-cert", certs.key, "--tls-key", certs.cert)
    assert swapped.returncode == 2 and "cannot load them" in swapped.stderr


def test_remote_ca_is_checked_with_the_config(tmp_path: Path, certs: Certs) -> None:
    """remote_ca needs kvtiers:// and a readable file; a file that is not PEM fails Store."""
    with pytest.raises(kvtier.ConfigError, match="kvtiers://"):
        kvtier.StoreConfig(remote="kvtier://127.0.0.1:7400", remote_ca=certs.ca)
    with pytest.raises(kvtier.ConfigError, match="not a readable file"):
        kvtier.StoreConfig(remote="kvtiers://127.0.0.1:7400", remote_ca=tmp_path / "no.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = kvtier.StoreConfig(dram_bytes=None, remote="kvtiers://127.0.0.1:9", remote_ca=junk)
    with pytest.raises(kvtier.ConfigError, match="remote_ca: cannot load"):
        kvtier.Store(config)
