"""Pins under per-namespace DRAM quotas (the cache server's tenants): a namespace's DRAM
holds leave room under its quota, and a save its holds leave no room for is dropped at once,
never waiting on other namespaces' writes in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import make_config

import kvtier
from kvtier.keys import KEY_BYTES, Key
from kvtier.quota import NS_BYTES, Quota, Quotas, namespace_tag
from kvtier.tiers.base import Views
from kvtier.tiers.disk import DiskTier

PAGE = 4096  # a 512-byte chunk takes one page of DRAM
QUOTA = 8 * PAGE
QUOTAS = Quotas({"a": Quota(dram_bytes=QUOTA), "b": Quota(dram_bytes=QUOTA)})


def key(ns: str, i: int) -> Key:
    return namespace_tag(ns) + i.to_bytes(KEY_BYTES - NS_BYTES, "little")


def chunk(i: int) -> list[memoryview]:
    return [memoryview(bytes([i % 251]) * 512)]


@pytest.fixture
def stalled_b(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Namespace b's disk writes wait (a slow disk) until the event is set: its saves stay
    pending background writes meanwhile."""
    gate = threading.Event()
    put = DiskTier.put

    def slow_put(self: DiskTier, k: Key, src: Views, expires_ns: int = 0) -> bool:
        if k.startswith(namespace_tag("b")):
            gate.wait(30)
        return put(self, k, src, expires_ns)

    monkeypatch.setattr(DiskTier, "put", slow_put)
    yield gate
    gate.set()


def save_in_thread(store: kvtier.Store, keys: list[Key]) -> bool:
    """Save `keys` from another thread (a server executor thread); whether it finished
    within 10 s."""
    worker = threading.Thread(target=lambda: [store.write_chunk(k, chunk(9)) for k in keys])
    worker.start()
    worker.join(10)
    return not worker.is_alive()


def test_dram_holds_leave_room_under_the_quota_to_save(
    tmp_path: Path, stalled_b: threading.Event
) -> None:
    """A namespace pinning its whole DRAM quota of chunks (safe on disk) has only
    pin_fraction of its quota held in DRAM: its saves still get in, at once, while another
    namespace's writes are in flight; the other namespace's chunk is untouched."""
    config = make_config(tmp_path, dram_bytes=64 * PAGE, disk_bytes=1 << 20, pin_fraction=0.5)
    with kvtier.Store(config, QUOTAS) as store:
        pinned = [key("a", i) for i in range(8)]
        for k in pinned:
            store.write_chunk(k, chunk(1))
        store.flush()
        assert store.pin_keys(pinned) == 8
        stats = store.stats()
        assert stats.tier("disk").pinned_chunks == 8
        assert stats.tier("dram").pinned_chunks == 4  # half of a's quota
        store.write_chunk(key("b", 0), chunk(2))  # its disk write stays pending
        assert save_in_thread(store, [key("a", 100 + i) for i in range(8)])
        stats = store.stats()
        assert stats.dropped_chunks == 0 and stats.pending_writes > 0
        assert store.locate([key("a", 107)]).chunks == 1
        assert store.locate(pinned).chunks == 8  # the pin holds, on disk
        assert store.locate([key("b", 0)]).tiers == ("dram",)
        assert store.usage()["a"]["dram"].bytes <= QUOTA
        stalled_b.set()
        store.flush()
        store.check_integrity()


def test_a_save_the_holds_leave_no_room_for_is_dropped_at_once(
    tmp_path: Path, stalled_b: threading.Event
) -> None:
    """With pin_fraction=1 a namespace may hold its whole DRAM quota: a save of it then
    returns at once, counted dropped, not waiting while other namespaces' writes are in
    flight; the other namespace still saves."""
    config = make_config(tmp_path, dram_bytes=64 * PAGE, disk_bytes=1 << 20, pin_fraction=1.0)
    with kvtier.Store(config, QUOTAS) as store:
        pinned = [key("a", i) for i in range(8)]
        for k in pinned:
            store.write_chunk(k, chunk(1))
        store.flush()
        assert store.pin_keys(pinned) == 8
        assert store.stats().tier("dram").pinned_chunks == 8  # all of a's quota
        store.write_chunk(key("b", 0), chunk(2))  # its disk write stays pending
        assert save_in_thread(store, [key("a", 100), key("a", 101)])
        stats = store.stats()
        assert stats.dropped_chunks == 2 and stats.pending_writes > 0
        assert save_in_thread(store, [key("b", 1)])
        assert store.locate([key("b", 0), key("b", 1)]).chunks == 2
        stalled_b.set()
        store.flush()
        store.check_integrity()


def test_dram_only_pin_past_the_quota_share_is_refused(tmp_path: Path) -> None:
    """In a DRAM-only store a pin that would hold more than pin_fraction of its namespace's
    quota is refused naming the quota; within it, the namespace still saves past its pins."""
    config = make_config(
        tmp_path, dram_bytes=64 * PAGE, disk_dir=None, disk_bytes=None, pin_fraction=0.5
    )
    with kvtier.Store(config, QUOTAS) as store:
        keys = [key("a", i) for i in range(8)]
        for k in keys:
            store.write_chunk(k, chunk(1))
        with pytest.raises(kvtier.PinRefused, match="pin_fraction of its DRAM quota"):
            store.pin_keys(keys[:5])
        assert store.stats().tier("dram").pinned_chunks == 0
        assert store.pin_keys(keys[:4]) == 4
        for i in range(8):
            store.write_chunk(key("a", 100 + i), chunk(2))
        assert store.stats().dropped_chunks == 0
        assert store.locate(keys[:4]).chunks == 4
        assert store.locate([key("a", 107)]).chunks == 1
        store.check_integrity()
