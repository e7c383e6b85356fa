"""Affinities: the worker a conversation went to last, shared by every gateway replica.

A request names its conversation by `prompt_cache_key`, by `user`, or (Responses API) by the
response it continues. The gateway remembers, per tenant and name, the worker it chose and how
many prompt blocks it sent there, so the next turn is credited with that prefix even on a
replica whose own index never saw it. In Redis (one GET before routing, one SET after, each
key with a TTL refreshed on use) affinities survive a replica's death; without Redis they live
in the one gateway's memory.
"""

from __future__ import annotations

import hashlib
import time
from typing import NamedTuple, Protocol

from redis import asyncio as aioredis
from redis.exceptions import RedisError

MEMORY_ENTRIES = 100_000
REDIS_TIMEOUT_S = 1.0  # a Redis that stalls costs a request this much, then is skipped


class StateUnavailable(OSError):
    """Redis could not be reached or failed: the caller counts it and goes on without."""


def redis_client(url: str) -> aioredis.Redis:
    """A client that gives up within REDIS_TIMEOUT_S instead of stalling a request."""
    return aioredis.Redis.from_url(
        url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )


class Binding(NamedTuple):
    """A conversation's last worker, and the prompt blocks it was sent: `blocks` of them,
    the last with key `last_key` (credited only to a prompt that has that block there)."""

    worker_url: str
    blocks: int
    last_key: int


def affinity_key(tenant: str, name: str) -> str:
    """A tenant-scoped key for an affinity name (hashed: names are client text)."""
    digest = hashlib.blake2b(f"{tenant}\0{name}".encode(), digest_size=16).hexdigest()
    return f"aff:{digest}"


class AffinityStore(Protocol):
    """Bindings with a TTL. `get` of an unknown or expired key is None; failures of the
    backing store are raised as OSError-derived errors for the caller to count and skip."""

    async def get(self, key: str) -> Binding | None: ...

    async def put(self, key: str, binding: Binding, ttl_s: int) -> None: ...

    async def close(self) -> None: ...


class MemoryAffinities:
    """One gateway's bindings, the oldest dropped beyond `max_entries`."""

    def __init__(self, max_entries: int = MEMORY_ENTRIES) -> None:
        self._entries: dict[str, tuple[Binding, float]] = {}
        self._max = max_entries

    async def get(self, key: str) -> Binding | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    async def put(self, key: str, binding: Binding, ttl_s: int) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (binding, time.monotonic() + ttl_s)
        while len(self._entries) > self._max:
            del self._entries[next(iter(self._entries))]

    async def close(self) -> None:
        self._entries.clear()


class RedisAffinities:
    """Bindings in Redis as `{prefix}aff:<digest>` -> "blocks last_key url" with EX."""

    def __init__(self, url: str, prefix: str = "kvtier:") -> None:
        self._redis = redis_client(url)
        self._prefix = prefix

    async def get(self, key: str) -> Binding | None:
        try:
            raw = await self._redis.get(self._prefix + key)
        except RedisError as exc:
            raise StateUnavailable(f"Redis: {exc}") from exc
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        blocks, last_key, url = [*text.split(" ", 2), "", ""][:3]
        if not (blocks.isdigit() and last_key.isdigit() and url):
            return None
        return Binding(url, int(blocks), int(last_key))

    async def put(self, key: str, binding: Binding, ttl_s: int) -> None:
        value = f"{binding.blocks} {binding.last_key} {binding.worker_url}"
        try:
            await self._redis.set(self._prefix + key, value, ex=max(int(ttl_s), 1))
        except RedisError as exc:
            raise StateUnavailable(f"Redis: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()
