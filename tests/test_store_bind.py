"""Store.bind refuses a layout whose chunk some tier could never hold, saying what to change."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tests.conftest import CHUNK, LAYOUT, make_config, make_kv

import kvtier
from kvtier.tiers.disk import HEADER_BYTES

# 80 layers x 2 x 1024 tokens x 8 heads x 128 x 2 bytes = 320 MiB: over the server's chunk limit
HUGE = kvtier.KVLayout(num_layers=80, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_disk_smaller_than_one_chunk_file_is_refused(tmp_path: Path) -> None:
    """disk_bytes below one chunk file (payload + header) is a ConfigError at bind naming the
    disk tier, both sizes and the fix; it used to store nothing while stats said saved."""
    chunk = LAYOUT.chunk_bytes(CHUNK)
    config = make_config(tmp_path, dram_bytes=None, disk_bytes=HEADER_BYTES + chunk - 1)
    with kvtier.Store(config) as store:
        with pytest.raises(kvtier.ConfigError) as info:
            store.bind("m", LAYOUT)
        message = str(info.value)
        assert "disk tier" in message and str(chunk) in message and str(chunk - 1) in message
        assert "raise disk_bytes or lower chunk_tokens" in message


def test_disk_of_exactly_one_chunk_file_stores_it(tmp_path: Path) -> None:
    """A disk tier just large enough for one chunk file binds and stores that chunk."""
    config = make_config(
        tmp_path, dram_bytes=None, disk_bytes=HEADER_BYTES + LAYOUT.chunk_bytes(CHUNK)
    )
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        tokens = list(range(CHUNK))
        cache.save(tokens, make_kv(CHUNK))
        store.flush()
        assert cache.lookup(tokens) == CHUNK


@pytest.mark.parametrize("scheme", ["kvtier", "redis"])
def test_chunk_over_the_remote_limit_is_refused(tmp_path: Path, scheme: str) -> None:
    """A chunk larger than the shared tier's largest value is refused at bind (no server needed:
    the limit is the protocol's, or Redis's 512 MiB value limit)."""
    tokens = 1024 if scheme == "kvtier" else 2048  # 320 MiB, 640 MiB
    config = kvtier.StoreConfig(
        chunk_tokens=tokens, dram_bytes=None, remote=f"{scheme}://127.0.0.1:{_closed_port()}"
    )
    with (
        kvtier.Store(config) as store,
        pytest.raises(kvtier.ConfigError, match=r"remote tier .*lower chunk_tokens"),
    ):
        store.bind("m", HUGE)
