"""`kvtier bench gpu`: its CPU dry run passes every ordering check and copies byte-exact;
without CUDA the 8B-class run is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvtier.cli import main


def test_cpu_dry_run_checks_ordering_and_copies_byte_exact(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["--model-size", "tiny", "--tokens", "256", "--chunk-tokens", "64"]
    code = main(["bench", "gpu", *args, "--json", "--out", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(result["ordering"]) == {"LBNHC", "BLNHC", "per-layer"}
    assert all(all(checks.values()) for checks in result["ordering"].values())
    assert result["connector"]["byte_exact"] and result["connector"]["failed_blocks"] == 0
    (row,) = result["ttft"]
    assert row["tokens"] == 256 and row["hit_tokens"] == 192 and row["byte_exact"]
    disk = result["disk"]  # saved to the node's disk, loaded after a restart, in the background
    assert disk["tokens"] == 192 and disk["byte_exact"] and disk["failed_blocks"] == 0
    assert json.loads((tmp_path / "gpu.json").read_text()) == result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_8b_run_needs_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
