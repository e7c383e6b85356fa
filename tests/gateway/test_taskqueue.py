"""The durable queue with a real redis-server, real `kvtier queue-worker` processes and a
`kvtier worker-sim` engine (decode time per token sets how long a task runs)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from kvtier.bench.remote_io import RedisProcess
from kvtier.gateway.queue_scripts import Entry, QueueScripts
from kvtier.gateway.taskqueue import QueueKeys, TaskQueue, TaskState, TaskStatus, tenant_digest

from .procs import BannerProcess, SimProcess

IDLE_S, CLAIM_S = 2.0, 0.5
KEYS = QueueKeys()


class QueueWorkerProcess(BannerProcess):
    """`kvtier queue-worker` with short timeouts (idle 2 s, janitor every 0.5 s)."""

    banner = re.compile(r"^kvtier queue-worker (\S+)$")

    def __init__(self, redis_url: str, engine: str, name: str, *args: str) -> None:
        times = ["--idle-timeout-s", str(IDLE_S), "--claim-every-s", str(CLAIM_S)]
        command = ["queue-worker", "--redis", redis_url, "--engine", engine, "--name", name]
        super().__init__([*command, *times, "--audit", *args], 1)


def chat(max_tokens: int, model: str = "sim") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens}  # fmt: skip


def submit(url: str, body: dict[str, Any], tenant: str = "acme") -> str:
    async def go() -> str:
        queue = TaskQueue(url)
        try:
            return await queue.submit(tenant, body)
        finally:
            await queue.close()

    return asyncio.run(go())


def status(url: str, task_id: str, tenant: str = "acme") -> TaskStatus | None:
    async def go() -> TaskStatus | None:
        queue = TaskQueue(url)
        try:
            return await queue.status(tenant, task_id)
        finally:
            await queue.close()

    return asyncio.run(go())


def wait_for(
    url: str, task_id: str, ok: Callable[[TaskStatus], bool], timeout_s: float
) -> TaskStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        got = status(url, task_id)
        if got is not None and ok(got):
            return got
        assert time.monotonic() < deadline, f"task {task_id} stuck at {got}"
        time.sleep(0.05)


def record(r: redis.Redis, task_id: str, field: str) -> str:
    value = r.hget(KEYS.status(tenant_digest("acme"), task_id), field)
    return "" if value is None else value.decode()  # type: ignore[union-attr]


def is_(state: TaskState) -> Callable[[TaskStatus], bool]:
    return lambda s: s.state is state


@pytest.fixture
def r(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def audit(r: redis.Redis, what: str, task_id: str) -> int:
    return int(r.hget(KEYS.audit(what), task_id) or 0)  # type: ignore[arg-type]


def test_submit_runs_to_done_with_the_completion(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """A submitted task is answered once by the engine and its record carries the completion."""
    with SimProcess("--decode-ms-per-token", "1") as sim, \
            QueueWorkerProcess(redis_server.url, sim.url, "w1"):  # fmt: skip
        task_id = submit(redis_server.url, chat(8))
        assert re.fullmatch(r"task_[0-9a-f]{32}", task_id)
        done = wait_for(redis_server.url, task_id, is_(TaskState.DONE), 20)
    assert done.completion is not None and done.completion["usage"]["completion_tokens"] == 8
    assert done.attempts == 1 and done.error is None
    assert done.body()["object"] == "queue.task" and done.body()["status"] == "done"
    assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 0
    assert audit(r, "applied", task_id) == 1


def test_an_engine_with_an_api_key_is_called_with_it(redis_server: RedisProcess) -> None:
    """With --engine-api-key the worker's calls pass an engine run with --api-key; without
    it, the engine's 401 is a permanent failure, not a retry."""
    with SimProcess("--decode-ms-per-token", "1", "--api-key", "engine-key") as sim:
        with QueueWorkerProcess(redis_server.url, sim.url, "w1", "--engine-api-key", "engine-key"):
            task_id = submit(redis_server.url, chat(4))
            done = wait_for(redis_server.url, task_id, is_(TaskState.DONE), 20)
            assert done.completion is not None
        with QueueWorkerProcess(redis_server.url, sim.url, "w2"):
            task_id = submit(redis_server.url, chat(4))
            failed = wait_for(redis_server.url, task_id, is_(TaskState.FAILED), 20)
            assert failed.attempts == 1 and "401" in (failed.error or "")


def test_status_is_tenant_scoped(redis_server: RedisProcess) -> None:
    """Another tenant's id, or a malformed one, reads as None (a 404), never as the task."""
    task_id = submit(redis_server.url, chat(4), tenant="acme")
    mine = status(redis_server.url, task_id, tenant="acme")
    assert mine is not None and mine.state is TaskState.QUEUED and mine.attempts == 0
    assert status(redis_server.url, task_id, tenant="evil") is None
    assert status(redis_server.url, "task_../../x", tenant="acme") is None


