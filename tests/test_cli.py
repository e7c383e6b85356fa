"""The `kvtier` command dispatcher: usage, unknown commands, per-command help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints every command and exits 0; no arguments is usage with exit 2."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "serve", "inspect", "bench io"):
        assert name in out
    assert main([]) == 2


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command or benchmark names itself and exits 2."""
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["bench", "nope"]) == 2


def test_subcommand_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`kvtier inspect --help` shows its options."""
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--help"])
    assert info.value.code == 0
    assert "--verify" in capsys.readouterr().out


def test_console_entry_runs() -> None:
    """The installed `kvtier --help` works in a fresh process."""
    script = Path(sys.executable).parent / "kvtier"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvtier.cli"]
    out = subprocess.run(
        [*command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "inspect" in out.stdout
