"""The Redis tier against a real redis-server: sharing, corruption detection, auth, outages,
cluster mode."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from tests.conftest import LAYOUT, make_kv

import kvtier
from kvtier.bench.remote_io import RedisProcess, free_port
from kvtier.config import parse_remote
from kvtier.tiers.redis import PREFIX, RedisTier

KEY = hashlib.blake2b(b"redis-test", digest_size=16).digest()


def _start(workdir: Path, *args: str, port: int | None = None) -> RedisProcess:
    try:
        return RedisProcess(workdir, *args, port=port)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    with _start(tmp_path / "redis") as proc:
        yield proc


def test_chunks_saved_by_one_store_load_on_another(server: RedisProcess, tmp_path: Path) -> None:
    """A prefix saved through Redis by one store loads byte-exact in another."""
    tokens, kv = list(range(24)), make_kv(24)
    base = {"chunk_tokens": 4, "dram_bytes": 1 << 20, "remote": server.url}
    with kvtier.Store(kvtier.StoreConfig(**base)) as a:  # type: ignore[arg-type]
        a.bind("m", LAYOUT).save(tokens, kv)
    with kvtier.Store(kvtier.StoreConfig(**base)) as b:  # type: ignore[arg-type]
        cache = b.bind("m", LAYOUT)
        assert cache.locate(tokens).tiers == ("remote",) * 6
        np.testing.assert_array_equal(cache.load(tokens), kv)


def test_corrupt_value_is_a_counted_miss_and_deleted(server: RedisProcess) -> None:
    """A value whose payload changed fails its checksum: a miss, counted, and deleted."""
    tier = RedisTier(parse_remote(server.url), None)
    data = np.arange(1000, dtype=np.uint8)
    assert tier.put(KEY, [memoryview(data)])
    raw = redis.Redis(port=server.port)
    value = bytearray(raw.get(PREFIX + KEY) or b"")
    value[-1] ^= 0xFF
    raw.set(PREFIX + KEY, bytes(value))
    assert not tier.get_into(KEY, [memoryview(np.zeros_like(data))])
    assert tier.stats().checksum_failures == 1
    assert not raw.exists(PREFIX + KEY)
    raw.set(PREFIX + KEY, b"short")
    assert not tier.get_into(KEY, [memoryview(bytearray(5))])
    tier.close()


def test_wrong_size_is_a_miss_that_keeps_the_value(server: RedisProcess) -> None:
    """Asking for another size misses without deleting the stored chunk."""
    tier = RedisTier(parse_remote(server.url), None)
    data = np.arange(1000, dtype=np.uint8)
    assert tier.put(KEY, [memoryview(data)])
    assert not tier.get_into(KEY, [memoryview(bytearray(999))])
    out = np.zeros_like(data)
    assert tier.get_into(KEY, [memoryview(out)])
    np.testing.assert_array_equal(out, data)
    tier.close()


def test_password_is_the_token(tmp_path: Path) -> None:
    """With requirepass, the right token works and a wrong one raises a clear AuthError (also
    for a URL listing several nodes)."""
    with _start(tmp_path / "r", "--requirepass", "s3cret-pass") as proc:
        url = parse_remote(proc.url)
        with pytest.raises(kvtier.AuthError, match="KVTIER_REMOTE_TOKEN"):
            RedisTier(url, "wrong")
        with pytest.raises(kvtier.AuthError, match="KVTIER_REMOTE_TOKEN"):
            RedisTier(url, None)
        twice = parse_remote(f"redis://127.0.0.1:{proc.port},127.0.0.1:{proc.port}")
        with pytest.raises(kvtier.AuthError, match="KVTIER_REMOTE_TOKEN"):
            RedisTier(twice, "wrong")  # a node list takes the cluster client's path
        tier = RedisTier(url, "s3cret-pass")
        assert tier.put(KEY, [memoryview(b"x" * 100)]) and tier.contains_prefix([KEY]) == 1
        tier.close()


def test_a_stopped_server_yields_misses(server: RedisProcess) -> None:
    """After Redis goes away every call misses (counted as errors); nothing raises."""
    tier = RedisTier(parse_remote(server.url), None)
    assert tier.put(KEY, [memoryview(b"y" * 64)])
    server.stop()
    assert tier.contains_prefix([KEY]) == 0
    assert not tier.get_into(KEY, [memoryview(bytearray(64))])
    assert not tier.put(KEY, [memoryview(b"y" * 64)])
    assert tier.stats().errors >= 1
    tier.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    ports: list[int] = []
    while len(ports) < 3:  # a node's cluster bus listens on port + 10000
        port = free_port()
        if port < 55000 and port not in ports:
            ports.append(port)
    args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
    with contextlib.ExitStack() as stack:
        for port in ports:
            workdir = tmp_path / f"node{port}"
            stack.enter_context(
                RedisProcess(workdir, *args, "--cluster-config-file", "nodes.conf", port=port)
            )
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli not found: install redis-server (make test does this)")
        nodes = [f"127.0.0.1:{p}" for p in ports]
        create = [cli, "--cluster", "create", *nodes, "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while redis.Redis(port=ports[0]).cluster("info").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, "redis cluster did not reach state ok"
            time.sleep(0.1)
        yield ports


def test_cluster_mode_round_trip(cluster: list[int]) -> None:
    """Chunks spread over a 3-master cluster are found in order and load byte-exact."""
    url = parse_remote("redis://" + ",".join(f"127.0.0.1:{p}" for p in cluster))
    tier = RedisTier(url, None)
    keys = [hashlib.blake2b(b"c%d" % i, digest_size=16).digest() for i in range(30)]
    for i, key in enumerate(keys):
        assert tier.put(key, [memoryview(bytes([i]) * 500)])
    assert tier.contains_prefix(keys) == 30
    out = bytearray(500)
    assert tier.get_into(keys[17], [memoryview(out)]) and out == bytes([17]) * 500
    single = RedisTier(parse_remote(f"redis://127.0.0.1:{cluster[1]}"), None)
    assert single.contains_prefix(keys) == 30, "one node of a cluster is detected as cluster"
    tier.close()
    single.close()


def test_store_started_before_redis_uses_the_token_once_it_is_up(tmp_path: Path) -> None:
    """A Store opened while Redis is down misses, then (after the backoff) saves and loads
    through the Redis that comes up, authenticating with the token."""
    port, tokens, kv = free_port(), list(range(8)), make_kv(8)
    cfg = kvtier.StoreConfig(
        chunk_tokens=4, dram_bytes=None, remote=f"redis://127.0.0.1:{port}/0", remote_token="tok"
    )
    with kvtier.Store(cfg) as store:
        cache = store.bind("m", LAYOUT)
        assert cache.lookup(tokens) == 0
        assert store.stats().tier("remote").errors >= 1
        with _start(tmp_path / "redis", "--requirepass", "tok", port=port):
            deadline = time.monotonic() + 10
            while cache.lookup(tokens) < 8 and time.monotonic() < deadline:
                cache.save(tokens, kv)
                store.flush()
                time.sleep(0.05)
            np.testing.assert_array_equal(cache.load(tokens), kv)
            assert redis.Redis(port=port, password="tok").dbsize() == 2


def _silent_listener() -> socket.socket:
    """A socket that accepts TCP connections (kernel backlog) but never answers."""
    return socket.create_server(("127.0.0.1", 0), backlog=16)


def test_absent_or_hung_cluster_gives_misses(tmp_path: Path) -> None:
    """A cluster URL whose nodes are absent or never answer: Store() and every call miss
    (counted), nothing raises."""
    with _silent_listener() as hung:
        nodes = f"127.0.0.1:{free_port()},127.0.0.1:{hung.getsockname()[1]}"
        cfg = kvtier.StoreConfig(chunk_tokens=4, dram_bytes=None, remote=f"redis://{nodes}")
        with kvtier.Store(cfg) as store:
            cache = store.bind("m", LAYOUT)
            assert cache.lookup(range(8)) == 0
            cache.save(range(8), make_kv(8))
            store.flush()
            with pytest.raises(kvtier.ChunkMissing):
                cache.load(range(8))
            assert store.stats().tier("remote").errors >= 1


def test_rediss_cluster_url_speaks_tls() -> None:
    """rediss:// with several nodes opens TLS connections (the first byte is a handshake)."""
    first: list[bytes] = []
    with _silent_listener() as node:

        def record() -> None:
            conn, _ = node.accept()
            with conn:
                conn.settimeout(5)
                first.append(conn.recv(1))

        thread = threading.Thread(target=record, daemon=True)
        thread.start()
        url = parse_remote(f"rediss://127.0.0.1:{node.getsockname()[1]},127.0.0.1:{free_port()}")
        tier = RedisTier(url, None)
        thread.join(timeout=5)
        assert tier.contains_prefix([KEY]) == 0
        tier.close()
    assert first == [b"\x16"], "expected a TLS ClientHello, got plain RESP"
