"""`kvtier bench load`: many concurrent clients doing mixed lookups, saves and loads against a
cache server for a bounded time; throughput, p50/p99 latency per op and the error count."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kvtier.config import env_default, parse_remote, parse_size
from kvtier.tiers.remote import RemoteTier

OPS = ("lookup", "save", "load")
WEIGHTS = (0.4, 0.3, 0.3)
LOOKUP_KEYS = 8
PAYLOADS = 16


@dataclass(frozen=True, slots=True)
class OpResult:
    count: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class LoadResult:
    url: str
    clients: int
    duration_s: float
    chunk_bytes: int
    ops_per_s: float
    gbps: float
    errors: int
    hits: int
    misses: int
    ops: dict[str, OpResult] = field(default_factory=dict)
    first_error: str = ""


@dataclass(slots=True)
class _Client:
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    bytes_moved: int = 0
    errors: int = 0
    hits: int = 0
    misses: int = 0
    first_error: str = ""


def _key(i: int) -> bytes:
    return hashlib.blake2b(b"bench-load:%d" % i, digest_size=16).digest()


def _client_loop(
    tier: RemoteTier, seed: int, payloads: np.ndarray, keys: int, stop: threading.Event
) -> _Client:
    out = _Client()
    rng = np.random.default_rng(seed)
    buf = np.empty_like(payloads[0])
    while not stop.is_set():
        op = OPS[int(rng.choice(3, p=WEIGHTS))]
        i = int(rng.integers(keys))
        start = time.perf_counter()
        try:
            if op == "lookup":
                tier.contains_prefix([_key((i + j) % keys) for j in range(LOOKUP_KEYS)])
            elif op == "save":
                tier.put(_key(i), [memoryview(payloads[i % PAYLOADS])])
                out.bytes_moved += buf.nbytes
            elif tier.get_into(_key(i), [memoryview(buf)]):
                out.hits += 1
                out.bytes_moved += buf.nbytes
                if not np.array_equal(buf, payloads[i % PAYLOADS]):
                    out.errors += 1
                    out.first_error = out.first_error or f"wrong bytes for key {i}"
            else:
                out.misses += 1
        except Exception as exc:  # counted: the benchmark reports errors, it does not stop
            out.errors += 1
            out.first_error = out.first_error or repr(exc)
        out.latencies_s[op].append(time.perf_counter() - start)
    return out


def run_load(
    url: str, token: str | None, clients: int, duration_s: float, chunk_bytes: int, keys: int
) -> LoadResult:
    """Run `clients` threads (one RemoteTier each) against `url` for `duration_s`."""
    payloads = np.random.default_rng(0).integers(0, 256, (PAYLOADS, chunk_bytes), dtype=np.uint8)
    tiers = [RemoteTier(parse_remote(url), token) for _ in range(clients)]
    stop = threading.Event()
    results: list[_Client] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        result = _client_loop(tiers[n], n, payloads, keys, stop)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(duration_s)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    tier_errors = sum(t.stats().errors for t in tiers)
    for tier in tiers:
        tier.close()
    return _summarise(url, clients, elapsed, chunk_bytes, results, tier_errors)


def _summarise(
    url: str, clients: int, elapsed: float, chunk_bytes: int, results: list[_Client], extra: int
) -> LoadResult:
    ops = {}
    for op in OPS:
        lat = np.array([x for r in results for x in r.latencies_s[op]]) * 1e3
        p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (0.0, 0.0)
        ops[op] = OpResult(int(lat.size), lat.size / elapsed, float(p50), float(p99))
    return LoadResult(
        url=url,
        clients=clients,
        duration_s=elapsed,
        chunk_bytes=chunk_bytes,
        ops_per_s=sum(o.count for o in ops.values()) / elapsed,
        gbps=sum(r.bytes_moved for r in results) / elapsed / 1e9,
        errors=sum(r.errors for r in results) + extra,
        hits=sum(r.hits for r in results),
        misses=sum(r.misses for r in results),
        ops=ops,
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--remote", default=env_default("KVTIER_REMOTE"),
        help="kvtier://host:port[,...]; default: start a server on 127.0.0.1")  # fmt: skip
    arg("--clients", type=int, default=env_default("KVTIER_BENCH_CLIENTS", "32"))
    arg("--duration", type=float, default=env_default("KVTIER_BENCH_DURATION", "60"),
        help="seconds")  # fmt: skip
    arg("--chunk-bytes", default=env_default("KVTIER_BENCH_CHUNK_BYTES", "256KiB"))
    arg("--keys", type=int, default=env_default("KVTIER_BENCH_KEYS", "2048"), help="key space")
    arg("--dram", default=env_default("KVTIER_BENCH_SERVER_DRAM", "1GiB"),
        help="DRAM of the server started when --remote is not given")  # fmt: skip
    arg("--json", action="store_true", default=env_default("KVTIER_JSON", "") == "1")


def run(args: argparse.Namespace) -> int:
    from kvtier.bench.remote_io import ServeProcess

    chunk_bytes = parse_size(args.chunk_bytes, "--chunk-bytes")
    token = env_default("KVTIER_REMOTE_TOKEN")
    if args.clients < 1 or args.duration <= 0 or args.keys < LOOKUP_KEYS:
        print(
            "kvtier bench load: need --clients >= 1, --duration > 0, --keys >= 8", file=sys.stderr
        )
        return 2
    if args.remote is None:
        with ServeProcess("--dram", args.dram) as server:
            result = run_load(
                server.url, token, args.clients, args.duration, chunk_bytes, args.keys
            )
    else:
        result = run_load(args.remote, token, args.clients, args.duration, chunk_bytes, args.keys)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0 if result.errors == 0 else 1
    print(f"{result.clients} clients, {result.duration_s:.1f} s, {result.chunk_bytes} B chunks "
          f"against {result.url}")  # fmt: skip
    print(f"  {result.ops_per_s:,.0f} ops/s, {result.gbps:.2f} GB/s moved, {result.hits} load "
          f"hits, {result.misses} load misses, {result.errors} errors")  # fmt: skip
    for op, stats in result.ops.items():
        print(f"  {op:<7} {stats.ops_per_s:>9,.0f} ops/s   p50 {stats.p50_ms:7.2f} ms   "
              f"p99 {stats.p99_ms:7.2f} ms")  # fmt: skip
    if result.first_error:
        print(f"  first error: {result.first_error}")
    return 0 if result.errors == 0 else 1
