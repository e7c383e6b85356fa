"""Two OS processes with their own DRAM and disk tiers share a prefix through the server and,
separately, through Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.bench.remote_io import RedisProcess, ServeProcess

NODE = """
import sys
import numpy as np
import kvtier
remote, disk, mode = sys.argv[1:4]
layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
config = kvtier.StoreConfig(chunk_tokens=4, dram_bytes=1 << 20, disk_dir=disk,
                            disk_bytes=8 << 20, remote=remote)
tokens = list(range(64))
kv = np.random.default_rng(7).standard_normal(layout.shape(64)).astype(np.float16)
with kvtier.Store(config) as store:
    cache = store.bind("m", layout)
    if mode == "save":
        cache.save(tokens, kv)
        print("saved")
    else:
        located = cache.locate(tokens)
        out = cache.load(tokens[: located.chunks * 4])
        print(located.chunks, ",".join(sorted(set(located.tiers))), np.array_equal(out, kv))
"""


@pytest.fixture(params=["server", "redis"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "server":
        with ServeProcess("--dram", "16MiB") as server:
            yield server.url
        return
    try:
        redis = RedisProcess(tmp_path / "redis")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with redis:
        yield redis.url


def _node(url: str, disk: Path, mode: str) -> str:
    cmd = [sys.executable, "-c", NODE, url, str(disk), mode]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_second_process_loads_what_the_first_saved(remote_url: str, tmp_path: Path) -> None:
    """Node B (another process, empty local tiers) finds A's prefix remotely, byte-exact."""
    assert _node(remote_url, tmp_path / "a", "save") == "saved"
    assert _node(remote_url, tmp_path / "b", "load") == "16 remote True"
