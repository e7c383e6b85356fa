"""`kvtier bench trace|chat|agent --quick` produce the promised JSON, markdown and PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvtier.bench.trace import SAMPLE
from kvtier.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _bench(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "out"
    code = main(
        ["bench", *args, "--quick", "--json", "--out", str(out), "--work-dir", str(tmp_path)]
    )
    assert code == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def test_trace_quick_json_has_required_fields(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`bench trace FILE --json` prints one object with requests, tokens, hit rates by tier
    and TTFT percentiles; the figures are labelled modelled."""
    args = ["trace", str(SAMPLE), "--engine", "sim", "--chunk-tokens", "512"]
    result = _bench(capsys, tmp_path, *args, "--dram-tokens", "20000", "--disk-tokens", "2M")
    assert result["requests"] == 300
    assert result["modelled"] is True
    hit, total = result["hit_tokens"], result["input_tokens"]
    assert isinstance(hit, int) and isinstance(total, int) and 0 < hit < total
    assert result["hit_rate"] == pytest.approx(hit / total)
    by_tier = result["hit_rate_by_tier"]
    assert isinstance(by_tier, dict) and {"dram", "disk", "remote"} <= set(by_tier)
    assert by_tier["disk"] > 0
    assert sum(by_tier.values()) == pytest.approx(result["hit_rate"])
    ttft = result["ttft_ms"]
    assert isinstance(ttft, dict) and 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    configs = result["configs"]
    assert isinstance(configs, dict) and configs["none"]["hit_tokens"] == 0


@pytest.mark.parametrize("bench", ["chat", "agent"])
def test_workload_quick_writes_json_markdown_and_pngs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bench: str
) -> None:
    """A quick run writes its JSON, a markdown summary and PNG plots to --out."""
    result = _bench(capsys, tmp_path, bench)
    out = tmp_path / "out"
    assert json.loads((out / f"{bench}.json").read_text())["benchmark"] == bench
    assert "(modelled)" in (out / f"{bench}.md").read_text()
    for name in (f"{bench}_ttft.png", f"{bench}_hit_rate_vs_capacity.png"):
        assert (out / name).read_bytes().startswith(PNG)
    configs = result["configs"]
    assert isinstance(configs, dict)
    assert {"none", "gpu-lru", "tiered", "tiered+prefetch"} <= set(configs)
    assert configs["tiered"]["hit_rate"] > 0


def test_plan_table_grows_with_capacity(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`kvtier plan` reports one row per DRAM x SSD pair; adding SSD never lowers the hit
    rate; it writes a table, JSON and a PNG."""
    out = tmp_path / "out"
    args = ["plan", str(SAMPLE), "--dram-tokens", "20k", "--disk-tokens", "0,1M", "--json"]
    assert main([*args, "--out", str(out), "--work-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["dram_tokens"], r["disk_tokens"]) for r in rows] == [(20000, 0), (20000, 10**6)]
    assert rows[0]["hit_rate_by_tier"]["disk"] == 0
    assert rows[1]["hit_rate"] > rows[0]["hit_rate"]
    assert (out / "plan.png").read_bytes().startswith(PNG)
    assert "| DRAM tokens" in (out / "plan.md").read_text()


def test_bench_without_matplotlib_writes_json_and_says_what_to_install(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib `bench trace --json` still prints and writes its JSON and markdown,
    writes and lists no PNG, and one stderr line names the skipped plots and the extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "out"
    args = ["bench", "trace", str(SAMPLE), "--engine", "sim", "--quick", "--json"]
    assert main([*args, "--out", str(out), "--work-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["requests"] == 300
    assert json.loads((out / "trace.json").read_text())["requests"] == 300
    assert (out / "trace.md").exists()
    assert not list(out.glob("*.png"))
    assert result["files"] == [str(out / "trace.json"), str(out / "trace.md")]
    hints = [line for line in printed.err.split("\n") if "plot skipped" in line]
    assert len(hints) == 1
    assert "trace_ttft.png" in hints[0] and "pip install 'kvtier[bench]'" in hints[0]


def test_trace_admit_after_runs_each_ssd_configuration_per_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`--admit-after 1,2` replays `tiered` once per value, side by side in the JSON, the
    table and a plot; admission writes fewer chunks to SSD and counts the saves it kept off."""
    args = ["trace", str(SAMPLE), "--chunk-tokens", "512", "--configs", "gpu-lru,tiered"]
    caps = ["--dram-tokens", "20000", "--disk-tokens", "2M", "--sweep", "0"]
    result = _bench(capsys, tmp_path, *args, *caps, "--admit-after", "1,2")
    configs = result["configs"]
    assert isinstance(configs, dict) and list(configs) == ["gpu-lru", "tiered", "tiered admit=2"]
    plain, admitted = configs["tiered"], configs["tiered admit=2"]
    assert 0 < admitted["disk_written_chunks"] < plain["disk_written_chunks"]
    assert admitted["disk_written_gib"] < plain["disk_written_gib"]
    assert plain["admission_rejected"] == 0 < admitted["admission_rejected"]
    assert configs["gpu-lru"]["disk_written_chunks"] == 0
    out = tmp_path / "out"
    assert "| tiered admit=2 |" in (out / "trace.md").read_text()
    assert (out / "trace_admission.png").read_bytes().startswith(PNG)


def test_admit_after_zero_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--admit-after 0` (or junk) is an argument error saying what to give."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "trace", "--quick", "--admit-after", "1,0"])
    assert exc.value.code == 2
    assert "comma-separated ints >= 1" in capsys.readouterr().err
