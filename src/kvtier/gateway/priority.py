"""Priority classes and the gateway's admission queue.

A request's class is capped by its tenant's class and its API key's (the lower of the two;
a tenant or key without one gets the lowest class). The `x-kvtier-priority` header may ask
for a lower class, never a higher one. The class goes to vLLM as `priority` (its rank: lower
is earlier).

Below `capacity` requests in flight every request goes at once, whatever its class (a class
with nothing waiting lends its share). At saturation requests wait in one FIFO per class and
each freed slot goes to a class by stride scheduling: the class with the smallest pass is
served and its pass advances by 1/share, so over any busy period the classes are served in
proportion to their shares. A class that comes back from idle starts at the current pass
(no banked credit). A class's queue holds at most its share of `max_queued`; past that
`acquire` raises QueueFull (the gateway answers 429), so a class within its share is never
refused because others are flooding.

A class's `reserve` is a number of slots that lower-ranked classes leave idle for it: a
request may take a slot only while the slots left idle cover the reserves of every class
above its own. Without a reserve a request of the highest class that arrives at saturation
waits for the next slot to free; with one it usually finds a slot at once, at the cost of
those slots standing idle while no such request comes.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from kvtier.errors import ConfigError
from kvtier.gateway.limits_config import LimitsConfig, PriorityClass

PRIORITY_HEADER = "x-kvtier-priority"


def request_class(
    config: LimitsConfig, tenant: str, key: str | None, requested: str | None
) -> PriorityClass:
    """The class a request runs in: the cap of its tenant and key, or the lower class it
    asked for in `x-kvtier-priority` (an unknown or higher class is ignored)."""
    cap = config.lowest_class
    tenant_quota = config.tenants.get(tenant)
    if tenant_quota is not None and tenant_quota.class_name is not None:
        cap = config.priority_class(tenant_quota.class_name)
    key_quota = config.keys.get(key) if key is not None else None
    if key_quota is not None and key_quota.class_name is not None:
        key_class = config.priority_class(key_quota.class_name)
        cap = key_class if key_class.rank > cap.rank else cap
    if requested:
        for cls in config.classes:
            if cls.name == requested and cls.rank >= cap.rank:
                return cls
    return cap


def vllm_priority(cls: PriorityClass) -> int:
    """vLLM's `priority` for a class (lower is scheduled earlier)."""
    return cls.rank


class Ticket(NamedTuple):
    """A slot held until `AdmissionQueue.release`; `waited_s` is its time in the queue."""

    id: int
    class_name: str
    waited_s: float


class QueueFull(Exception):
    """The class's share of the admission queue is full: answer 429 and retry later."""

    def __init__(self, class_name: str, queued: int) -> None:
        super().__init__(
            f"the gateway is saturated and class {class_name!r} already has {queued} requests "
            "waiting: retry later"
        )
        self.class_name = class_name


class _Class:
    def __init__(
        self, cls: PriorityClass, share_sum: float, max_queued: int | None, reserved_above: int
    ) -> None:
        self.cls = cls
        self.reserved_above = reserved_above  # idle slots it must leave for higher classes
        self.stride = share_sum / cls.share
        self.pass_ = 0.0
        self.waiters: OrderedDict[int, asyncio.Future[None]] = OrderedDict()  # FIFO
        self.limit = None if max_queued is None else max(1, math.ceil(max_queued / self.stride))


class AdmissionQueue:
    """At most `capacity` tickets out at once; waiters served by class share, FIFO within a
    class. Cancellation-safe: a waiter cancelled before or after being granted a slot leaves
    no slot taken."""

    def __init__(
        self, capacity: int, classes: Sequence[PriorityClass], max_queued: int | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        share_sum = sum(c.share for c in classes)
        self.capacity = capacity
        self._classes = {
            c.name: _Class(
                c, share_sum, max_queued, sum(h.reserve for h in classes if h.rank < c.rank)
            )
            for c in classes
        }
        lowest = max(self._classes.values(), key=lambda c: c.cls.rank)
        if lowest.reserved_above >= capacity:
            raise ConfigError(
                f"the classes above {lowest.cls.name!r} reserve {lowest.reserved_above} admission "
                f"slots of {capacity}, which leaves it none: lower their reserve or raise "
                "--max-inflight"
            )
        self._in_flight = 0
        self._held: set[int] = set()
        self._ids = itertools.count()
        self._vtime = 0.0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def waiting(self, class_name: str) -> int:
        return len(self._classes[class_name].waiters)

    async def acquire(self, class_name: str) -> Ticket:
        """A slot for a request of `class_name`: at once below capacity, else in turn.
        Raises QueueFull when the class's share of the queue is full."""
        entry = self._classes[class_name]
        start = time.monotonic()
        if self._fits(entry) and not any(
            c.waiters for c in self._classes.values() if c.cls.rank <= entry.cls.rank
        ):
            self._in_flight += 1
            return self._ticket(class_name, start)
        if entry.limit is not None and len(entry.waiters) >= entry.limit:
            raise QueueFull(class_name, len(entry.waiters))
        if not entry.waiters:
            entry.pass_ = max(entry.pass_, self._vtime)  # back from idle: no banked credit
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter_id = next(self._ids)
        entry.waiters[waiter_id] = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                entry.waiters.pop(waiter_id, None)
            else:
                self._hand_over()  # granted, then cancelled before it ran: pass the slot on
            raise
        return self._ticket(class_name, start)

    def _ticket(self, class_name: str, start: float) -> Ticket:
        ticket = Ticket(next(self._ids), class_name, time.monotonic() - start)
        self._held.add(ticket.id)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give a ticket's slot back (to the next waiter by share, if any)."""
        if ticket.id not in self._held:
            raise ValueError(f"ticket {ticket.id} is not held (released twice?)")
        self._held.remove(ticket.id)
        self._hand_over()

    def _fits(self, entry: _Class) -> bool:
        """Whether a request of this class may take a slot now."""
        return self.capacity - self._in_flight > entry.reserved_above

    def _hand_over(self) -> None:
        """A slot was freed: grant it to the next waiter allowed to take it, or leave it idle."""
        self._in_flight -= 1
        while True:
            ready = [c for c in self._classes.values() if c.waiters and self._fits(c)]
            if not ready:
                return
            entry = min(ready, key=lambda c: (c.pass_, c.cls.rank))
            _, waiter = entry.waiters.popitem(last=False)
            if waiter.done():  # cancelled, its task not yet told
                continue
            self._vtime = entry.pass_
            entry.pass_ += entry.stride
            self._in_flight += 1
            waiter.set_result(None)
            return
