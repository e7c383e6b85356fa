"""The node-local kvtier process keeps its DRAM tier in shared memory, so the engine processes
(its clients on 127.0.0.1) load chunks from it with a memcpy."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from tests.server.conftest import read_frame

import kvtier
from kvtier.bench.remote_io import free_port
from kvtier.errors import ConfigError
from kvtier.integrations.vllm.node import engine_config, engine_store, running_nodes, stop_nodes
from kvtier.protocol import Op, Status, pack_header
from kvtier.tiers import link


def test_the_node_offers_its_dram_file_and_engines_load_through_it(tmp_path: Path) -> None:
    """An engine's config points at a node that answers MAP (its DRAM is in /dev/shm), and a
    chunk saved by one engine-side store is loaded byte-exact by another."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    node_dir = tmp_path / "node"
    config = engine_config(kvtier.StoreConfig(chunk_tokens=4, dram_bytes=8 << 20), node_dir)
    try:
        url = config.remote_url
        assert url is not None and config.remote_token is not None
        with socket.create_connection(url.endpoints[0]) as sock:
            token = config.remote_token.encode()
            sock.sendall(pack_header(Op.HELLO, 1, 0, len(token)) + token)
            assert read_frame(sock)[0].status == Status.OK
            sock.sendall(pack_header(Op.MAP, 2, 0, 0))
            header, body = read_frame(sock)
            assert header.status == Status.OK and b"/proc/" in body
        layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
        tokens = list(range(8))
        kv = np.random.default_rng(0).standard_normal(layout.shape(8)).astype(np.float16)
        with kvtier.Store(config) as saver:
            saver.bind("m", layout).save(tokens, kv)
            saver.flush()
        with kvtier.Store(config) as loader:
            cache = loader.bind("m", layout)
            assert cache.lookup(tokens) == 8
            assert np.array_equal(cache.load(tokens), kv)
            assert loader.stats().tier("remote").hits == 2
    finally:
        stop_nodes(node_dir)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_run_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever can write node.json there would choose the server an engine sends its KV to:
    a node directory anyone else may write is refused before anything is read from it."""
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    node_dir.chmod(mode)
    config = kvtier.StoreConfig(chunk_tokens=4, dram_bytes=8 << 20)
    with pytest.raises(ConfigError, match="no one else may write"):
        engine_config(config, node_dir)
    assert list(node_dir.iterdir()) == []


@pytest.mark.parametrize("shared", ["kvtier", "redis"])
def test_engines_with_and_without_a_node_share_one_tier(tmp_path: Path, shared: str) -> None:
    """The node-local process keeps its engines' keys as they are: an engine-side store with
    no node-local tier and one behind a node find each other's chunks in a shared kvtier
    server or Redis."""
    from kvtier.bench.remote_io import RedisProcess
    from kvtier.server.server import ServerThread

    backing = kvtier.Store(kvtier.StoreConfig(chunk_tokens=4, dram_bytes=8 << 20))
    if shared == "kvtier":
        server: ServerThread | RedisProcess = ServerThread(backing)
    else:
        server = RedisProcess(tmp_path / "redis")
    node_dir = tmp_path / "node"
    try:
        url = server.url
        direct = kvtier.Store(kvtier.StoreConfig(chunk_tokens=4, dram_bytes=None, remote=url))
        (tmp_path / "disk").mkdir()
        local = kvtier.StoreConfig(chunk_tokens=4, dram_bytes=8 << 20, remote=url,
                                   disk_dir=tmp_path / "disk", disk_bytes=8 << 20)  # fmt: skip
        noded = kvtier.Store(engine_config(local, node_dir))
        written = [b"a" * 16, b"b" * 16]
        direct.write_chunk(written[0], [memoryview(b"x" * 4096)])
        direct.flush()
        noded.write_chunk(written[1], [memoryview(b"y" * 4096)])
        noded.flush()
        stop_nodes(node_dir)  # flushed through to the shared tier
        noded.close()
        noded = kvtier.Store(engine_config(local, node_dir))
        for store, key, byte in [(noded, written[0], b"x"), (direct, written[1], b"y")]:
            buf = bytearray(4096)
            assert store.read_chunk(key, [memoryview(buf)]) is not None, key
            assert buf == byte * 4096
        direct.close()
        noded.close()
    finally:
        stop_nodes(node_dir)
        server.stop()
        backing.close()


def test_kvtier_nodes_shows_a_running_nodes_stats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvtier nodes` finds the node an engine-side store started and reports its tiers as
    they are now: the chunk saved, the hit and the miss."""
    from kvtier.cli import main as cli_main

    node_dir = tmp_path / "node"
    store = kvtier.Store(engine_config(kvtier.StoreConfig(chunk_tokens=4, dram_bytes=8 << 20),
                                       node_dir))  # fmt: skip
    try:
        store.write_chunk(b"k" * 16, [memoryview(b"z" * 4096)])
        store.flush()
        buf = memoryview(bytearray(4096))
        assert store.read_chunk(b"k" * 16, [buf]) is not None
        assert store.read_chunk(b"m" * 16, [buf]) is None
        assert cli_main(["nodes", "--node-dir", str(node_dir), "--json"]) == 0
        (node,) = json.loads(capsys.readouterr().out)
        dram = node["tiers"]["dram"]
        assert dram["chunks"] == 1 and dram["hits"] == 1 and dram["misses"] == 1
        assert cli_main(["nodes", "--node-dir", str(node_dir)]) == 0
        assert "dram" in capsys.readouterr().out
    finally:
        store.close()
        stop_nodes(node_dir)
    assert cli_main(["nodes", "--node-dir", str(node_dir)]) == 0
    assert "no node-local kvtier process" in capsys.readouterr().out


