"""Quotas per key namespace inside the DRAM and disk tiers (the cache server's tenants)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.keys import Key
from kvtier.quota import NS_BYTES, UNKNOWN, Quota, Quotas, namespace_tag
from kvtier.tiers.disk import HEADER_BYTES, DiskTier
from kvtier.tiers.dram import DramTier

PAGE = 4096  # a DRAM chunk's extent; chunks below are one page
QUOTAS = Quotas(
    {"a": Quota(dram_bytes=4 * PAGE, disk_bytes=4 * (HEADER_BYTES + PAGE)), "b": Quota()}
)


def key(tenant: str, i: int) -> Key:
    return namespace_tag(tenant) + i.to_bytes(16 - NS_BYTES, "little")


def chunk(i: int) -> list[memoryview]:
    return [memoryview(bytes([i % 251]) * PAGE)]


def test_a_namespace_at_its_dram_quota_evicts_its_own_least_recent_chunks() -> None:
    """Namespace a, over its quota, loses its own LRU chunks; b's chunks all stay, though
    the tier is full and they are older than every one of a's."""
    tier = DramTier(12 * PAGE, prefault=False, quota=QUOTAS.ledger("dram"))
    for i in range(8):
        assert tier.put(key("b", i), chunk(i))
    for i in range(10):
        assert tier.put(key("a", i), chunk(i))
        tier.touch([key("a", 0)])  # a's first chunk stays the most recent: kept
    held = {i for i in range(10) if tier.contains_prefix([key("a", i)])}
    assert held == {0, 7, 8, 9}
    assert tier.contains_prefix([key("b", i) for i in range(8)]) == 8
    usage = tier.usage()
    assert usage["a"] == (4 * PAGE, 4, 4 * PAGE, 6)
    assert usage["b"] == (8 * PAGE, 8, None, 0)
    tier.check_integrity()


def test_pinned_chunks_are_never_quota_victims() -> None:
    """A namespace whose chunks are all pinned gets no room: the new chunk is refused."""
    tier = DramTier(64 * PAGE, prefault=False, quota=QUOTAS.ledger("dram"))
    for i in range(4):
        assert tier.put(key("a", i), chunk(i))
        assert tier.acquire(key("a", i)) is not None
    assert tier.reserve(key("a", 9), PAGE) is None
    tier.release(key("a", 0))
    assert tier.reserve(key("a", 9), PAGE) is not None
    assert not tier.contains_prefix([key("a", 0)])
    tier.abort(key("a", 9))
    tier.check_integrity()


def test_disk_quota_holds_and_its_accounting_survives_a_restart(tmp_path: Path) -> None:
    """On disk, a namespace over its quota loses its own oldest files; after reopening the
    directory every namespace's bytes are counted again (unknown ones together)."""
    tier = DiskTier(tmp_path, 1 << 20, quota=QUOTAS.ledger("disk"))
    for i in range(3):
        assert tier.put(key("b", i), chunk(i))
        assert tier.put(key("x", i), chunk(i))  # a namespace no quota names
    for i in range(6):
        assert tier.put(key("a", i), chunk(i))
    before = tier.usage()
    assert before["a"].chunks == 4 and before["a"].evictions == 2
    assert before["b"].chunks == 3 and before[UNKNOWN].chunks == 3
    tier.check_integrity()
    tier.close()
    again = DiskTier(tmp_path, 1 << 20, quota=QUOTAS.ledger("disk"))
    after = again.usage()
    assert {n: u.bytes for n, u in after.items()} == {n: u.bytes for n, u in before.items()}
    assert again.put(key("a", 9), chunk(9))  # a is at its quota: its oldest goes
    assert again.usage()["a"].chunks == 4 and again.usage()["b"].chunks == 3
    again.check_integrity()
    again.close()


def test_expired_chunks_go_before_a_namespaces_live_ones_at_its_quota(tmp_path: Path) -> None:
    """A namespace at its quota whose most recent chunks are past their TTL loses those, not
    its live ones, to a new chunk (DRAM and disk)."""
    dram = DramTier(64 * PAGE, prefault=False, quota=QUOTAS.ledger("dram"))
    disk = DiskTier(tmp_path, 1 << 20, quota=QUOTAS.ledger("disk"))
    for i in range(4):
        expires_ns = 1 if i >= 2 else 0  # 2 and 3: expired long ago
        slot = dram.reserve(key("a", i), PAGE)
        assert slot is not None
        slot[:] = chunk(i)[0]
        dram.commit(key("a", i), expires_ns=expires_ns)
        assert disk.put(key("a", i), chunk(i), expires_ns=expires_ns)
    for tier in (dram, disk):
        assert tier.put(key("a", 4), chunk(4))
        assert [tier.contains_prefix([key("a", i)]) for i in (0, 1, 4)] == [1, 1, 1]
        stats = tier.stats()
        assert (stats.expired, stats.evictions, tier.usage()["a"].evictions) == (2, 0, 0)
        tier.check_integrity()
        tier.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "get", "delete", "touch"]), st.sampled_from("abc"),
                  st.integers(0, 11)),
        max_size=80,
    )
)  # fmt: skip
def test_random_operations_keep_every_namespace_within_its_quota(
    ops: list[tuple[str, str, int]],
) -> None:
    """Whatever the sequence (a third namespace without a quota filling the tier too), a
    namespace never holds more than its quota and the ledger agrees with the tier."""
    quotas = Quotas({"a": Quota(dram_bytes=3 * PAGE), "b": Quota(dram_bytes=5 * PAGE)})
    tier = DramTier(12 * PAGE, prefault=False, quota=quotas.ledger("dram"))
    for op, ns, i in ops:
        k = key(ns, i)
        if op == "put":
            tier.put(k, chunk(i))
        elif op == "get":
            tier.get_into(k, [memoryview(bytearray(PAGE))])
        elif op == "delete":
            tier.delete(k)
        else:
            tier.touch([k])
        usage = tier.usage()
        assert usage["a"].bytes <= 3 * PAGE and usage["b"].bytes <= 5 * PAGE
        tier.check_integrity()
    tier.close()
