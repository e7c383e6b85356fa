"""Expiries: the expiry times a tier keeps beside its index, and the heap of those due."""

from __future__ import annotations

from kvtier.expiry import HEAP_SLACK, Expiries
from kvtier.keys import Key


def key(i: int) -> Key:
    return i.to_bytes(16, "little")


def test_the_heap_stays_bounded_by_the_live_expiries() -> None:
    """Discarded and re-timed expiries do not pile up in the heap (100k set+discard pairs,
    50k re-timings of 10 keys); due() still hands out each live key once, oldest first."""
    expiries = Expiries()
    for i in range(100_000):  # a TTL'd chunk saved, then evicted
        expiries.set(key(i), 10**12 + i)
        expiries.discard(key(i))
    assert len(expiries._heap) <= HEAP_SLACK + 1  # the entries the heap keeps, live or not
    for t in range(50_000):  # promoted again and again: a new time each
        expiries.set(key(t % 10), 1000 + t)
    assert len(expiries) == 10
    assert len(expiries._heap) <= 2 * 10 + HEAP_SLACK + 1
    assert expiries.due(10**6) == [key(i) for i in range(10)]
    assert expiries.due(10**6) == []
    assert all(expiries.expired(key(i), 10**6) for i in range(10))
