"""One `kvtier bench queue` run: a redis-server, one `kvtier worker-sim` engine, M
`kvtier queue-worker --audit` processes; a closed-loop producer keeps `backlog` tasks
outstanding; at evenly spaced points of progress a random worker that holds tasks (and no
long task) is killed with SIGKILL and replaced by a worker with a new name.

What it records while running: each kill's time and the entries the dead consumer held
(XPENDING after the kill: exactly its unacknowledged tasks), the stream's length, and
whether any pending entry is missing from the stream (a trim past an unacknowledged entry).
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from kvtier.bench.gateway_procs import Process
from kvtier.gateway.taskqueue import QueueKeys, TaskQueue, tenant_digest

TENANT = "bench"
SIM_BANNER = re.compile(r"^worker-sim (http://\S+)$")
TICK_S = 0.05
REPORT_EVERY_S = 10.0
MISSING = """
local missing = 0
for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100000)) do
  if #redis.call('XRANGE', KEYS[1], e[1], e[1]) == 0 then missing = missing + 1 end
end
return missing
"""


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    tasks: int
    workers: int
    kills: int
    concurrency: int = 8
    idle_timeout_s: float = 2.0
    claim_every_s: float = 0.5
    max_deliveries: int = 3
    max_len: int = 1000
    backlog: int = 256
    task_tokens: int = 20
    decode_ms_per_token: float = 20.0
    long_tasks: int = 2
    poison: int = 3
    timeout_s: float = 900.0
    seed: int = 0

    @property
    def long_tokens(self) -> int:
        """A long task runs 2.5 idle timeouts."""
        return int(2.5 * self.idle_timeout_s * 1000 / self.decode_ms_per_token)

    @property
    def task_timeout_s(self) -> float:
        return 1.6 * self.long_tokens * self.decode_ms_per_token / 1000

    @property
    def poison_tokens(self) -> int:
        """A retryable poison task would run 3 task timeouts (so it always times out)."""
        return int(3 * self.task_timeout_s * 1000 / self.decode_ms_per_token)


@dataclass(slots=True)
class ChaosLog:
    """What the run saw; filled in while it runs."""

    normal: list[str] = field(default_factory=list)
    long: list[str] = field(default_factory=list)
    retry_poison: list[str] = field(default_factory=list)
    fatal_poison: list[str] = field(default_factory=list)
    orphan_kill_ms: dict[str, float] = field(default_factory=dict)  # task id -> kill time
    kills: int = 0
    stream_len_max: int = 0
    missing_pending: int = 0
    elapsed_s: float = 0.0


def _body(tokens: int, model: str = "sim") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "q"}],
            "max_tokens": tokens}  # fmt: skip


class Chaos:
    def __init__(self, plan: ChaosPlan, redis_url: str, engine: str, logs: Path) -> None:
        self.plan, self.redis_url, self.engine, self.logs = plan, redis_url, engine, logs
        self.keys = QueueKeys()
        self.rng = random.Random(plan.seed)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log = ChaosLog()
        self.spawned = 0

    def spawn(self) -> None:
        p, name = self.plan, f"w{self.spawned}"
        self.spawned += 1
        args = ["--redis", self.redis_url, "--engine", self.engine, "--name", name, "--audit",
                "--concurrency", str(p.concurrency), "--idle-timeout-s", str(p.idle_timeout_s),
                "--claim-every-s", str(p.claim_every_s), "--max-len", str(p.max_len),
                "--max-deliveries", str(p.max_deliveries),
                "--task-timeout-s", str(p.task_timeout_s)]  # fmt: skip
        with open(self.logs / f"{name}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "kvtier.cli", "queue-worker", *args],
                stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def run(self) -> ChaosLog:
        client = aioredis.Redis.from_url(self.redis_url)
        queue = TaskQueue(self.redis_url)
        try:
            for _ in range(self.plan.workers):
                self.spawn()
            await self._seed_specials(queue)
            await self._loop(client, queue)
        finally:
            await queue.close()
            await client.aclose()
        return self.log

    async def _seed_specials(self, queue: TaskQueue) -> None:
        p, log = self.plan, self.log
        log.long = [await queue.submit(TENANT, _body(p.long_tokens)) for _ in range(p.long_tasks)]
        log.retry_poison = [
            await queue.submit(TENANT, _body(p.poison_tokens)) for _ in range(p.poison)
        ]
        log.fatal_poison = [
            await queue.submit(TENANT, _body(4, "no-such-model")) for _ in range(p.poison)
        ]

    def _special(self) -> int:
        return len(self.log.long) + len(self.log.retry_poison) + len(self.log.fatal_poison)

    async def _loop(self, client: aioredis.Redis, queue: TaskQueue) -> None:
        p, log = self.plan, self.log
        total = p.tasks + self._special()
        start = next_report = time.monotonic()
        while True:
            ended = await self._ended(client)
            if ended >= total:
                break
            if time.monotonic() - start > p.timeout_s:
                raise RuntimeError(f"timed out with {ended} of {total} tasks ended")
            outstanding = len(log.normal) + self._special() - ended
            batch = min(p.tasks - len(log.normal), p.backlog - outstanding)
            if batch > 0:
                ids = await asyncio.gather(*(queue.submit(TENANT, _body(p.task_tokens))
                                             for _ in range(batch)))  # fmt: skip
                log.normal.extend(ids)
            if log.kills < p.kills and ended >= (log.kills + 1) * total / (p.kills + 1):
                await self._kill_one(client)
            await self._sample(client)
            if time.monotonic() >= next_report:
                next_report += REPORT_EVERY_S
                print(f"bench queue: {ended}/{total} ended, {log.kills} kills, stream "
                      f"{log.stream_len_max} max", file=sys.stderr, flush=True)  # fmt: skip
            await asyncio.sleep(TICK_S)
        log.elapsed_s = time.monotonic() - start

    async def _ended(self, client: aioredis.Redis) -> int:
        """Tasks ended: entries delivered and acknowledged (only a terminal write, or a
        delivery of an ended task, acks). Not the audit counters: a worker killed between
        its terminal write and its audit increment leaves a done task uncounted there."""
        groups: Any = await client.xinfo_groups(self.keys.stream)
        group = next(g for g in groups if g["name"].decode() == self.keys.group)
        return int(group["entries-read"] or 0) - int(group["pending"])

    async def _kill_one(self, client: aioredis.Redis) -> None:
        """SIGKILL a worker that holds tasks but no long task; replace it under a new name."""
        pending: Any = await client.xpending_range(
            self.keys.stream, self.keys.group, "-", "+", 10_000
        )
        holders = {e["consumer"].decode() for e in pending}
        for task_id in self.log.long:
            raw: Any = await client.hmget(
                self.keys.status(tenant_digest(TENANT), task_id), "state", "worker"
            )
            if raw[0] == b"running" and raw[1] is not None:
                holders.discard(raw[1].decode())
        alive = sorted(n for n in holders if n in self.procs and self.procs[n].poll() is None)
        if not alive:
            return
        victim = self.rng.choice(alive)
        self.procs[victim].kill()
        self.procs[victim].wait()
        kill_ms = time.time() * 1000
        self.log.kills += 1
        self.spawn()
        held: Any = await client.xpending_range(self.keys.stream, self.keys.group, "-", "+",
                                                10_000, consumername=victim)  # fmt: skip
        for e in held:
            entry: Any = await client.xrange(self.keys.stream, e["message_id"], e["message_id"])
            if entry:
                self.log.orphan_kill_ms[entry[0][1][b"task"].decode()] = kill_ms

    async def _sample(self, client: aioredis.Redis) -> None:
        """The stream's length, and pending entries the stream no longer holds (atomic)."""
        log = self.log
        log.stream_len_max = max(log.stream_len_max, await client.xlen(self.keys.stream))
        missing: Any = await client.eval(MISSING, 1, self.keys.stream, self.keys.group)
        log.missing_pending += int(missing)


def sim(plan: ChaosPlan) -> Process:
    """The engine: one fast worker-sim (decode time per token sets a task's length)."""
    args = ["worker-sim", "--port", "0", "--decode-ms-per-token", str(plan.decode_ms_per_token),
            "--prefill-ms-per-token", "0.01"]  # fmt: skip
    return Process(args, SIM_BANNER, 1)
