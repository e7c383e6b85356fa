"""The Redis tier against a real redis-server: sharing, corruption detection, auth, outages,
cluster mode."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
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


def _start(workdir: Path, *args: str) -> RedisProcess:
    try:
        return RedisProcess(workdir, *args)
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
    """With requirepass, the right token works and a wrong one raises a clear AuthError."""
    with _start(tmp_path / "r", "--requirepass", "s3cret-pass") as proc:
        url = parse_remote(proc.url)
        with pytest.raises(kvtier.AuthError, match="KVTIER_REMOTE_TOKEN"):
            RedisTier(url, "wrong")
        with pytest.raises(kvtier.AuthError, match="KVTIER_REMOTE_TOKEN"):
            RedisTier(url, None)
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
