"""LRUPolicy: victims in least-recently-used order, pinned keys never chosen."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.policy import LRUPolicy


def k(i: int) -> bytes:
    return bytes([i])


def test_victim_order_and_touch() -> None:
    """The oldest key is the victim; touching moves keys to most recent, in the given order."""
    lru = LRUPolicy()
    for i in range(4):
        lru.add(k(i))
    assert lru.victim() == k(0)
    lru.touch([k(0), k(5)])  # unknown keys are ignored
    assert lru.victim() == k(1)
    lru.touch([k(3), k(2), k(1)])  # a request's keys tail first: its head ends up newest
    order = []
    while (victim := lru.victim()) is not None:
        order.append(victim)
        lru.remove(victim)
    assert order == [k(0), k(3), k(2), k(1)]
    assert len(lru) == 0


def test_pins_protect_and_count() -> None:
    """A pinned key is skipped until its last pin is dropped; all pinned means no victim."""
    lru = LRUPolicy()
    lru.add(k(0))
    lru.add(k(1))
    lru.pin(k(0))
    lru.pin(k(0))
    assert lru.victim() == k(1)
    lru.pin(k(1))
    assert lru.victim() is None
    assert lru.unpin(k(0)) == 1
    assert lru.victim() is None and lru.pinned(k(0))
    assert lru.unpin(k(0)) == 0
    assert lru.victim() == k(0) and not lru.pinned(k(0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "touch", "pin", "unpin", "remove"]), st.integers(0, 5))
    )
)
def test_against_model(ops: list[tuple[str, int]]) -> None:
    """After any operation sequence the victim is the oldest unpinned key of a list model."""
    lru = LRUPolicy()
    order: list[bytes] = []
    pins: dict[bytes, int] = {}
    for op, i in ops:
        key = k(i)
        if op in ("add", "touch") and (op == "add" or key in order):
            if key in order:
                order.remove(key)
            order.append(key)
            if op == "add":
                lru.add(key)
            else:
                lru.touch([key])
        elif op == "pin":
            pins[key] = pins.get(key, 0) + 1
            lru.pin(key)
        elif op == "unpin" and pins.get(key):
            pins[key] -= 1
            assert lru.unpin(key) == pins[key]
        elif op == "remove":
            if key in order:
                order.remove(key)
            lru.remove(key)
        expected = next((x for x in order if not pins.get(x)), None)
        assert lru.victim() == expected
        assert len(lru) == len(order)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "touch", "pin", "unpin", "remove", "hold", "unhold"]),
            st.integers(0, 5),
        )
    )
)
def test_holds_against_model(ops: list[tuple[str, int]]) -> None:
    """User holds and reader pins are independent: the victim is the oldest key with neither
    (unholding makes a key the newest), a reader's unpin never drops a hold, and held bytes
    stay within the bound given to `hold` (3 bytes a key, bound 9)."""
    lru = LRUPolicy()
    order: list[bytes] = []
    pins: dict[bytes, int] = {}
    held: set[bytes] = set()
    for op, i in ops:
        key = k(i)
        if op in ("add", "touch") and (op == "add" or key in order):
            if key in order:
                order.remove(key)
            order.append(key)
            lru.add(key) if op == "add" else lru.touch([key])
        elif op == "pin":
            pins[key] = pins.get(key, 0) + 1
            lru.pin(key)
        elif op == "unpin" and pins.get(key):
            pins[key] -= 1
            lru.unpin(key)
        elif op == "remove":
            if key in order:
                order.remove(key)
            held.discard(key)
            lru.remove(key)
        elif op == "hold":
            fits = key not in order or key in held or 3 * (len(held) + 1) <= 9
            got = lru.hold({key: 3}, 9)
            assert (got is not None) == fits
            if got:
                held.add(key)
        elif op == "unhold" and key in held:
            held.discard(key)
            order.remove(key)
            order.append(key)
            assert lru.unhold([key]) == [key]
        assert {x for x in order if lru.held(x)} == held
        assert lru.held_bytes == 3 * len(held) <= 9
        expected = next((x for x in order if not pins.get(x) and x not in held), None)
        assert lru.victim() == expected
        assert len(lru) == len(order)
