"""`kvtier bench gateway --quick --json`: structure and sanity, no timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_quick_run_completes_every_configuration(tmp_path: Path) -> None:
    """Every configuration completes its requests with no 5xx; hits never exceed the oracle."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "bench", "gateway", "--quick", "--json",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert {"headline", "rows", "overhead", "route", "pressure"} <= set(result)
    assert all(ratio >= 2 for ratio in result["pressure"].values())
    policies = {r["policy"] for r in result["rows"]}
    assert policies == {"round-robin", "least-load", "prefix", "kvtier"}
    for row in result["rows"]:
        assert row["completed"] == row["requests"] > 0, row
        assert row["errors_5xx"] == 0
        assert row["cached_tokens"] <= row["oracle_tokens"]
        if row["workload"] != "noreuse":
            assert 0.0 <= row["hit_rate_vs_oracle"] <= 1.0
    head = result["headline"]
    keys = {"hit_rate_vs_oracle", "knee_throughput_ratio_vs_round_robin",
            "noreuse_throughput_ratio_vs_round_robin", "steady_inflight_tokens_ratio",
            "tier_credit_ttft_p50_gain_vs_prefix", "overhead_ttft_p50_ms",
            "overhead_ttft_p99_ms", "streams_1000_errors", "route_p99_ms_1m_blocks"}  # fmt: skip
    assert keys <= set(head)
    assert head["streams_1000_errors"] == 0
    assert result["overhead"]["gateway_alive_after_burst"]
    for mode in ("paced", "lockstep"):  # each with its single-stream floor, nothing failed
        check = result["overhead"][mode]
        assert check["failed"] == 0
        assert check["one_stream_direct_ttft_ms"]["p50"] > 0
        assert isinstance(check["direct_controlled"], bool)
    assert result["overhead"]["paced"]["spread"] and not result["overhead"]["lockstep"]["spread"]
    assert all((tmp_path / name).exists() for name in ("gateway.json", "gateway.md", "gateway.png"))
