"""The node-local kvtier process keeps its DRAM tier in shared memory, so the engine processes
(its clients on 127.0.0.1) load chunks from it with a memcpy."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from tests.server.conftest import read_frame

import kvtier
from kvtier.errors import ConfigError
from kvtier.integrations.vllm.node import engine_config, stop_nodes
from kvtier.protocol import Op, Status, pack_header


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
