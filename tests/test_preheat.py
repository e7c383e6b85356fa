"""`kvtier preheat FILE` on a tiny random model: the prompts' full chunks end up stored and
pinned under the model id it prints, text and JSONL files, clear errors for bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import kvtier
from kvtier.bench.certs import make_certs
from kvtier.bench.remote_io import ServeProcess
from kvtier.cli import main
from kvtier.demo import build_model
from kvtier.integrations.transformers import kv_layout
from kvtier.preheat import BYTE_OFFSET
from kvtier.server.server import ServerThread
from kvtier.server.tls import server_context

CHUNK = 16
TINY = ["--hidden", "64", "--layers", "2", "--chunk-tokens", str(CHUNK), "--dram", "8MiB"]
DOCS = [
    "You are a careful assistant. Answer from the document only." * 2,
    "Short.",
    "Quarterly report: revenue grew in every region but one; costs fell." * 3,
]


def layout() -> kvtier.KVLayout:
    args = argparse.Namespace(model=None, hidden=64, layers=2, seed=0, device="cpu")
    return kv_layout(build_model(args))


def preheat(tmp_path: Path, file: Path, *extra: str) -> int:
    disk = ["--disk-dir", str(tmp_path / "disk"), "--disk", "64MiB"]
    return main(["preheat", str(file), *TINY, *disk, "--json", *extra])


def test_text_file_is_stored_and_pinned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every prompt's full chunks are stored and pinned (a prompt shorter than a chunk is
    counted, not stored); a reopened store finds and holds them under the printed model id."""
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join([DOCS[0], "", DOCS[1], DOCS[2]]) + "\n")
    assert preheat(tmp_path, file) == 0
    result = json.loads(capsys.readouterr().out)
    tokens = [[b + BYTE_OFFSET for b in doc.encode()] for doc in DOCS]
    full = [len(t) // CHUNK * CHUNK for t in tokens]
    assert result["prompts"] == 3 and result["short_prompts"] == 1
    assert result["pinned_tokens"] == sum(full)
    assert result["tiers"]["disk"]["pinned_chunks"] == sum(full) // CHUNK
    config = kvtier.StoreConfig(
        chunk_tokens=CHUNK, dram_bytes=None, disk_dir=tmp_path / "disk", disk_bytes="64MiB"
    )
    with kvtier.Store(config) as store:
        cache = store.bind(result["model_id"], layout())
        assert [cache.lookup(t) for t in tokens] == full
        assert store.stats().tier("disk").pinned_chunks == sum(full) // CHUNK
        assert cache.unpin(tokens[0]) == full[0]


def test_jsonl_tokens_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A .jsonl file takes {"tokens": [...]} and {"text": ...} lines; running it again pins
    nothing new (a pin of the same prefix is the same pin)."""
    file = tmp_path / "docs.jsonl"
    ids = list(range(5, 5 + 2 * CHUNK + 3))
    file.write_text(json.dumps({"tokens": ids}) + "\n" + json.dumps({"text": DOCS[2]}) + "\n")
    for _ in range(2):
        assert preheat(tmp_path, file, "--model-id", "tiny") == 0
        result = json.loads(capsys.readouterr().out)
        assert result["model_id"] == "tiny"
        text = len(DOCS[2].encode()) // CHUNK
        assert result["tiers"]["disk"]["pinned_chunks"] == 2 + text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", '{"text": "fine"}\n{"tokens": [1, -2]}\n', "a.jsonl:2: expected"),
        ("b.jsonl", "not json\n", "b.jsonl:1: not JSON"),
        ("c.txt", "\n\n", "no prompts"),
        ("d.jsonl", json.dumps({"tokens": [99999] * 20}) + "\n", "vocabulary size 2048"),
    ],
)
def test_bad_input_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str, message: str
) -> None:
    """A malformed line is an error naming the file and line; nothing is half-done."""
    file = tmp_path / name
    file.write_text(content)
    assert preheat(tmp_path, file) != 0
    assert message in capsys.readouterr().err


def test_needs_a_persistent_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a disk tier or a remote the KV would vanish with the command: refused."""
    file = tmp_path / "p.txt"
    file.write_text(DOCS[0])
    assert main(["preheat", str(file), *TINY]) == 2
    assert "--disk-dir" in capsys.readouterr().err


def test_a_refused_pin_names_the_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """When the pin bound is reached, preheat stops with the prompt's line and the fix."""
    file = tmp_path / "p.txt"
    file.write_text(DOCS[0])
    assert preheat(tmp_path, file, "--pin-fraction", "0") == 1
    err = capsys.readouterr().err
    assert f"{file}:1:" in err and "pin_fraction" in err


def test_preheat_a_running_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --remote (and no disk tier of its own) the prompts are stored and pinned on the
    server, which a client of it then finds."""
    file = tmp_path / "p.txt"
    file.write_text(DOCS[2])
    args = ["--dram", "16MiB", "--disk-dir", str(tmp_path / "srv"), "--disk", "64MiB"]
    with ServeProcess(*args) as server:
        code = main(["preheat", str(file), *TINY, "--remote", server.url, "--json"])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        config = kvtier.StoreConfig(chunk_tokens=CHUNK, dram_bytes=None, remote=server.url)
        with kvtier.Store(config) as store:
            tokens = [b + BYTE_OFFSET for b in DOCS[2].encode()]
            full = len(tokens) // CHUNK * CHUNK
            assert store.bind(result["model_id"], layout()).lookup(tokens) == full
            assert store.stats().tier("remote").pinned_chunks >= full // CHUNK


def test_preheat_a_tls_server_with_its_ca_and_clear_errors_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--remote kvtiers:// with --remote-ca stores and pins on a TLS server; plaintext
    kvtier:// against it, or kvtiers:// without the CA, stops with exit status 1 and one line
    saying what to fix, no traceback."""
    certs = make_certs(tmp_path / "certs")
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=16 << 20))
    handle = ServerThread(store, tls=server_context(certs.cert, certs.key))
    file = tmp_path / "p.txt"
    file.write_text(DOCS[2])
    address = handle.url.removeprefix("kvtiers://")
    try:
        for url, fix in ((f"kvtier://{address}", "kvtiers://"), (handle.url, "KVTIER_REMOTE_CA")):
            assert main(["preheat", str(file), *TINY, "--remote", url]) == 1
            err = capsys.readouterr().err
            said = [line for line in err.splitlines() if line.startswith("kvtier preheat: ")]
            assert len(said) == 1 and fix in said[0] and "Traceback" not in err, err
        ca = ["--remote-ca", str(certs.ca)]
        assert main(["preheat", str(file), *TINY, "--remote", handle.url, *ca, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["pinned_tokens"] == len(DOCS[2].encode()) // CHUNK * CHUNK
        assert store.stats().tier("dram").pinned_chunks == result["pinned_tokens"] // CHUNK
    finally:
        handle.stop()
        store.close()