def test_killed_worker_task_redelivered_and_done_once(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """kill -9 mid-task: another worker runs it within idle timeout + claim period, one effect."""
    with (
        SimProcess("--decode-ms-per-token", "10") as sim,
        QueueWorkerProcess(redis_server.url, sim.url, "a") as a,
    ):
        task_id = submit(redis_server.url, chat(300))  # ~3 s on the engine
        wait_for(redis_server.url, task_id, is_(TaskState.RUNNING), 20)
        with QueueWorkerProcess(redis_server.url, sim.url, "b"):
            a.kill()
            killed_ms = time.time() * 1000
            done = wait_for(redis_server.url, task_id, is_(TaskState.DONE), 20)
            restarted_ms = int(record(r, task_id, "started_at_ms"))
    assert restarted_ms - killed_ms <= (IDLE_S + CLAIM_S) * 1000 + 500
    assert done.attempts == 2 and record(r, task_id, "worker") == "b"
    assert audit(r, "applied", task_id) == 1
    assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 0


def test_live_long_task_is_never_stolen(redis_server: RedisProcess, r: redis.Redis) -> None:
    """A task running 2.5x the idle timeout, heartbeating, stays with its worker: one delivery."""
    with (
        SimProcess("--decode-ms-per-token", "10") as sim,
        QueueWorkerProcess(redis_server.url, sim.url, "a"),
    ):
        task_id = submit(redis_server.url, chat(500))  # ~5 s
        wait_for(redis_server.url, task_id, is_(TaskState.RUNNING), 20)
        with QueueWorkerProcess(redis_server.url, sim.url, "b"):
            owners = set()
            while (now := status(redis_server.url, task_id)) and now.state is TaskState.RUNNING:
                pel = r.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10)
                owners |= {(p["consumer"], p["times_delivered"]) for p in pel}
                time.sleep(0.1)
    assert owners == {(b"a", 1)}  # never claimed, not even back by its own janitor
    assert now is not None and now.state is TaskState.DONE and now.attempts == 1
    assert record(r, task_id, "worker") == "a" and audit(r, "executed", task_id) == 1


