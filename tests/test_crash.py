"""Crash safety and corruption: kill -9 mid-write, damaged files; correct or missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import CHUNK, LAYOUT, SAVE_CHUNKS, make_config, prefix_kv, tokens_for

import kvtier
from kvtier.cli import main as cli_main
from kvtier.tiers.disk import HEADER_BYTES

REPO = Path(__file__).resolve().parents[1]
WRITER = """
import sys
import numpy as np
import kvtier
from tests.conftest import CHUNK, LAYOUT, prefix_kv, tokens_for

store = kvtier.Store(kvtier.StoreConfig(
    chunk_tokens=CHUNK, dram_bytes=1 << 16, disk_dir=sys.argv[1], disk_bytes=64 << 20))
cache = store.bind("m", LAYOUT)
i = 0
while True:
    tokens = tokens_for(i)
    cache.save(tokens, prefix_kv(tokens))
    i += 1
    if i % 20 == 0:
        store.flush()
        print(i, flush=True)
"""


@pytest.mark.parametrize("kill_after_s", [0.0, 0.15, 0.4])
def test_kill_9_mid_write_leaves_only_whole_chunks(tmp_path: Path, kill_after_s: float) -> None:
    """After SIGKILL during saves, every chunk found is byte-exact, every flushed save is
    found whole, no torn file is visible and --verify passes."""
    disk = tmp_path / "disk"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(disk)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
        time.sleep(kill_after_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    flushed = int(line)
    config = make_config(tmp_path, dram_bytes=1 << 16, disk_bytes=64 << 20)
    with kvtier.Store(config) as store:
        assert not list((disk / "kvtier-v1" / "tmp").iterdir())
        cache = store.bind("m", LAYOUT)
        found = 0
        for i in range(flushed + 2000):
            tokens = tokens_for(i)
            n = cache.lookup(tokens)
            if i < flushed:
                assert n == SAVE_CHUNKS * CHUNK
            if n:
                found += 1
                np.testing.assert_array_equal(cache.load(tokens[:n]), prefix_kv(tokens[:n]))
        assert found >= flushed, (found, flushed)
        assert store.stats().tier("disk").checksum_failures == 0
        store.check_integrity()
    assert cli_main(["inspect", str(disk), "--verify"]) == 0


def _save_three(tmp_path: Path) -> tuple[list[int], list[Path]]:
    tokens = list(range(3 * CHUNK))
    with kvtier.Store(make_config(tmp_path)) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(tokens, prefix_kv(tokens))
        keys = cache.keys(tokens)
    root = tmp_path / "disk" / "kvtier-v1"
    return tokens, [root / k.hex()[:2] / (k.hex() + ".kv") for k in keys]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


DAMAGE = {
    "payload": lambda paths: _flip(paths[1], HEADER_BYTES + 7),
    "header": lambda paths: _flip(paths[1], 20),
    "truncated": lambda paths: os.truncate(paths[1], HEADER_BYTES + 10),
    "renamed": lambda paths: os.replace(paths[2], paths[1]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("dram", [True, False])
def test_damaged_chunk_never_reaches_the_caller(tmp_path: Path, damage: str, dram: bool) -> None:
    """A damaged second chunk: --verify exits 1, load raises ChunkMissing(4), the failure is
    counted, the file deleted, and lookup then stops before it."""
    tokens, paths = _save_three(tmp_path)
    DAMAGE[damage](paths)
    assert cli_main(["inspect", str(tmp_path / "disk"), "--verify"]) == 1
    config = make_config(tmp_path, dram_bytes=(64 << 10) if dram else None)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        n = cache.lookup(tokens)
        out = np.zeros(LAYOUT.shape(n), LAYOUT.storage_dtype)
        with pytest.raises(kvtier.ChunkMissing, match="loaded 4 of") as info:
            cache.load(tokens[:n], out=out)
        assert info.value.loaded_tokens == CHUNK
        np.testing.assert_array_equal(out[:, :, :CHUNK], prefix_kv(tokens)[:, :, :CHUNK])
        assert store.stats().tier("disk").checksum_failures == 1
        assert not paths[1].exists()
        assert cache.lookup(tokens) == CHUNK
        store.check_integrity()
    assert cli_main(["inspect", str(tmp_path / "disk"), "--verify"]) == 0
