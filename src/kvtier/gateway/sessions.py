"""Stored responses: what `previous_response_id` points at, kept in memory or in Redis.

A stored response is immutable and carries the whole conversation it ends (every input message
and every assistant answer up to and including its own, `instructions` excluded). Continuing
it reads one entry and writes a new one under a new id; nothing is ever read, modified and
written back. So no turn is lost under concurrent continuations: two requests continuing the
same `previous_response_id` become two responses, two branches of the conversation, each
holding its full history. A put is one atomic write (`SET key value PX ttl` in Redis), and
every entry expires `ttl_s` after its put.

Ids are tenant-scoped: the tenant is part of the key (hashed, so no tenant name can collide
with another's key), and an id stored by tenant A reads as `None` for tenant B.

Layout in Redis (7.0 commands only: SET with NX and PXAT, PEXPIREAT with GT, GET, MGET, DEL):
- `{prefix}resp:{tenant tag}:{resp_id}` -> the response as JSON, its history as message ids;
- `{prefix}msg:{tenant tag}:{message id}` -> one message as JSON, its id a BLAKE2b-128 hash
  of it, so a message is stored once however many responses of the conversation (or of
  the tenant's other conversations) hold it. A conversation's bytes grow with its turns,
  not their square (its commands still with their square: a put touches every message of
  its history). Each put moves the expiry of the messages its history holds to its own
  (never earlier) before it writes its own entry, so a message lives at least as long as
  every response that holds it; a response one of whose messages is gone reads as None.
  Deleting a response deletes its entry only: its messages expire with their last holder.
The tenant tag is a hash of the tenant name (`tenant_tag`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvtier.gateway.affinity import StateUnavailable, redis_client

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


def new_response_id() -> str:
    """A fresh response id: `resp_` and 32 random hex digits."""
    return f"resp_{uuid.uuid4().hex}"


def is_response_id(text: str) -> bool:
    """Whether `text` has the shape of an id minted by `new_response_id`."""
    return RESPONSE_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One finished response. `history` is the conversation it ends, as chat messages
    `{"role", "content"}` with string contents, its own assistant answer last; `usage` is the
    Responses API usage object; `instructions` are this response's own (never inherited)."""

    id: str
    tenant: str
    model: str
    created_at: int
    history: tuple[dict[str, str], ...]
    output_text: str
    usage: dict[str, Any]
    previous_response_id: str | None = None
    instructions: str | None = None

    def to_json(self) -> str:
        """The response as one JSON object (`from_json` reads it back equal)."""
        return _json(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredResponse:
        """The response `to_json` wrote; raises `ValueError` on anything else."""
        try:
            return cls.from_fields(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a stored response: {exc}") from exc

    @classmethod
    def from_fields(cls, fields: Any) -> StoredResponse:
        """The response of `to_json`'s fields, parsed; raises `ValueError` on anything else."""
        try:
            history = tuple(
                {"role": str(m["role"]), "content": str(m["content"])} for m in fields["history"]
            )
            return cls(**{**fields, "history": history})
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a stored response: {exc}") from exc


class ResponseStore(Protocol):
    """Where responses live between turns.

    Contract: entries are tenant-scoped (`get(B, id)` is None for an id put by tenant A); a
    `put` is atomic (a reader sees the whole response or nothing) and never changes another
    entry; an entry reads as None once `ttl_s` seconds have passed since its put. Ids that are
    not `resp_` + 32 hex digits are simply not found. A store outage raises StateUnavailable.
    """

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The response stored under (`tenant`, `response_id`), or None."""
        ...

    async def put(self, response: StoredResponse, ttl_s: float) -> None:
        """Stores `response` under (`response.tenant`, `response.id`) for `ttl_s` seconds."""
        ...

    async def delete(self, tenant: str, response_id: str) -> bool:
        """Removes the entry; True if there was one."""
        ...

    async def close(self) -> None:
        """Releases connections; the store is unusable afterwards."""
        ...


class MemoryResponseStore:
    """A `ResponseStore` inside one gateway process (gone when it exits). Bounded: each put
    drops expired entries from the oldest end and the oldest entries beyond `max_entries`."""

    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, StoredResponse]] = OrderedDict()

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        entry = self._entries.get((tenant, response_id))
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[(tenant, response_id)]
            return None
        return entry[1]

    async def put(self, response: StoredResponse, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if not is_response_id(response.id):
            raise ValueError(f"not a response id: {response.id!r}")
        now = self._clock()
        key = (response.tenant, response.id)
        self._entries.pop(key, None)
        self._entries[key] = (now + ttl_s, response)
        while self._entries:
            oldest_key, (expires_at, _) = next(iter(self._entries.items()))
            if expires_at > now and len(self._entries) <= self.max_entries:
                break
            del self._entries[oldest_key]

    async def delete(self, tenant: str, response_id: str) -> bool:
        return self._entries.pop((tenant, response_id), None) is not None

    async def close(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _message_json(message: dict[str, str]) -> str:
    return _json({"role": message["role"], "content": message["content"]})


def message_id(message_json: str) -> str:
    """A message's id in Redis: 32 hex digits of the BLAKE2b hash of its JSON."""
    return hashlib.blake2b(message_json.encode("utf-8"), digest_size=16).hexdigest()


def tenant_tag(tenant: str) -> str:
    """The tenant as it appears in a key: 32 hex digits of its BLAKE2b hash."""
    return hashlib.blake2b(tenant.encode("utf-8"), digest_size=16).hexdigest()


class RedisResponseStore:
    """A `ResponseStore` in Redis, shared by every gateway replica and surviving their
    restarts: a new store object on the same Redis sees what the old one put."""

    def __init__(self, url: str, prefix: str = "kvtier:") -> None:
        self.prefix = prefix
        self._redis: aioredis.Redis = redis_client(url)

    def key(self, tenant: str, response_id: str) -> str:
        """The Redis key of (`tenant`, `response_id`)."""
        return f"{self.prefix}resp:{tenant_tag(tenant)}:{response_id}"

    def message_key(self, tenant: str, message_id: str) -> str:
        """The Redis key of one of `tenant`'s messages."""
        return f"{self.prefix}msg:{tenant_tag(tenant)}:{message_id}"

    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        if not is_response_id(response_id):
            return None
        try:
            raw = await self._redis.get(self.key(tenant, response_id))
            if raw is None:
                return None
            fields = json.loads(raw)
            if not isinstance(fields, dict):
                raise TypeError(f"a JSON {type(fields).__name__}")
            ids = fields.pop("history_ids", None)
            if ids is not None:  # (entries of older gateways hold their history itself)
                keys = [self.message_key(tenant, str(i)) for i in ids]
                messages = await self._redis.mget(keys) if keys else []
                history = [json.loads(m) for m in messages if m is not None]
                if len(history) != len(keys):
                    return None  # a message expired with its last other holder
                fields["history"] = history
                if fields.get("output_text") is None and history:  # its answer, stored once
                    fields["output_text"] = history[-1].get("content")
        except RedisError as exc:
            raise StateUnavailable(f"Redis: {exc}") from exc
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a stored response: {exc}") from exc
        response = StoredResponse.from_fields(fields)
        return response if response.tenant == tenant and response.id == response_id else None

    async def put(self, response: StoredResponse, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if not is_response_id(response.id):
            raise ValueError(f"not a response id: {response.id!r}")
        # One deadline for the entry and its messages (on this gateway's clock), so no
        # message of it expires first.
        deadline_ms = round(time.time() * 1000) + max(1, round(ttl_s * 1000))
        texts = [_message_json(m) for m in response.history]
        ids = [message_id(text) for text in texts]
        keys = [self.message_key(response.tenant, i) for i in ids]
        record = {**asdict(response), "history_ids": ids}
        del record["history"]
        if response.history and response.output_text == response.history[-1]["content"]:
            record["output_text"] = None  # the last message's: not stored twice
        try:
            # Messages that exist live on, at least as long as this entry; the others (new
            # or gone meanwhile) are written with it, in one transaction, before it.
            extend = self._redis.pipeline(transaction=False)
            for key in keys:
                extend.pexpireat(key, deadline_ms, gt=True)
            extended = await extend.execute() if keys else []
            write = self._redis.pipeline(transaction=True)
            for key, text, kept in zip(keys, texts, extended, strict=True):
                if not kept:  # missing, or expiring later already: NX leaves the latter be,
                    write.set(key, text, pxat=deadline_ms, nx=True)
                    # and one another put wrote meanwhile lives to this deadline too
                    write.pexpireat(key, deadline_ms, gt=True)
            write.set(self.key(response.tenant, response.id), _json(record), pxat=deadline_ms)
            await write.execute()
        except RedisError as exc:
            raise StateUnavailable(f"Redis: {exc}") from exc

    async def delete(self, tenant: str, response_id: str) -> bool:
        if not is_response_id(response_id):
            return False
        try:
            return bool(await self._redis.delete(self.key(tenant, response_id)))
        except RedisError as exc:
            raise StateUnavailable(f"Redis: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()
