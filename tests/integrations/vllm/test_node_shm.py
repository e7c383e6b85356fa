"""The node-local kvtier process keeps its DRAM tier in shared memory, so the engine processes
(its clients on 127.0.0.1) load chunks from it with a memcpy."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from tests.server.conftest import read_frame

import kvtier
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
