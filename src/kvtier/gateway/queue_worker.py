"""`kvtier queue-worker`: one member of the queue's consumer group, beside one engine.

Delivery protocol (at-least-once delivery, exactly-once effect):
1. Read: first this consumer's own pending entries (`XREADGROUP … 0`: a restart under the
   same name resumes them), then new ones (`>`), never more than the free slots.
2. Run: `begin` (skip a task already ended; count the delivery), POST the body to the
   engine, then `finish`: the terminal write and the XACK in one script, guarded by a
   marker set NX, so a task delivered twice takes effect once.
3. Heartbeat: every idle_timeout/3 each running entry's idle time is reset
   (`XCLAIM … 0 id JUSTID`, delivery count unchanged), so no janitor steals a live task;
   an entry found owned by another consumer is cancelled here (its result would be a no-op).
4. Janitor, every claim period: `XAUTOCLAIM min-idle=idle_timeout` takes over entries whose
   consumer died or handed them back (even into up to `concurrency` extra slots: they are
   older than any new task), so a dead worker's task runs again within idle_timeout + claim
   period; then `tidy` (bounded, safe trim).
5. Failures: permanent ones (see `queue_engine`) and the `max_deliveries`-th retryable
   one end the task as failed, into the dead-letter stream; other retryable ones are handed
   back at once for another delivery.
6. SIGTERM: stop reading; running tasks get `drain_s` to finish, the rest are handed back
   (their attempt refunded); exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvtier.config import env_default
from kvtier.gateway.queue_engine import Engine, EngineError
from kvtier.gateway.queue_scripts import Entry, QueueScripts
from kvtier.gateway.taskqueue import GROUP, RESULT_TTL_S, STREAM, QueueKeys, ensure_group

READ_BLOCK_MS = 500
PRUNE_IDLE_FACTOR = 10  # consumers silent this many idle timeouts (and owning nothing) go


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """One queue worker. Times in seconds; `max_len`: trim once the stream is longer."""

    redis_url: str
    engine_url: str
    name: str
    stream: str = STREAM
    group: str = GROUP
    concurrency: int = 8
    idle_timeout_s: float = 30.0
    claim_every_s: float = 5.0
    max_deliveries: int = 3
    max_len: int = 10_000
    task_timeout_s: float = 600.0
    drain_s: float = 30.0
    result_ttl_s: int = RESULT_TTL_S
    audit: bool = False
    engine_api_key: str = ""  # sent as `Authorization: Bearer` (vLLM's --api-key)

    def __post_init__(self) -> None:
        positive = {
            "concurrency": self.concurrency,
            "idle_timeout_s": self.idle_timeout_s,
            "claim_every_s": self.claim_every_s,
            "max_deliveries": self.max_deliveries,
            "task_timeout_s": self.task_timeout_s,
            "result_ttl_s": self.result_ttl_s,
        }
        for field, value in positive.items():
            if value <= 0:
                raise ValueError(f"{field} must be positive, got {value}")
        if self.max_len < 0 or self.drain_s < 0:
            raise ValueError("max_len and drain_s must not be negative")

    @property
    def idle_ms(self) -> int:
        return int(self.idle_timeout_s * 1000)


def _entries(raw: list[Any]) -> tuple[list[Entry], list[str]]:
    """Parsed entries, and the ids of entries deleted from the stream while pending."""
    good, gone = [], []
    for entry_id, fields in raw:
        eid = entry_id.decode()
        if not fields:
            gone.append(eid)
            continue
        f = {k.decode(): v.decode() for k, v in fields.items()}
        good.append(Entry(eid, f["task"], f["tenant"], f["body"]))
    return good, gone


class QueueWorker:
    """Runs tasks from the queue on one engine until `stop` is set (see the module doc)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.keys = QueueKeys(config.stream, config.group)
        self.client = aioredis.Redis.from_url(config.redis_url, socket_timeout=10.0)
        self.scripts = QueueScripts(self.client, self.keys, config.name, config.result_ttl_s)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.held: dict[str, Entry] = {}
        self.calling: set[str] = set()  # entries waiting on the engine (safe to cancel)
        self.stop = asyncio.Event()
        self.engine: Engine | None = None

    def _free(self) -> int:
        return self.config.concurrency - len(self.running)

    async def run(self, stop: asyncio.Event) -> None:
        self.stop = stop
        config = self.config
        self.engine = Engine(config.engine_url, config.task_timeout_s, config.engine_api_key)
        helpers = [
            asyncio.create_task(self._every(self.config.idle_timeout_s / 3, self._beat)),
            asyncio.create_task(self._every(self.config.claim_every_s, self._janitor)),
        ]
        try:
            await ensure_group(self.client, self.keys)
            await self._guarded(self._read("0", stop))
            while not stop.is_set():
                await self._guarded(self._read(">", stop))
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self.engine.close()
            await self.client.aclose()

    async def _read(self, start: str, stop: asyncio.Event) -> None:
        """One XREADGROUP for the free slots; from `0` (own pending), repeat until none."""
        while not stop.is_set():
            if self._free() <= 0:
                await asyncio.wait(list(self.running.values()), timeout=READ_BLOCK_MS / 1000,
                                   return_when="FIRST_COMPLETED")  # fmt: skip
                continue
            block = READ_BLOCK_MS if start == ">" else None
            streams: Any = {self.keys.stream: start}
            reply: Any = await self.client.xreadgroup(
                self.config.group, self.config.name, streams, self._free(), block
            )
            raw = reply[0][1] if reply else []
            entries, gone = _entries(raw)
            await self._ack_gone(gone)
            for entry in entries:
                self._start(entry)
            if start == ">" or not raw:
                return
            start = raw[-1][0].decode()

    def _start(self, entry: Entry) -> None:
        if entry.id not in self.running:
            self.held[entry.id] = entry
            self.running[entry.id] = asyncio.create_task(self._task(entry))

    async def _task(self, entry: Entry) -> None:
        try:
            await self._guarded(self._deliver(entry))
        finally:
            self.running.pop(entry.id, None)
            self.held.pop(entry.id, None)

    async def _deliver(self, entry: Entry) -> None:
        began = await self.scripts.begin(entry, self.config.max_deliveries)
        if not began.run:
            return
        assert self.engine is not None
        self.calling.add(entry.id)
        try:
            completion = await self.engine.complete(json.loads(entry.body))
        except EngineError as exc:
            if exc.retryable and began.attempts < self.config.max_deliveries:
                await self.scripts.hand_back(entry, self.config.idle_ms, str(exc), refund=False)
            else:
                await self.scripts.failed(entry, str(exc))
            return
        finally:
            self.calling.discard(entry.id)
        if self.config.audit:
            await self.client.hincrby(self.keys.audit("executed"), entry.task, 1)
        if await self.scripts.done(entry, completion) and self.config.audit:
            await self.client.hincrby(self.keys.audit("applied"), entry.task, 1)

    async def _beat(self) -> None:
        """Keep running entries ours; one another consumer took (this one stalled past the
        idle timeout) is cancelled if still on the engine (its finish would be a no-op)."""
        for lost in await self.scripts.heartbeat(list(self.running)):
            task = self.running.get(lost)
            if task is not None and lost in self.calling:
                task.cancel()

    async def _janitor(self) -> None:
        """Take over idle entries (one pass over the whole PEL), then tidy. Taken-over tasks
        are older than any new one, so they may use up to `concurrency` slots beyond the
        reader's: a worker full of new tasks still picks up a dead consumer's at once."""
        c, cursor = self.config, "0-0"
        while (room := self._free() + c.concurrency) > 0 and not self.stop.is_set():
            reply: Any = await self.client.xautoclaim(
                self.keys.stream, c.group, c.name, c.idle_ms, cursor, count=room
            )
            for entry in _entries(reply[1])[0]:
                self._start(entry)
            cursor = reply[0].decode()
            if cursor == "0-0":
                break
        prune_ms = self.config.idle_ms * PRUNE_IDLE_FACTOR
        await self.scripts.tidy(self.config.max_len, prune_ms)

    async def _ack_gone(self, gone: list[str]) -> None:
        """Entries deleted while pending (never by this queue's own trimming): ack them."""
        if gone:
            print(f"queue-worker: {len(gone)} pending entries were deleted", file=sys.stderr)
            await self.client.xack(self.keys.stream, self.config.group, *gone)

    async def _drain(self) -> None:
        """Give running tasks `drain_s`, then cancel the rest and hand them back."""
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=self.config.drain_s)
        left = [self.held[entry_id] for entry_id in self.running]
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in left:
            await self._guarded(self.scripts.hand_back(entry, self.config.idle_ms, "", True))

    async def _every(self, period_s: float, step: Any) -> None:
        while True:
            await asyncio.sleep(period_s)
            await self._guarded(step())

    async def _guarded(self, work: Any) -> None:
        """Run `work`; a Redis failure is reported and waited out, never fatal."""
        try:
            await work
        except (RedisError, OSError) as exc:
            print(f"queue-worker {self.config.name}: Redis failed: {exc}", file=sys.stderr)
            await asyncio.sleep(1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = WorkerConfig("", "", "")
    arg = parser.add_argument

    def env(name: str, default: object) -> str | None:
        return env_default(f"KVTIER_QUEUE_{name}", None if default is None else str(default))

    arg("--redis", default=env("REDIS", None), required=env("REDIS", None) is None,
        help="the queue's Redis, redis://host:port/db")  # fmt: skip
    arg("--engine", default=env("ENGINE", None), required=env("ENGINE", None) is None,
        help="the engine's base URL (its /v1/chat/completions answers the tasks)")  # fmt: skip
    arg("--name", default=env("NAME", f"{socket.gethostname()}-{os.getpid()}"),
        help="consumer name; restarting under the same name resumes its pending tasks")  # fmt: skip
    arg("--stream", default=env("STREAM", d.stream), help="the task stream")
    arg("--group", default=env("GROUP", d.group), help="the consumer group")
    ints = {
        "concurrency": (d.concurrency, "tasks run at once"),
        "max-deliveries": (d.max_deliveries, "deliveries before a task is dead-lettered"),
        "max-len": (d.max_len, "trim the stream (acknowledged entries only) past this"),
        "result-ttl-s": (d.result_ttl_s, "seconds a finished task's record is kept"),
    }
    floats = {
        "idle-timeout-s": (d.idle_timeout_s, "a task idle this long is taken over"),
        "claim-every-s": (d.claim_every_s, "the janitor's period"),
        "task-timeout-s": (d.task_timeout_s, "an engine call's limit (then retryable)"),
        "drain-s": (d.drain_s, "on SIGTERM, time for running tasks to finish"),
    }
    for kind, options in ((int, ints), (float, floats)):
        for name, (default, text) in options.items():
            env_name = name.upper().replace("-", "_")
            arg(f"--{name}", type=kind, default=env(env_name, default), help=text)
    arg("--engine-api-key", default=env("ENGINE_API_KEY", ""),
        help="sent to the engine as `Authorization: Bearer KEY` (vLLM's --api-key)")  # fmt: skip
    arg("--audit", action="store_true", help="count executions and effects per task (benches)")


def run(args: argparse.Namespace) -> int:
    try:
        config = WorkerConfig(
            args.redis, args.engine, args.name, args.stream, args.group, args.concurrency,
            args.idle_timeout_s, args.claim_every_s, args.max_deliveries, args.max_len,
            args.task_timeout_s, args.drain_s, args.result_ttl_s, args.audit, args.engine_api_key,
        )  # fmt: skip
    except ValueError as exc:
        print(f"kvtier queue-worker: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_main(config))
    return 0


async def _main(config: WorkerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = QueueWorker(config)
    print(f"kvtier queue-worker {config.name}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await worker.run(stop)
