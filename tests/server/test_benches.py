"""The remote benchmarks run end to end on tiny sizes and report sane, error-free figures."""

from __future__ import annotations

from pathlib import Path

from kvtier.bench.load import OPS, run_load
from kvtier.bench.remote_io import measure_remote
from kvtier.server.server import ServerThread


def test_bench_load_reports_every_op_without_errors(server: ServerThread) -> None:
    """A short mixed load has no errors, and every op kind was run and timed."""
    result = run_load(server.url, None, clients=3, duration_s=1.0, chunk_bytes=4096, keys=64)
    assert result.errors == 0, result.first_error
    assert all(result.ops[op].count > 0 for op in OPS)
    assert all(0 < result.ops[op].p50_ms <= result.ops[op].p99_ms for op in OPS)
    assert result.hits > 0


def test_measure_remote_returns_every_figure(tmp_path: Path) -> None:
    """measure_remote moves the bytes through all five paths (it checks them) and reports
    a positive GB/s for each."""
    figures = measure_remote(64 << 10, 1 << 20, tmp_path)
    assert set(figures) == {
        "raw_socket_gbps",
        "remote_save_gbps",
        "remote_load_gbps",
        "remote_tls_save_gbps",
        "remote_tls_load_gbps",
        "redis_save_gbps",
        "redis_load_gbps",
        "shm_save_gbps",
        "shm_load_gbps",
    }
    assert all(value > 0 for value in figures.values())
