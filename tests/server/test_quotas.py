"""Per-tenant quotas through a real server: a tenant over its quota evicts only its own
chunks; each tenant's usage in STATS (its own only) and in /metrics; bad quota config."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import LAYOUT, make_kv
from tests.server.conftest import read_frame

import kvtier
from kvtier.bench.remote_io import ServeProcess
from kvtier.protocol import Op, Status, pack_header
from kvtier.quota import UNKNOWN, Quota, Quotas
from kvtier.server.auth import Auth
from kvtier.server.server import ServerThread

TOKENS = {"alice": "alice-token-1", "bob": "bob-token-22"}
KIB = 1 << 10
# LAYOUT's 4-token chunk is 512 bytes: a 4 KiB page in DRAM, a 4.5 KiB file on disk.
DRAM_QUOTA, DISK_QUOTA = 64 * KIB, 144 * KIB  # 16 chunks each


def _auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth"
    path.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    return path


def _client(url: str, tenant: str) -> kvtier.Store:
    """A client with no tiers of its own: every save and load goes to the server."""
    config = {"chunk_tokens": 4, "dram_bytes": None, "remote": url, "remote_token": TOKENS[tenant]}
    return kvtier.Store(kvtier.StoreConfig(**config))  # type: ignore[arg-type]


def _conversation(i: int) -> list[int]:
    return [i * 1000 + t for t in range(40)]  # 10 chunks


def test_a_tenant_flooding_past_its_quota_evicts_only_its_own_chunks(tmp_path: Path) -> None:
    """Alice saves 30x her quota through a server whose tiers hold 4x it: her oldest chunks
    go, DRAM and disk, and every one of Bob's (older than all of hers) stays, byte-exact."""
    config = kvtier.StoreConfig(
        dram_bytes=4 * DRAM_QUOTA, disk_dir=tmp_path / "srv", disk_bytes=4 * DISK_QUOTA
    )
    quota = Quota(DRAM_QUOTA, DISK_QUOTA)
    store = kvtier.Store(config, Quotas({"alice": quota, "bob": quota}))
    handle = ServerThread(store, auth=Auth.from_file(_auth_file(tmp_path)))
    try:
        bob_kv = make_kv(40, seed=1)
        with _client(handle.url, "bob") as bob:
            bob.bind("m", LAYOUT).save(_conversation(0), bob_kv)
        with _client(handle.url, "alice") as alice:
            cache = alice.bind("m", LAYOUT)
            for i in range(1, 49):  # 480 chunks
                cache.save(_conversation(i), make_kv(40, seed=i))
        store.flush()
        usage = store.usage()
        for tier, limit in (("dram", DRAM_QUOTA), ("disk", DISK_QUOTA)):
            assert usage["alice"][tier].bytes <= limit
            assert usage["alice"][tier].evictions > 400
            assert usage["bob"][tier].chunks == 10 and usage["bob"][tier].evictions == 0
        store.check_integrity()
        with _client(handle.url, "bob") as bob:
            np.testing.assert_array_equal(bob.bind("m", LAYOUT).load(_conversation(0)), bob_kv)
        with _client(handle.url, "alice") as alice:
            cache = alice.bind("m", LAYOUT)
            assert cache.lookup(_conversation(1)) == 0  # her oldest: evicted
            np.testing.assert_array_equal(cache.load(_conversation(48)), make_kv(40, seed=48))
    finally:
        handle.stop()
        store.close()


def test_stats_tell_a_tenant_its_own_usage_only(tmp_path: Path) -> None:
    """STATS answers the asking tenant's bytes, chunks and quota per tier, not another's."""
    config = kvtier.StoreConfig(dram_bytes=1 << 20, disk_dir=tmp_path / "srv", disk_bytes=1 << 20)
    store = kvtier.Store(config, Quotas({"alice": Quota(DRAM_QUOTA, None), "bob": Quota()}))
    handle = ServerThread(store, auth=Auth.from_file(_auth_file(tmp_path)))
    try:
        with _client(handle.url, "alice") as alice:
            alice.bind("m", LAYOUT).save(_conversation(0), make_kv(40))
        store.flush()
        token = TOKENS["alice"].encode()
        hello = pack_header(Op.HELLO, 1, 0, len(token)) + token
        with socket.create_connection(("127.0.0.1", handle.port), 5) as sock:
            sock.sendall(hello + pack_header(Op.STATS, 2, 0, 0))
            replies = [read_frame(sock) for _ in range(2)]
        assert [h.status for h, _ in replies] == [Status.OK, Status.OK]
        stats = json.loads(replies[1][1])
        assert stats["tenant"]["name"] == "alice"
        assert stats["tenant"]["dram"] == {
            "bytes": 10 * 4096, "chunks": 10, "limit_bytes": DRAM_QUOTA, "evictions": 0,
        }  # fmt: skip
        assert stats["tenant"]["disk"]["chunks"] == 10
        assert stats["tenant"]["disk"]["limit_bytes"] is None
        assert "bob" not in json.dumps(stats)
    finally:
        handle.stop()
        store.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: str = response.read().decode()
        return body


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{sample} missing from /metrics"
    return float(match.group(1))


