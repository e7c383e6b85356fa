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


def test_resave_after_delete_under_a_reader() -> None:
    """A chunk deleted while a reader holds it can be saved again at once: the new bytes are
    served while the reader keeps the old ones, which are freed when it releases."""
    tier = DramTier(4 * ALIGN, prefault=False)
    tier.put(key(0), [memoryview(data(0))])
    view = tier.acquire(key(0))
    assert view is not None
    assert tier.delete(key(0))
    assert key(0) not in tier
    assert tier.put(key(0), [memoryview(data(1))])
    assert get(tier, 0) == data(1)
    assert bytes(view) == data(0)
    assert tier.stats().bytes == 2 * ALIGN
    tier.check_integrity()
    tier.release(key(0))
    assert get(tier, 0) == data(1)
    assert (tier.stats().chunks, tier.stats().bytes) == (1, ALIGN)
    tier.check_integrity()
    tier.close()


def version(i: int, nbytes: int) -> bytes:
    """Bytes of chunk `i` saved with `nbytes` (so a re-saved chunk differs from its old self)."""
    return bytes([(13 * i + nbytes) % 251]) * nbytes


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "acquire", "release", "touch", "delete"]),
            st.integers(0, 12),
            st.integers(1, 3 * ALIGN),
        ),
        max_size=60,
    )
)
def test_random_ops_stay_bounded_and_exact(ops: list[tuple[str, int, int]]) -> None:
    """Any sequence (deletes and re-saves included) keeps bytes <= capacity, serves only the
    latest saved bytes of a chunk, and never changes the bytes under a reader."""
    tier = DramTier(5 * ALIGN, prefault=False)
    stored: dict[int, bytes] = {}
    held: dict[int, list[tuple[memoryview, bytes]]] = {}
    for op, i, nbytes in ops:
        if op == "put":
            new = key(i) not in tier
            if tier.put(key(i), [memoryview(version(i, nbytes))]) and new:
                stored[i] = version(i, nbytes)
        elif op in ("get", "acquire"):
            view = tier.acquire(key(i))
            if view is not None:
                assert bytes(view) == stored[i]
                if op == "acquire":
                    held.setdefault(i, []).append((view, stored[i]))
                else:
                    tier.release(key(i))
        elif op == "release" and held.get(i):
            held[i].pop()
            tier.release(key(i))
        elif op == "touch":
            tier.touch([key(i)])
        elif op == "delete":
            tier.delete(key(i))
            stored.pop(i, None)
        assert all(bytes(view) == want for views in held.values() for view, want in views)
        stats = tier.stats()
        assert stats.bytes <= stats.capacity_bytes
        tier.check_integrity()
    tier.close()