def _node_pid(node_dir: Path) -> int:
    (info,) = [json.loads(p.read_text()) for p in node_dir.glob("*/node.json")]
    return int(info["pid"])


def test_a_hung_node_gets_no_second_node_beside_it(tmp_path: Path) -> None:
    """A node that is alive but accepts no connection (stopped, its listener gone: here its
    port in node.json is one nobody listens on) is still the node: the next engine is
    pointed at it, and no second process starts over the same tiers."""
    node_dir = tmp_path / "node"
    config = kvtier.StoreConfig(chunk_tokens=4, dram_bytes=8 << 20)
    engine_config(config, node_dir)
    pid = _node_pid(node_dir)
    (record,) = node_dir.glob("*/node.json")
    dead_port = free_port()
    record.write_text(json.dumps({**json.loads(record.read_text()), "port": dead_port}))
    os.kill(pid, signal.SIGSTOP)
    try:
        again = engine_config(config, node_dir)
        after = _node_pid(node_dir)
    finally:
        os.kill(pid, signal.SIGCONT)
        stop_nodes(node_dir)
    assert after == pid
    assert again.remote == f"kvtier://127.0.0.1:{dead_port}"


def test_an_engine_store_starts_a_killed_node_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the node under an engine's store: misses while it is gone, then the store
    starts a new node and moves to it at once (not after its backoff, made 30 s here), and
    finds there what the old node had written to disk."""
    monkeypatch.setattr(link, "BACKOFF_S", (30.0, 30.0))
    node_dir = tmp_path / "node"
    config = kvtier.StoreConfig(
        chunk_tokens=4, dram_bytes=8 << 20, disk_dir=tmp_path / "disk", disk_bytes=32 << 20
    )
    layout = kvtier.KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
    kv = np.ones(layout.shape(8), np.float32)
    store = engine_store(config, node_dir)
    try:
        cache = store.bind("m", layout)
        cache.save(range(8), kv)
        store.flush()
        deadline = time.monotonic() + 20
        while [n.stats["pending_writes"] for n in running_nodes(node_dir)] != [0]:
            assert time.monotonic() < deadline, "the node never wrote the chunks to disk"
            time.sleep(0.05)
        old = _node_pid(node_dir)
        os.kill(old, signal.SIGKILL)
        assert cache.lookup(range(8)) == 0  # gone: a miss, and the store looks for it
        deadline = time.monotonic() + 20
        while cache.lookup(range(8)) != 8:
            assert time.monotonic() < deadline, "the store never reached a new node"
            time.sleep(0.05)
        assert _node_pid(node_dir) != old
        assert np.array_equal(cache.load(range(8)), kv)
    finally:
        store.close()
        stop_nodes(node_dir)