def test_permanent_failure_dead_lettered_after_one_delivery(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """An engine 4xx (unknown model: 404) is the request's own: failed and dead-lettered at once."""
    with SimProcess() as sim, QueueWorkerProcess(redis_server.url, sim.url, "a"):
        task_id = submit(redis_server.url, chat(4, model="nope"))
        failed = wait_for(redis_server.url, task_id, is_(TaskState.FAILED), 20)
    assert failed.attempts == 1 and failed.error is not None and "404" in failed.error
    dead = r.xrange(KEYS.dlq)
    assert [f[b"task"].decode() for _, f in dead] == [task_id]
    assert dead[0][1][b"attempts"] == b"1"
    assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 0


def test_poison_dead_lettered_after_exactly_n_deliveries(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """A task that always times out (retryable) is tried exactly 3 times, then dead-lettered."""
    args = ("--task-timeout-s", "0.5", "--max-deliveries", "3")
    with SimProcess() as sim, QueueWorkerProcess(redis_server.url, sim.url, "a", *args), \
            QueueWorkerProcess(redis_server.url, sim.url, "b", *args):  # fmt: skip
        task_id = submit(redis_server.url, chat(2_000))  # 10 s: always times out
        failed = wait_for(redis_server.url, task_id, is_(TaskState.FAILED), 30)
        time.sleep(2 * CLAIM_S)  # no fourth delivery follows
        assert status(redis_server.url, task_id) == failed
    assert failed.attempts == 3 and failed.error is not None and "timed out" in failed.error
    dead = r.xrange(KEYS.dlq)
    assert len(dead) == 1 and dead[0][1][b"attempts"] == b"3"
    assert audit(r, "executed", task_id) == 0


def test_stalled_worker_finishing_late_has_no_second_effect(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """A worker stalled (SIGSTOP) past the idle timeout loses its task; when it resumes, the
    task's record keeps the one completion written by the worker that took over."""
    with (
        SimProcess("--decode-ms-per-token", "10") as sim,
        QueueWorkerProcess(redis_server.url, sim.url, "a") as a,
    ):
        task_id = submit(redis_server.url, chat(200))  # ~2 s
        wait_for(redis_server.url, task_id, is_(TaskState.RUNNING), 20)
        with QueueWorkerProcess(redis_server.url, sim.url, "b"):
            a.proc.send_signal(signal.SIGSTOP)
            done = wait_for(redis_server.url, task_id, is_(TaskState.DONE), 20)
            a.proc.send_signal(signal.SIGCONT)
            time.sleep(1.0)  # a wakes up, its engine answer arrives or is cancelled
    assert status(redis_server.url, task_id) == done and done.attempts == 2
    assert record(r, task_id, "worker") == "b" and audit(r, "applied", task_id) == 1


def test_finish_is_once_only(redis_server: RedisProcess, r: redis.Redis) -> None:
    """The terminal write takes effect once: a second finish, a late failure or a new delivery
    of an ended task only acks."""

    async def go() -> tuple[bool, bool, bool, bool]:
        client = aioredis.Redis.from_url(redis_server.url)
        scripts = QueueScripts(client, KEYS, "w", 60)
        queue = TaskQueue(redis_server.url)
        try:
            task_id = await queue.submit("acme", chat(1))
            [[_, [(entry_id, _)]]] = await client.xreadgroup(KEYS.group, "w", {KEYS.stream: ">"}, 1)
            entry = Entry(entry_id.decode(), task_id, tenant_digest("acme"), "{}")
            began = await scripts.begin(entry, 3)
            first = await scripts.done(entry, {"n": 1})
            second = await scripts.done(entry, {"n": 2})
            late = await scripts.failed(entry, "late")
            again = await scripts.begin(entry, 3)
            return began.run and first, second, late, again.run
        finally:
            await queue.close()
            await client.aclose()

    assert asyncio.run(go()) == (True, False, False, False)
    [key] = r.keys(f"{KEYS.stream}:task:*")
    assert r.hget(key, "completion") == b'{"n": 1}' and r.hget(key, "state") == b"done"
    assert r.xlen(KEYS.dlq) == 0 and r.xpending(KEYS.stream, KEYS.group)["pending"] == 0


def assert_trim_kept_pending(r: redis.Redis) -> None:
    pending = r.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10_000)
    present = {entry_id for entry_id, _ in r.xrange(KEYS.stream)}
    assert {p["message_id"] for p in pending} <= present


def test_trim_bounds_the_stream_and_never_drops_unacked(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """The stream is trimmed past --max-len, yet every pending entry stays readable."""
    with SimProcess("--decode-ms-per-token", "10") as sim, \
            QueueWorkerProcess(redis_server.url, sim.url, "a", "--max-len", "5"):  # fmt: skip
        long_id = submit(redis_server.url, chat(300))  # ~3 s, pins the stream's head
        fast = [submit(redis_server.url, chat(1)) for _ in range(40)]
        for task_id in fast:
            wait_for(redis_server.url, task_id, is_(TaskState.DONE), 20)
            assert_trim_kept_pending(r)
        still = status(redis_server.url, long_id)
        assert still is not None and still.state is TaskState.RUNNING
        assert r.xlen(KEYS.stream) == 41  # nothing at or after the running task's entry went
        wait_for(redis_server.url, long_id, is_(TaskState.DONE), 20)
        time.sleep(3 * CLAIM_S)
        assert r.xlen(KEYS.stream) <= 5
    assert r.xpending(KEYS.stream, KEYS.group)["pending"] == 0


def test_restart_under_the_same_name_resumes_its_pending_task(
    redis_server: RedisProcess, r: redis.Redis
) -> None:
    """A worker restarted with its name runs its own pending task at once, not after idle."""
    args = ("--idle-timeout-s", "30")
    with SimProcess("--decode-ms-per-token", "10") as sim:
        with QueueWorkerProcess(redis_server.url, sim.url, "a", *args) as a:
            task_id = submit(redis_server.url, chat(200))
            wait_for(redis_server.url, task_id, is_(TaskState.RUNNING), 20)
            a.kill()
        started = time.monotonic()
        with QueueWorkerProcess(redis_server.url, sim.url, "a", *args):
            done = wait_for(redis_server.url, task_id, is_(TaskState.DONE), 20)
    assert time.monotonic() - started < 15 and done.attempts == 2
    assert audit(r, "applied", task_id) == 1


def test_sigterm_hands_back_running_tasks(redis_server: RedisProcess, r: redis.Redis) -> None:
    """SIGTERM: exit 0 and hand the running task back (attempt refunded); another runs it."""
    with SimProcess("--decode-ms-per-token", "10") as sim:
        with QueueWorkerProcess(redis_server.url, sim.url, "a", "--drain-s", "0") as a:
            task_id = submit(redis_server.url, chat(300))
            wait_for(redis_server.url, task_id, is_(TaskState.RUNNING), 20)
            a.proc.send_signal(signal.SIGTERM)
            assert a.proc.wait(10) == 0
        queued = status(redis_server.url, task_id)
        assert queued is not None and queued.state is TaskState.QUEUED and queued.attempts == 0
        with QueueWorkerProcess(redis_server.url, sim.url, "b"):
            done = wait_for(redis_server.url, task_id, is_(TaskState.DONE), 5 + CLAIM_S + 3)
    assert done.attempts == 1 and audit(r, "applied", task_id) == 1
