"""Pins through a cache server: a client's pin is forwarded (PIN/UNPIN) and kept by the
server's own tiers against eviction, across a kill -9 of `kvtier serve`, within its bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.conftest import CHUNK, LAYOUT, make_kv
from tests.server.conftest import client_config

import kvtier
from kvtier.bench.remote_io import ServeProcess
from kvtier.server.server import ServerThread

DOC = list(range(3 * CHUNK))
SERVER = ["--dram", "32KiB", "--disk", str(16 * (4096 + 512))]  # 8 DRAM chunks, 16 on disk


def remote_only(tmp_path: Path, url: str, name: str) -> kvtier.Store:
    """A client whose only tier is the server: every chunk it finds is the server's."""
    config = client_config(tmp_path, url, name, dram_bytes=None, disk_dir=None, disk_bytes=None)
    return kvtier.Store(config)


def churn(cache: kvtier.BoundCache, saves: int, seed: int) -> None:
    """Save unrelated prefixes until the server has evicted everything evictable."""
    for i in range(saves):
        tokens = [seed + i] * (2 * CHUNK)
        cache.save(tokens, make_kv(len(tokens), i))
    cache.store.flush()


def test_pins_through_kvtier_serve_survive_eviction_and_kill_9(tmp_path: Path) -> None:
    """A pinned prefix stays on the server however much else clients save, also after the
    server is killed with SIGKILL and restarted; unpinning makes it evictable again."""
    args = [*SERVER, "--disk-dir", str(tmp_path / "srv")]
    kv = make_kv(len(DOC))
    with ServeProcess(*args) as server, remote_only(tmp_path, server.url, "a") as a:
        cache = a.bind("m", LAYOUT)
        cache.save(DOC, kv)
        a.flush()
        assert cache.pin(DOC) == len(DOC)
        assert a.stats().tier("remote").pinned_chunks >= 3
        churn(cache, 20, seed=1000)
        assert cache.lookup(DOC) == len(DOC)
        server.proc.kill()
        server.proc.wait()
    with ServeProcess(*args) as server, remote_only(tmp_path, server.url, "b") as b:
        cache = b.bind("m", LAYOUT)
        assert b.stats().tier("remote").pinned_chunks >= 3
        churn(cache, 20, seed=2000)
        np.testing.assert_array_equal(cache.load(DOC), kv)
        assert cache.unpin(DOC) == len(DOC)
        assert b.stats().tier("remote").pinned_chunks == 0
        churn(cache, 20, seed=3000)
        assert cache.lookup(DOC) == 0


def test_a_pin_the_server_refuses_raises_pin_refused(tmp_path: Path) -> None:
    """A server started with --pin-fraction 0 refuses every pin; the client raises
    PinRefused with the server's reason and pins nothing locally either."""
    args = [*SERVER, "--disk-dir", str(tmp_path / "srv"), "--pin-fraction", "0"]
    with ServeProcess(*args) as server:
        config = client_config(tmp_path, server.url, "a")  # with local DRAM and disk
        with kvtier.Store(config) as store:
            cache = store.bind("m", LAYOUT)
            cache.save(DOC, make_kv(len(DOC)))
            store.flush()
            with pytest.raises(kvtier.PinRefused, match=r"pinning is off.*--pin-fraction"):
                cache.pin(DOC)
            stats = store.stats()
            assert stats.tier("dram").pinned_chunks == stats.tier("disk").pinned_chunks == 0
            assert cache.lookup(DOC) == len(DOC)  # the connection is still good


def test_pins_reach_every_server_of_a_pool(tmp_path: Path) -> None:
    """Over a pool of two servers each is sent the pinned keys it owns, and holds them."""
    stores = [
        kvtier.Store(kvtier.StoreConfig(dram_bytes=16 * 4096, disk_dir=None, disk_bytes=None))
        for _ in range(2)
    ]
    servers = [ServerThread(s) for s in stores]
    try:
        url = "kvtier://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
        with remote_only(tmp_path, url, "a") as client:
            cache = client.bind("m", LAYOUT)
            doc = list(range(6 * CHUNK))
            cache.save(doc, make_kv(len(doc)))
            client.flush()
            assert cache.pin(doc) == len(doc)
            pinned = [s.stats().tier("dram").pinned_chunks for s in stores]
            assert sum(pinned) == 6 and all(pinned), pinned
            churn(cache, 20, seed=1000)
            assert cache.lookup(doc) == len(doc)
            assert cache.unpin(doc) == len(doc)
            assert [s.stats().tier("dram").pinned_chunks for s in stores] == [0, 0]
    finally:
        for server, store in zip(servers, stores, strict=True):
            server.stop()
            store.close()


def test_chunks_no_server_holds_must_fit_the_client_dram(tmp_path: Path) -> None:
    """A prefix the server could not store (its DRAM is all pinned) lives only in the
    client's DRAM: pinning it there must hold all of it, or be refused; held, it outlives any
    amount of other saves."""
    server_store = kvtier.Store(
        kvtier.StoreConfig(dram_bytes=4 * 4096, disk_dir=None, disk_bytes=None, pin_fraction=1.0)
    )
    server = ServerThread(server_store)
    try:
        with remote_only(tmp_path, server.url, "a") as a:
            filler = a.bind("m", LAYOUT)
            tokens = [7] * (4 * CHUNK)
            filler.save(tokens, make_kv(len(tokens)))
            a.flush()
            assert filler.pin(tokens) == len(tokens)  # the server's DRAM is all pinned now
        for fraction, refused in ((0.5, True), (1.0, False)):
            config = client_config(
                tmp_path, server.url, f"b{fraction}", dram_bytes=4 * 4096, disk_dir=None,
                disk_bytes=None, pin_fraction=fraction,
            )  # fmt: skip
            with kvtier.Store(config) as b:
                cache = b.bind("m", LAYOUT)
                cache.save(DOC, make_kv(len(DOC)))
                b.flush()
                assert (
                    b.stats().dropped_chunks == 0 and server_store.stats().tier("dram").chunks == 4
                )
                if refused:
                    with pytest.raises(kvtier.PinRefused, match="dram"):
                        cache.pin(DOC)
                    continue
                assert cache.pin(DOC) == len(DOC)
                churn(cache, 10, seed=1000)
                assert cache.lookup(DOC) == len(DOC)
    finally:
        server.stop()
        server_store.close()


def test_unpin_with_the_server_down_removes_the_local_pins_first(tmp_path: Path) -> None:
    """An unpin while the server is down raises KvtierError saying so, after the local pins
    are removed (the chunks are evictable here); the server keeps its pin till asked again."""
    server_store = kvtier.Store(kvtier.StoreConfig(dram_bytes=1 << 20, disk_dir=None))
    server = ServerThread(server_store)
    try:
        with kvtier.Store(client_config(tmp_path, server.url, "a")) as store:
            cache = store.bind("m", LAYOUT)
            cache.save(DOC, make_kv(len(DOC)))
            store.flush()
            assert cache.pin(DOC) == len(DOC)
            server.stop()
            with pytest.raises(kvtier.KvtierError, match="local pins are removed"):
                cache.unpin(DOC)
            local = store._local_tiers()
            assert [t.stats().pinned_chunks for t in local] == [0, 0]
            assert len(store._pins) == 0
            assert server_store.stats().tier("dram").pinned_chunks == 3
    finally:
        server.stop()
        server_store.close()
