"""`kvtier bench queue`: the durable queue under `kill -9` of random consumers (Q1).

N tasks through M `kvtier queue-worker` processes on a fast `kvtier worker-sim`, K of the
workers killed mid-task (each replaced under a new name), plus a few long tasks (2.5 idle
timeouts; their holders are never the victims) and poison tasks: ones that always time out
(retryable) and ones for an unknown model (a 404: permanent). Then it counts:
- lost: normal tasks not `done`; completed twice: tasks whose effect counter (incremented by
  the worker outside the once-only guard, each time its terminal write took effect) is > 1;
- redelivery delay: a killed worker's task's next start minus the kill, against idle
  timeout + claim period; long tasks stolen (more than one delivery);
- dead letters: retryable poison after exactly max-deliveries deliveries, permanent after 1;
- the stream's length (sampled) and pending entries ever missing from it (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

from kvtier.bench.queue_chaos import TENANT, Chaos, ChaosLog, ChaosPlan, sim
from kvtier.bench.remote_io import RedisProcess
from kvtier.gateway.taskqueue import QueueKeys, tenant_digest

SLACK_S = 0.5  # scheduling slack on 2 shared cores, reported apart from the bound


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="500 tasks, 10 kills")
    add("--tasks", type=int, default=10_000)
    add("--workers", type=int, default=4)
    add("--kills", type=int, default=100)
    add("--concurrency", type=int, default=8, help="tasks per worker at once")
    add("--idle-timeout-s", type=float, default=2.0)
    add("--claim-every-s", type=float, default=0.5)
    add("--max-deliveries", type=int, default=3)
    add("--max-len", type=int, default=1000)
    add("--seed", type=int, default=0)
    add("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    plan = ChaosPlan(
        tasks=500 if args.quick else args.tasks, workers=args.workers,
        kills=10 if args.quick else args.kills, concurrency=args.concurrency,
        idle_timeout_s=args.idle_timeout_s, claim_every_s=args.claim_every_s,
        max_deliveries=args.max_deliveries, max_len=args.max_len, seed=args.seed,
    )  # fmt: skip
    try:
        result = bench(plan)
    except (RuntimeError, OSError) as exc:
        print(f"kvtier bench queue: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else table(result))
    return 0 if result["ok"] else 1


def bench(plan: ChaosPlan) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="kvtier-bench-queue-") as tmp,
        RedisProcess(Path(tmp) / "redis") as server,
        sim(plan) as engine,
    ):
        chaos = Chaos(plan, server.url, engine.matches[0].group(1), Path(tmp))
        try:
            log = asyncio.run(chaos.run())
        finally:
            chaos.stop_all()
        client = redis.Redis.from_url(server.url)
        try:
            return analyse(plan, log, client)
        finally:
            client.close()


def _records(client: redis.Redis, ids: list[str]) -> list[dict[bytes, bytes]]:
    keys, digest = QueueKeys(), tenant_digest(TENANT)
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hgetall(keys.status(digest, task_id))
    return list(pipe.execute())


def _counts(client: redis.Redis, what: str) -> dict[str, int]:
    raw: Any = client.hgetall(QueueKeys().audit(what))
    return {k.decode(): int(v) for k, v in raw.items()}


def analyse(plan: ChaosPlan, log: ChaosLog, client: redis.Redis) -> dict[str, Any]:
    keys = QueueKeys()
    normal = dict(zip(log.normal, _records(client, log.normal), strict=True))
    applied, executed = _counts(client, "applied"), _counts(client, "executed")
    delays = []
    for task_id, kill_ms in log.orphan_kill_ms.items():
        rec = normal.get(task_id)  # poison tasks' later starts follow their own timeouts
        if rec is not None:
            delays.append((int(rec[b"started_at_ms"]) - kill_ms) / 1000)
    groups = (("long", log.long), ("retry", log.retry_poison), ("fatal", log.fatal_poison))
    special = {name: _records(client, ids) for name, ids in groups}
    dlq: Any = client.xrange(keys.dlq)
    dead = [f[b"task"].decode() for _, f in dlq]
    bound_s = plan.idle_timeout_s + plan.claim_every_s
    done_ids = [t for t, rec in normal.items() if rec.get(b"state") == b"done"]
    unaudited = sum(1 for t in done_ids if t not in applied)
    result: dict[str, Any] = {
        "tasks": plan.tasks, "workers": plan.workers, "concurrency": plan.concurrency,
        "kills": log.kills, "idle_timeout_s": plan.idle_timeout_s,
        "claim_every_s": plan.claim_every_s, "max_deliveries": plan.max_deliveries,
        "elapsed_s": round(log.elapsed_s, 1),
        "tasks_per_s": round(len(log.normal) / max(log.elapsed_s, 1e-9), 1),
        "lost": sum(1 for r in normal.values() if r.get(b"state") != b"done"),
        "completed_twice": sum(1 for n in applied.values() if n > 1),
        "executed_twice": sum(1 for n in executed.values() if n > 1),
        "done_without_audit": unaudited,
        "deliveries": sum(int(r.get(b"attempts", 0)) for r in normal.values()),
        "orphaned_by_kills": len(delays),
        "redelivery_max_s": round(max(delays, default=0.0), 3),
        "redelivery_p50_s": round(statistics.median(delays), 3) if delays else 0.0,
        "redelivery_bound_s": bound_s,
        "long_tasks": len(log.long),
        "long_tasks_stolen": sum(1 for r in special["long"] if int(r[b"attempts"]) != 1),
        "retry_poison_deliveries": [int(r[b"attempts"]) for r in special["retry"]],
        "fatal_poison_deliveries": [int(r[b"attempts"]) for r in special["fatal"]],
        "dead_letters": len(dead),
        "dead_letters_expected": sorted(dead) == sorted(log.retry_poison + log.fatal_poison),
        "stream_len_max": log.stream_len_max, "max_len": plan.max_len,
        "backlog": plan.backlog, "pending_missing_from_stream": log.missing_pending,
        "final_stream_len": client.xlen(keys.stream),
        "final_pending": client.xpending(keys.stream, keys.group)["pending"],
    }  # fmt: skip
    result["ok"] = _ok(result, plan, bound_s)
    return result


def _ok(r: dict[str, Any], plan: ChaosPlan, bound_s: float) -> bool:
    n = plan.max_deliveries
    return bool(
        r["lost"] == 0 and r["completed_twice"] == 0 and r["final_pending"] == 0
        and r["redelivery_max_s"] <= bound_s + SLACK_S and r["long_tasks_stolen"] == 0
        and all(d == n for d in r["retry_poison_deliveries"])
        and all(d == 1 for d in r["fatal_poison_deliveries"])
        and r["dead_letters_expected"] and r["pending_missing_from_stream"] == 0
    )  # fmt: skip


def table(r: dict[str, Any]) -> str:
    rows = [
        ("tasks / workers x concurrency", f"{r['tasks']} / {r['workers']} x {r['concurrency']}"),
        ("kill -9 (each replaced)", r["kills"]),
        ("elapsed, throughput", f"{r['elapsed_s']} s, {r['tasks_per_s']} tasks/s"),
        ("lost", r["lost"]),
        ("completed twice (effects)", r["completed_twice"]),
        ("executed twice (absorbed by the guard)", r["executed_twice"]),
        ("done, audit increment lost to a kill", r["done_without_audit"]),
        ("deliveries of normal tasks", r["deliveries"]),
        ("tasks orphaned by kills", r["orphaned_by_kills"]),
        ("redelivery after a kill p50 / max",
         f"{r['redelivery_p50_s']} / {r['redelivery_max_s']} s "
         f"(bound idle + claim = {r['redelivery_bound_s']} s)"),
        ("long tasks stolen", f"{r['long_tasks_stolen']} of {r['long_tasks']}"),
        ("retryable poison: deliveries", r["retry_poison_deliveries"]),
        ("permanent poison (404): deliveries", r["fatal_poison_deliveries"]),
        ("dead letters (exactly the poison?)",
         f"{r['dead_letters']} ({r['dead_letters_expected']})"),
        ("stream length max / final", f"{r['stream_len_max']} / {r['final_stream_len']} "
         f"(max-len {r['max_len']}, backlog {r['backlog']})"),
        ("pending entries missing from the stream", r["pending_missing_from_stream"]),
        ("targets met", r["ok"]),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
