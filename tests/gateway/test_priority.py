"""Priority classes (capped by tenant and key, lowered by a header) and the admission queue
(served by share at saturation, cancellation-safe)."""

from __future__ import annotations

import asyncio

import pytest

from kvtier.errors import ConfigError
from kvtier.gateway.limits_config import LimitsConfig, parse_limits
from kvtier.gateway.priority import AdmissionQueue, QueueFull, Ticket, request_class, vllm_priority

LIMITS = parse_limits(
    {
        "classes": {
            "paid": {"share": 0.8, "rank": 0},
            "standard": {"share": 0.5, "rank": 1},
            "free": {"share": 0.2, "rank": 2},
        },
        "tenants": {"acme": {"class": "paid"}, "hobby": {"class": "free"}},
        "keys": {"sk-intern": {"class": "standard"}, "sk-boss": {"class": "paid"}},
    }
)


def cls(tenant: str, key: str | None, header: str | None, config: LimitsConfig = LIMITS) -> str:
    return request_class(config, tenant, key, header).name


def test_header_lowers_but_never_raises_the_class() -> None:
    """x-kvtier-priority may pick a lower class; a higher or unknown one is ignored."""
    assert cls("acme", None, None) == "paid"
    assert cls("acme", None, "free") == "free"
    assert cls("hobby", None, "paid") == "free"
    assert cls("hobby", None, "standard") == "free"
    assert cls("acme", None, "platinum") == "paid"


def test_key_class_caps_its_tenant_class() -> None:
    """A key's class caps the tenant's (the lower wins); a key cannot lift its tenant."""
    assert cls("acme", "sk-intern", None) == "standard"
    assert cls("acme", "sk-intern", "paid") == "standard"
    assert cls("hobby", "sk-boss", None) == "free"
    assert cls("hobby", "sk-boss", "paid") == "free"


def test_unlisted_tenant_gets_the_lowest_class_and_rank_maps_to_vllm() -> None:
    """No class configured: the lowest; vLLM's priority is the class rank (lower first)."""
    assert cls("stranger", None, None) == "free"
    assert vllm_priority(LIMITS.priority_class("paid")) < vllm_priority(LIMITS.lowest_class)
    assert cls("anyone", None, None, parse_limits({})) == "default"


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_below_capacity_every_class_goes_at_once() -> None:
    """Below capacity a free request borrows idle capacity: no waiting, whatever its class."""

    async def scenario() -> list[Ticket]:
        queue = AdmissionQueue(4, LIMITS.classes)
        return [await asyncio.wait_for(queue.acquire("free"), 1) for _ in range(4)]

    tickets = run(scenario())
    assert isinstance(tickets, list) and len(tickets) == 4


def test_saturated_queue_serves_classes_by_share() -> None:
    """At saturation paid (0.8) gets 4 slots for free's (0.2) 1, FIFO within each class."""

    async def scenario() -> list[str]:
        queue = AdmissionQueue(1, [LIMITS.priority_class(n) for n in ("paid", "free")])
        holder = await queue.acquire("free")
        order: list[str] = []

        async def request(name: str, i: int) -> None:
            ticket = await queue.acquire(name)
            order.append(f"{name}{i}")
            await asyncio.sleep(0)
            queue.release(ticket)

        tasks = [asyncio.create_task(request(n, i)) for i in range(20) for n in ("free", "paid")]
        await asyncio.sleep(0)
        queue.release(holder)
        await asyncio.gather(*tasks)
        assert queue.in_flight == 0
        return order

    order = run(scenario())
    assert isinstance(order, list)
    first = order[:20]
    assert sum(o.startswith("paid") for o in first) == 16
    paid = [o for o in order if o.startswith("paid")]
    assert paid == [f"paid{i}" for i in range(20)]


def test_idle_class_banks_no_credit() -> None:
    """A class back from idle starts at the current pass: it does not take a long run."""

    async def scenario() -> list[str]:
        queue = AdmissionQueue(1, [LIMITS.priority_class(n) for n in ("paid", "free")])
        order: list[str] = []

        async def request(name: str) -> None:
            ticket = await queue.acquire(name)
            order.append(name)
            await asyncio.sleep(0)
            queue.release(ticket)

        holder = await queue.acquire("paid")
        alone = [asyncio.create_task(request("paid")) for _ in range(40)]
        await asyncio.sleep(0)
        queue.release(holder)
        await asyncio.gather(*alone)  # paid alone: free lends its share, banks nothing
        holder = await queue.acquire("paid")
        both = [asyncio.create_task(request(n)) for n in ["free"] * 10 + ["paid"] * 10]
        await asyncio.sleep(0)
        queue.release(holder)
        await asyncio.gather(*both)
        return order[40:]

    order = run(scenario())
    assert isinstance(order, list)
    assert order[:10].count("free") <= 3  # by share (2 in 10), not 10 in a row


