"""The durable task queue, producer and status side: what the gateway calls.

A task is a chat-completion body that an engine answers later. `submit` writes, in one
MULTI/EXEC, the task's status record (state `queued`) and a stream entry
(`XADD {stream} * task ID tenant DIGEST body JSON`); `kvtier queue-worker` processes beside
the engines read the stream as one consumer group and move the record through
`running` to `done` (with the completion) or `failed` (with the error, the task also in the
dead-letter stream `{stream}:dlq`). See `queue_worker` for the delivery protocol.

Ids are tenant-scoped: the record's key holds a digest of the tenant, so another tenant's
id reads as None (a 404), never as someone else's task. Records and the once-only marker
expire `result_ttl_s` after their last write. Redis failures raise StateUnavailable.

Layout (prefix = the stream's name):
  {stream}                     the tasks (never trimmed past an unacknowledged entry)
  {stream}:task:{digest}:{id}  hash: state, attempts, completion, error, *_at_ms, worker
  {stream}:done:{id}           the once-only marker: set NX by the one terminal write
  {stream}:dlq                 dead letters: task, tenant, body, error, attempts
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from kvtier.gateway.affinity import REDIS_TIMEOUT_S, StateUnavailable

STREAM = "kvtier:tasks"
GROUP = "engines"
RESULT_TTL_S = 86_400
TASK_ID = re.compile(r"task_[0-9a-f]{32}")
MAX_CONNECTIONS = 64  # a burst past this waits for a connection (up to POOL_WAIT_S), not 503
POOL_WAIT_S = 5.0


class TaskState(enum.Enum):
    """Where a task is: waiting, on an engine, answered, or given up (dead-lettered)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def tenant_digest(tenant: str) -> str:
    """The tenant as it appears in keys and entries (hashed: tenant names are config text)."""
    return hashlib.blake2b(tenant.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The Redis names of one queue (see the module docstring)."""

    stream: str = STREAM
    group: str = GROUP

    @property
    def dlq(self) -> str:
        return f"{self.stream}:dlq"

    def status(self, digest: str, task_id: str) -> str:
        return f"{self.stream}:task:{digest}:{task_id}"

    def done(self, task_id: str) -> str:
        return f"{self.stream}:done:{task_id}"

    def audit(self, what: str) -> str:
        """A hash of per-task counters kept outside the once-only guard (benchmarks)."""
        return f"{self.stream}:audit:{what}"


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """One task as its tenant sees it. `attempts`: deliveries that reached an engine (or
    were cut short by a worker's death); `completion` only when done; `error` when failed,
    or the last retryable error of a task queued again."""

    id: str
    state: TaskState
    attempts: int
    completion: dict[str, Any] | None
    error: str | None

    def body(self) -> dict[str, Any]:
        """The JSON answer of `GET /v1/queue/{id}`."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "queue.task",
            "status": self.state.value,
            "attempts": self.attempts,
        }
        if self.completion is not None:
            body["completion"] = self.completion
        if self.error is not None:
            body["error"] = {"message": self.error}
        return body


def parse_status(task_id: str, fields: dict[bytes, bytes]) -> TaskStatus | None:
    """A status record read with HGETALL; None when it is missing (expired or never made)."""
    state = fields.get(b"state")
    if state is None:
        return None
    completion = fields.get(b"completion")
    error = fields.get(b"error")
    return TaskStatus(
        id=task_id,
        state=TaskState(state.decode()),
        attempts=int(fields.get(b"attempts", b"0")),
        completion=None if completion is None else json.loads(completion),
        error=None if error is None else error.decode(),
    )


async def ensure_group(client: aioredis.Redis, keys: QueueKeys) -> None:
    """Create the stream and its consumer group (from the first entry) unless they exist."""
    try:
        await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class TaskQueue:
    """The gateway's handle on the queue: `submit`, `status`, `close`. Every method raises
    StateUnavailable when Redis cannot be reached or fails (answer 503)."""

    def __init__(
        self,
        url: str,
        stream: str = STREAM,
        group: str = GROUP,
        result_ttl_s: int = RESULT_TTL_S,
    ) -> None:
        if result_ttl_s < 1:
            raise ValueError(f"result_ttl_s must be at least 1, got {result_ttl_s}")
        self.keys = QueueKeys(stream, group)
        self.result_ttl_s = result_ttl_s
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        self._client = aioredis.Redis.from_pool(pool)
        self._group_ready = False

    async def submit(self, tenant: str, body: dict[str, Any]) -> str:
        """Queue a chat-completion body for `tenant`; its new id (`task_` + 32 hex digits).
        The record (`queued`) and the stream entry are written in one transaction."""
        task_id = f"task_{uuid.uuid4().hex}"
        digest = tenant_digest(tenant)
        status_key = self.keys.status(digest, task_id)
        entry = {"task": task_id, "tenant": digest, "body": json.dumps(body)}
        now_ms = int(time.time() * 1000)
        try:
            if not self._group_ready:
                await ensure_group(self._client, self.keys)
                self._group_ready = True
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(status_key, mapping={"state": "queued", "attempts": 0,
                                               "queued_at_ms": now_ms})  # fmt: skip
                pipe.expire(status_key, self.result_ttl_s)
                pipe.xadd(self.keys.stream, entry)  # type: ignore[arg-type]
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"the task queue's Redis failed: {exc}") from exc
        return task_id

    async def status(self, tenant: str, task_id: str) -> TaskStatus | None:
        """The task's status, or None when `tenant` has no task of that id (or it expired)."""
        if TASK_ID.fullmatch(task_id) is None:
            return None
        key = self.keys.status(tenant_digest(tenant), task_id)
        try:
            fields: dict[bytes, bytes] = await self._client.hgetall(key)  # type: ignore[assignment]
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"the task queue's Redis failed: {exc}") from exc
        return parse_status(task_id, fields)

    async def close(self) -> None:
        await self._client.aclose()
