"""DramTier: one pre-allocated pool, LRU eviction, pins that keep a chunk under its reader."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.pool import ALIGN
from kvtier.tiers.dram import DramTier


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def data(i: int, nbytes: int = 1000) -> bytes:
    return bytes([i % 251]) * nbytes


def get(tier: DramTier, i: int, nbytes: int = 1000) -> bytes | None:
    buf = bytearray(nbytes)
    return bytes(buf) if tier.get_into(key(i), [memoryview(buf)]) else None


def test_put_get_and_lru_eviction() -> None:
    """Chunks read back byte-exact; a full tier evicts its least recently touched chunk."""
    tier = DramTier(3 * ALIGN, prefault=False)
    for i in range(3):
        assert tier.put(key(i), [memoryview(data(i))])
    tier.touch([key(0)])
    assert tier.put(key(3), [memoryview(data(3))])
    assert get(tier, 1) is None
    assert [get(tier, i) for i in (0, 2, 3)] == [data(0), data(2), data(3)]
    stats = tier.stats()
    assert (stats.chunks, stats.evictions, stats.hits, stats.misses) == (3, 1, 3, 1)
    assert stats.bytes == stats.capacity_bytes == 3 * ALIGN
    tier.check_integrity()
    tier.close()


def test_acquired_chunk_is_never_evicted() -> None:
    """A chunk held by a reader survives any pressure and keeps its bytes until released."""
    tier = DramTier(2 * ALIGN, prefault=False)
    tier.put(key(0), [memoryview(data(0))])
    view = tier.acquire(key(0))
    assert view is not None
    for i in range(1, 6):
        assert tier.put(key(i), [memoryview(data(i))])
        assert bytes(view) == data(0)
    tier.put(key(9), [memoryview(data(9))])
    assert key(0) in tier
    tier.release(key(0))
    tier.put(key(10), [memoryview(data(10))])
    tier.put(key(11), [memoryview(data(11))])
    assert key(0) not in tier
    tier.check_integrity()
    tier.close()


def test_all_pinned_means_no_room() -> None:
    """When every chunk is pinned, reserve fails instead of exceeding capacity."""
    tier = DramTier(2 * ALIGN, prefault=False)
    assert tier.reserve(key(0), 100) is not None
    assert tier.reserve(key(1), 100) is not None
    assert tier.reserve(key(2), 100) is None
    assert tier.contains_prefix([key(0)]) == 0  # reserved but not committed: invisible
    tier.commit(key(0))
    tier.abort(key(1))
    assert tier.contains_prefix([key(0), key(1)]) == 1
    assert tier.reserve(key(2), 100) is not None
    assert tier.reserve(key(3), 3 * ALIGN) is None  # larger than the tier
    tier.check_integrity()
    tier.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "acquire", "release", "touch"]),
            st.integers(0, 12),
            st.integers(1, 3 * ALIGN),
        ),
        max_size=60,
    )
)
def test_random_ops_stay_bounded_and_exact(ops: list[tuple[str, int, int]]) -> None:
    """Any sequence keeps bytes <= capacity, serves only exact data, never drops a held chunk."""
    tier = DramTier(5 * ALIGN, prefault=False)
    sizes: dict[int, int] = {}
    held: dict[int, int] = {}
    for op, i, nbytes in ops:
        if op == "put":
            if tier.put(key(i), [memoryview(data(i, nbytes))]) and i not in sizes:
                sizes[i] = nbytes
        elif op in ("get", "acquire") and i in sizes:
            view = tier.acquire(key(i))
            if view is not None:
                assert bytes(view) == data(i, sizes[i])
                if op == "acquire":
                    held[i] = held.get(i, 0) + 1
                else:
                    tier.release(key(i))
        elif op == "release" and held.get(i):
            held[i] -= 1
            tier.release(key(i))
        elif op == "touch":
            tier.touch([key(i)])
        assert all(key(h) in tier for h, n in held.items() if n)
        stats = tier.stats()
        assert stats.bytes <= stats.capacity_bytes
        tier.check_integrity()
    tier.close()
