"""`kvtier bench io` runs end to end on small sizes and reports every field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier import cli

FIELDS = (
    "chunk_bytes",
    "memcpy_gbps",
    "dram_save_gbps",
    "dram_load_gbps",
    "raw_disk_write_gbps",
    "raw_disk_read_gbps",
    "disk_save_gbps",
    "disk_load_gbps",
    "lookup_chunks_per_s",
)


def test_bench_io_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one object with every documented field, positive, and cleans up."""
    argv = ["bench", "io", "--json", "--chunk-bytes", "256KiB", "--total-bytes", "4MiB"]
    assert cli.main([*argv, "--repeat", "1", "--dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    for field in FIELDS:
        assert result[field] > 0, field
    assert result["chunk_bytes"] == 256 << 10
    assert list(tmp_path.iterdir()) == []


def test_bench_io_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table names each tier beside its raw baseline with a ratio."""
    argv = ["bench", "io", "--chunk-bytes", "128KiB", "--total-bytes", "1MiB", "--repeat", "1"]
    assert cli.main([*argv, "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dram_load_gbps" in out and "memcpy_gbps" in out and "lookups:" in out


def test_bench_io_rejects_odd_chunk(tmp_path: Path) -> None:
    """A chunk size that no layout can express is refused with a clear message."""
    with pytest.raises(SystemExit, match="multiple of 4096"):
        cli.main(["bench", "io", "--chunk-bytes", "1000", "--dir", str(tmp_path)])


def test_bench_io_shm_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--shm adds the load through a node-local server's shared-memory DRAM, beside memcpy."""
    argv = ["bench", "io", "--shm", "--chunk-bytes", "128KiB", "--total-bytes", "1MiB"]
    assert cli.main([*argv, "--repeat", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "shm_load_gbps / memcpy_gbps" in out
