"""`kvtier inspect DIR [--verify]`: counts chunks, finds every damaged one, exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.conftest import CHUNK, LAYOUT, make_config, prefix_kv

import kvtier
from kvtier.cli import main
from kvtier.tiers.disk import HEADER_BYTES


def _store_dir(tmp_path: Path, chunks: int = 3) -> list[Path]:
    tokens = list(range(chunks * CHUNK))
    with kvtier.Store(make_config(tmp_path)) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(tokens, prefix_kv(tokens))
        keys = cache.keys(tokens)
    root = tmp_path / "disk" / "kvtier-v1"
    return [root / k.hex()[:2] / (k.hex() + ".kv") for k in keys]


def test_clean_dir_lists_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A clean store dir: every chunk listed ok, a summary with the count, exit 0."""
    paths = _store_dir(tmp_path)
    assert main(["inspect", str(tmp_path / "disk"), "--verify", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 3
    assert all(p.name in out for p in paths)
    assert "3 chunks" in out and "verified" in out and "0 bad" in out
    assert main(["inspect", str(tmp_path / "disk" / "kvtier-v1")]) == 0


def test_damage_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Payload flips need --verify; header damage, truncation and renames are found always."""
    paths = _store_dir(tmp_path, chunks=4)
    data = bytearray(paths[0].read_bytes())
    data[HEADER_BYTES + 1] ^= 1
    paths[0].write_bytes(data)
    assert main(["inspect", str(tmp_path / "disk")]) == 0  # headers alone look fine
    assert main(["inspect", str(tmp_path / "disk"), "--verify"]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    os.truncate(paths[1], HEADER_BYTES + 3)
    os.replace(paths[3], paths[2])
    assert main(["inspect", str(tmp_path / "disk")]) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and "key does not match file name" in out and "2 bad" in out


def test_not_a_store_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory without a disk tier is exit 2 with a message on stderr."""
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "holds no kvtier disk tier" in capsys.readouterr().err