def test_metrics_of_a_real_server(tmp_path: Path) -> None:
    """After some saves, lookups and loads, /metrics has latency histograms with counts for
    PUT, GET and EXISTS_PREFIX, each tenant's bytes and quota, the process metrics; /healthz
    answers ok."""
    quotas = tmp_path / "quotas"
    quotas.write_text("# tenant dram disk\nalice 64KiB -\n")
    args = ["--dram", "4MiB", "--disk-dir", str(tmp_path / "srv"), "--disk", "8MiB"]
    args += ["--auth-file", str(_auth_file(tmp_path)), "--quota-file", str(quotas)]
    with ServeProcess(*args, "--tenant-disk", "1MiB", "--metrics-port", "0") as server:
        found = re.search(r"(http://\S+)/metrics", server.banner)
        assert found is not None
        url = found.group(1)
        kv = make_kv(40)
        with _client(server.url, "alice") as alice:
            alice.bind("m", LAYOUT).save(_conversation(0), kv)
        with _client(server.url, "alice") as alice:
            cache = alice.bind("m", LAYOUT)
            assert cache.lookup(_conversation(0)) == 40
            np.testing.assert_array_equal(cache.load(_conversation(0)), kv)
        assert _get(url + "/healthz") == "ok\n"
        text = _get(url + "/metrics")
    for op in ("put", "get", "exists_prefix"):
        assert _value(text, f'kvtier_server_request_seconds_count{{op="{op}"}}') > 0
        assert f'kvtier_server_request_seconds_bucket{{le="0.001",op="{op}"}}' in text
    assert _value(text, 'kvtier_tenant_bytes{tenant="alice",tier="dram"}') == 10 * 4096
    assert _value(text, 'kvtier_tenant_chunks{tenant="alice",tier="disk"}') == 10
    assert _value(text, 'kvtier_tenant_bytes{tenant="bob",tier="dram"}') == 0
    assert _value(text, 'kvtier_tenant_quota_bytes{tenant="alice",tier="dram"}') == 64 * KIB
    assert _value(text, 'kvtier_tenant_quota_bytes{tenant="bob",tier="disk"}') == 1 << 20
    assert 'kvtier_tenant_quota_bytes{tenant="bob",tier="dram"}' not in text  # no limit
    assert _value(text, 'kvtier_tier_chunks{tier="dram"}') == 10
    assert _value(text, "process_resident_memory_bytes") > 0
    assert _value(text, "process_cpu_seconds_total") > 0


def test_chunks_of_no_tenant_are_one_series_on_metrics(tmp_path: Path) -> None:
    """Chunk files of no configured tenant (here: saved without namespaces, as by an older
    server, a random tag each) are counted under one tenant="#unknown", not one per tag."""
    disk = ["--disk-dir", str(tmp_path / "srv"), "--disk", "8MiB"]
    old = kvtier.StoreConfig(
        chunk_tokens=4, dram_bytes=None, disk_dir=tmp_path / "srv", disk_bytes="8MiB"
    )
    with kvtier.Store(old) as store:
        cache = store.bind("m", LAYOUT)
        for i in range(5):  # 50 chunks
            cache.save(_conversation(i), make_kv(40, seed=i))
    args = ["--dram", "4MiB", *disk, "--auth-file", str(_auth_file(tmp_path))]
    with ServeProcess(*args, "--metrics-port", "0") as server:
        found = re.search(r"(http://\S+)/metrics", server.banner)
        assert found is not None
        text = _get(found.group(1) + "/metrics")
    pattern = r'^kvtier_tenant_chunks\{tenant="([^"]*)",tier="disk"\}'
    assert set(re.findall(pattern, text, re.MULTILINE)) == {"alice", "bob", UNKNOWN}
    assert _value(text, f'kvtier_tenant_chunks{{tenant="{UNKNOWN}",tier="disk"}}') == 50
    assert _value(text, 'kvtier_tenant_chunks{tenant="alice",tier="disk"}') == 0


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("quota_line", "extra", "message"),
    [
        ("carol 1GiB 1GiB", [], "quotas:1: tenant 'carol' is not in the auth file"),
        ("alice lots 1GiB", [], "quotas:1: dram: cannot parse 'lots'"),
        ("alice 1GiB", [], "quotas:1: expected 'tenant dram disk'"),
        ("alice 1GiB 1GiB\nalice 2GiB -", [], "quotas:2: tenant 'alice' has a quota line already"),
        ("alice 1GiB 1GiB", [], "a disk quota needs a disk tier: give --disk-dir and --disk"),
        ("", ["--tenant-dram", "0"], "--tenant-dram: must be positive"),
    ],
)
def test_bad_quota_config_is_refused_naming_the_fix(
    tmp_path: Path, quota_line: str, extra: list[str], message: str
) -> None:
    """A quota file naming an unknown tenant, a bad size or line, a tenant twice, a disk quota
    without a disk tier, a zero default: exit 2 with the file, line and fix."""
    quotas = tmp_path / "quotas"
    quotas.write_text(quota_line + "\n")
    auth = ["--auth-file", str(_auth_file(tmp_path)), "--quota-file", str(quotas)]
    result = _serve("--dram", "4MiB", *auth, *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_quota_file_needs_an_auth_file(tmp_path: Path) -> None:
    """Without an auth file there are no tenants to name: --quota-file is refused."""
    quotas = tmp_path / "quotas"
    quotas.write_text("alice 1GiB -\n")
    result = _serve("--quota-file", str(quotas))
    assert result.returncode == 2 and "--quota-file needs --auth-file" in result.stderr