def test_cancelled_waiters_leave_no_slot_taken() -> None:
    """Cancelling waiters (before or after their slot was granted) leaks no slot."""

    async def scenario() -> AdmissionQueue:
        queue = AdmissionQueue(2, LIMITS.classes)
        held = [await queue.acquire("paid"), await queue.acquire("free")]
        waiters = [asyncio.create_task(queue.acquire(n)) for n in ("free", "paid", "free")]
        await asyncio.sleep(0)
        waiters[0].cancel()  # cancelled while waiting
        queue.release(held[0])  # grants paid ...
        waiters[1].cancel()  # ... which is cancelled before it runs: the slot moves on
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert isinstance(results[1], asyncio.CancelledError)
        assert isinstance(results[2], Ticket)
        queue.release(results[2])
        queue.release(held[1])
        assert queue.in_flight == 0
        assert all(queue.waiting(c.name) == 0 for c in LIMITS.classes)
        again = [await asyncio.wait_for(queue.acquire("free"), 1) for _ in range(2)]
        assert len(again) == 2
        return queue

    run(scenario())


def test_release_twice_is_an_error() -> None:
    """A ticket is released once; a second release raises instead of freeing a slot twice."""

    async def scenario() -> None:
        queue = AdmissionQueue(1, LIMITS.classes)
        ticket = await queue.acquire("paid")
        queue.release(ticket)
        with pytest.raises(ValueError, match="released twice"):
            queue.release(ticket)

    run(scenario())


def test_full_queue_refuses_the_flooding_class_only() -> None:
    """A class's queue holds its share of max_queued: free flooding is refused, paid is not."""

    async def scenario() -> None:
        queue = AdmissionQueue(1, [LIMITS.priority_class(n) for n in ("paid", "free")], 10)
        holder = await queue.acquire("paid")
        frees = [asyncio.create_task(queue.acquire("free")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await queue.acquire("free")
        paid = [asyncio.create_task(queue.acquire("paid")) for _ in range(8)]
        await asyncio.sleep(0)
        assert queue.waiting("paid") == 8 and not any(t.done() for t in paid)
        for task in (*frees, *paid):
            task.cancel()
        await asyncio.gather(*frees, *paid, return_exceptions=True)
        queue.release(holder)
        assert queue.in_flight == 0

    run(scenario())


RESERVED = parse_limits(
    {"classes": {"paid": {"share": 0.8, "rank": 0, "reserve": 1}, "free": {"share": 0.2}}}
)


def test_reserve_keeps_slots_idle_for_the_higher_class() -> None:
    """With paid's reserve of 1, free takes at most capacity - 1 slots; a paid request that
    arrives while free waits gets the reserved slot at once, and the next freed slot goes
    back into reserve rather than to free."""

    async def scenario() -> None:
        queue = AdmissionQueue(3, RESERVED.classes)
        frees = [await asyncio.wait_for(queue.acquire("free"), 1) for _ in range(2)]
        third = asyncio.create_task(queue.acquire("free"))
        await asyncio.sleep(0.01)
        assert not third.done() and queue.in_flight == 2  # one slot stays idle
        paid = await asyncio.wait_for(queue.acquire("paid"), 1)
        assert paid.waited_s < 0.01 and queue.in_flight == 3
        queue.release(frees[0])  # free in flight: 1, paid: 1, idle: 1 -> stays in reserve
        await asyncio.sleep(0.01)
        assert not third.done()
        queue.release(paid)  # now two idle: free may take one
        ticket = await asyncio.wait_for(third, 1)
        queue.release(ticket)
        queue.release(frees[1])
        assert queue.in_flight == 0

    run(scenario())


def test_reserve_that_leaves_the_lowest_class_nothing_is_refused() -> None:
    """Reserves covering every slot would starve the lowest class: a clear ConfigError."""
    with pytest.raises(ConfigError, match="leaves it none"):
        AdmissionQueue(1, RESERVED.classes)
