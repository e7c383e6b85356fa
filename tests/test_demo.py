"""`kvtier demo` end to end with a tiny model: JSON rows with sane values."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvtier import demo

TINY = ["--turns", "3", "--user-tokens", "40", "--new-tokens", "4", "--chunk-tokens", "16"]
TINY += ["--hidden", "64", "--layers", "2", "--repeats", "2", "--dram", "8MiB", "--disk", "64MiB"]


def test_demo_json_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every turn row has the documented fields; hits grow while live, the first turn after
    the restart is served from disk, and kvtier's answers equal the resident-cache answers."""
    assert demo.main([*TINY, "--json", "--disk-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = [item for item in data if "turn" in item]
    summary = data[-1]["summary"]
    fields = {"turn", "prompt_tokens", "hit_tokens", "tier", "ttft_recompute_s"}
    fields |= {"ttft_resident_s", "ttft_kvtier_s"}
    assert len(rows) == 3 + demo.RESUME_TURNS
    assert all(fields <= set(row) for row in rows)
    assert [r["turn"] for r in rows] == list(range(1, len(rows) + 1))
    hits = [r["hit_tokens"] for r in rows]
    assert hits[0] == 0 and rows[0]["tier"] is None
    assert all(a < b for a, b in itertools.pairwise(hits))
    assert all(h % 16 == 0 and h < r["prompt_tokens"] for h, r in zip(hits, rows, strict=True))
    assert [r["tier"] for r in rows[1:]] == ["dram", "dram", "disk", "dram"]
    assert all(r["same_output"] for r in rows)
    assert all(r[f] > 0 for r in rows for f in ("ttft_recompute_s", "ttft_kvtier_s"))
    assert summary["decode_save_on_tok_s"] > 0 and summary["ttft_miss_kvtier_s"] > 0


def test_demo_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The plain-text form prints one line per turn and the target lines."""
    assert demo.main([*TINY, "--turns", "1", "--repeats", "1", "--disk-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recompute" in out and "restarted" in out and "target <= 1.15x" in out
