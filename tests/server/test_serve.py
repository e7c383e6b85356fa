"""`kvtier serve` as a process: metrics, SIGTERM persistence, refusing unsafe configuration."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import LAYOUT, make_kv
from tests.server.conftest import client_config

import kvtier
from kvtier.bench.remote_io import ServeProcess
from kvtier.server import main

TOKENS = list(range(32))


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: str = response.read().decode()
        return body


def test_sigterm_persists_chunks_and_a_restart_serves_them(tmp_path: Path) -> None:
    """After SIGTERM and a restart on the same disk dir, saved chunks load byte-exact;
    /metrics and /healthz answer while it runs."""
    disk = ["--dram", "4MiB", "--disk-dir", str(tmp_path / "srv"), "--disk", "64MiB"]
    kv = make_kv(len(TOKENS))
    with ServeProcess(*disk, "--metrics-port", "0") as server:
        metrics = re.search(r"(http://\S+)/metrics", server.banner)
        assert metrics is not None
        with kvtier.Store(client_config(tmp_path, server.url, "a")) as a:
            cache = a.bind("m", LAYOUT)
            cache.save(TOKENS, kv)
            a.flush()
            assert cache.pin(TOKENS[:8]) == 8
        assert _get(metrics.group(1) + "/healthz") == "ok\n"
        text = _get(metrics.group(1) + "/metrics")
        assert 'kvtier_tier_chunks{tier="dram"} 8' in text
        assert 'kvtier_tier_pinned_chunks{tier="disk"} 2' in text  # 8 tokens: 2 chunks of 4
        assert 'kvtier_tier_expired_total{tier="dram"} 0' in text
        assert 'kvtier_tier_effective_capacity_bytes{tier="disk"}' in text
        assert "kvtier_admission_rejected_chunks_total 0" in text
        assert "kvtier_server_requests_put_total 8" in text
        server.stop()
        assert server.proc.returncode == 0
        assert "every chunk is on disk" in server.output()
    with ServeProcess(*disk) as server, kvtier.Store(client_config(tmp_path, server.url, "b")) as b:
        np.testing.assert_array_equal(b.bind("m", LAYOUT).load(TOKENS), kv)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_refuses_a_public_address_without_auth() -> None:
    """Listening on a non-loopback address needs an auth file (or --insecure)."""
    result = _serve("--host", "0.0.0.0")
    assert result.returncode == 2
    assert "--auth-file" in result.stderr and "--insecure" in result.stderr


def test_bad_auth_file_names_the_line(tmp_path: Path) -> None:
    """An auth file line that is not 'tenant token' is reported with its line number."""
    path = tmp_path / "auth"
    path.write_text("alice good-token-1\nbroken\n")
    result = _serve("--auth-file", str(path))
    assert result.returncode == 2 and f"{path}:2" in result.stderr


def _raw_http(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        if data:
            sock.sendall(data)
        reply = b""
        while part := sock.recv(65536):
            reply += part
        return reply


def test_metrics_port_answers_bad_requests_without_tracebacks() -> None:
    """Clients that close early, send a header line over 64 KiB or garbage get 431 / 400 or
    a quiet close; the server logs no traceback and keeps answering."""
    with ServeProcess("--dram", "4MiB", "--metrics-port", "0") as server:
        metrics = re.search(r"http://[^:]+:(\d+)/metrics", server.banner)
        assert metrics is not None
        port = int(metrics.group(1))
        socket.create_connection(("127.0.0.1", port), 5).close()
        with socket.create_connection(("127.0.0.1", port), 5) as early:
            early.sendall(b"GET /met")
        big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        assert re.match(rb"HTTP/1\.[01] 431 ", _raw_http(port, big))
        assert re.match(rb"HTTP/1\.[01] 400 ", _raw_http(port, b"hello\r\n\r\n"))
        assert _get(f"http://127.0.0.1:{port}/healthz") == "ok\n"
        server.stop()
        output = server.output()
    assert "Traceback" not in output and "Error" not in output, output


def test_shm_writes_let_same_host_clients_save_into_the_dram_file(tmp_path: Path) -> None:
    """`--dram-shm --shm-writes`: a same-host client saves through PUT_LOCAL (no PUT), and
    another client loads what it saved; without --dram-shm the option is refused."""
    shm = tmp_path / "shm"
    shm.mkdir()
    kv = make_kv(len(TOKENS))
    args = ["--dram", "4MiB", "--dram-shm", str(shm), "--shm-writes", "--metrics-port", "0"]
    with ServeProcess(*args) as server:
        remote_only = {"chunk_tokens": 4, "dram_bytes": None, "remote": server.url}
        with kvtier.Store(kvtier.StoreConfig(**remote_only)) as a:  # type: ignore[arg-type]
            a.bind("m", LAYOUT).save(TOKENS, kv)
        with kvtier.Store(client_config(tmp_path, server.url, "b")) as b:
            np.testing.assert_array_equal(b.bind("m", LAYOUT).load(TOKENS), kv)
        metrics = re.search(r"(http://\S+)/metrics", server.banner)
        assert metrics is not None
        text = _get(metrics.group(1) + "/metrics")
        assert "kvtier_server_local_puts_total 8" in text
        assert "kvtier_server_requests_put_total" not in text
    result = _serve("--shm-writes")
    assert result.returncode == 2 and "--dram-shm" in result.stderr


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    main.add_arguments(parser)  # option defaults read KVTIER_* as the command does
    return parser.parse_args(list(argv))


def test_serve_takes_the_store_values_from_env_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVTIER_DISK_ADMIT_AFTER=off and KVTIER_PIN_FRACTION=off (and off for the disk tier)
    mean for kvtier serve what they mean for StoreConfig.from_env; the server starts."""
    env = {"KVTIER_DISK_ADMIT_AFTER": "off", "KVTIER_PIN_FRACTION": "off", "KVTIER_DRAM": "4MiB"}
    env |= {"KVTIER_DISK_DIR": "off", "KVTIER_DISK": "off"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    config = main.store_config(_serve_args())
    assert config == kvtier.StoreConfig.from_env(env)
    assert (config.disk_admit_after, config.pin_fraction, config.disk_dir) == (1, 0.0, None)
    disk = ["--disk-dir", str(tmp_path), "--disk", "1MiB"]
    config = main.store_config(_serve_args(*disk, "--disk-admit-after", "2"))
    assert (config.disk_admit_after, config.disk_bytes) == (2, 1 << 20)
    with ServeProcess(*disk, env=dict(os.environ)) as server:
        assert server.url.startswith("kvtier://")
    monkeypatch.setenv("KVTIER_DISK_ADMIT_AFTER", "twice")
    with pytest.raises(kvtier.ConfigError, match="KVTIER_DISK_ADMIT_AFTER: expected an integer"):
        main.store_config(_serve_args())
