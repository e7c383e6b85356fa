"""The replay loop: requests in arrival order through FIFO engine nodes, with optional
scheduler-aware prefetch, and the configurations compared in one run.

Queue model: each node serves one request at a time, first come first served. A request
starts at max(arrival, node free); TTFT = queueing + waiting for its own prefetch (if one is
still running) + load + prefill; decode is assumed batched alongside and is not on this path.

Scheduler-aware prefetch (after CachedAttention): before a request runs, the next K requests
that have already arrived (the look-ahead window) get `cache.prefetch` (their stored prefix
is promoted from SSD/remote to DRAM in the background; modelled to take bytes / SSD
bandwidth on one SSD channel per node) and `store.touch` of their keys, which makes them the
most recently used so eviction takes other chunks first. This is protection by LRU order,
not a pin: the store has no pin API, so a burst larger than DRAM can still evict them.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from tqdm import tqdm

from kvtier.bench.engines import Engine, store_config
from kvtier.bench.workloads import Request
from kvtier.config import StoreConfig
from kvtier.store import Store

CONFIGS = ("none", "gpu-lru", "tiered", "tiered+prefetch", "shared")
DISK_CONFIGS = ("tiered", "tiered+prefetch", "shared")  # those with an SSD tier
SHARED_NODES = 2


class RequestResult(NamedTuple):
    arrival_s: float
    start_s: float
    ttft_s: float
    turn: int
    node: int
    prompt_tokens: int
    hits: Mapping[str, int]
    load_s: float
    compute_s: float  # prefill actually computed
    baseline_s: float  # prefill of the whole prompt without a cache

    @property
    def service_s(self) -> float:
        """Load + prefill, without queueing or prefetch waits."""
        return self.load_s + self.compute_s


class EngineFactory(Protocol):
    """Makes one engine node over a store (None: no cache)."""

    chunk_bytes: int

    def __call__(
        self, store: Store | None, tier_names: Mapping[str, str], gpu: Store | None = None
    ) -> Engine: ...


@dataclass(frozen=True, slots=True)
class Capacities:
    """Cache sizes in tokens (converted to bytes per engine)."""

    chunk_tokens: int
    gpu_tokens: int
    dram_tokens: int
    disk_tokens: int


class DiskWrites(NamedTuple):
    """What a configuration's kvtier stores wrote to their SSD tiers (scaled payloads)."""

    written_bytes: int
    admission_rejected: int


@dataclass(slots=True)
class Setup:
    nodes: list[Engine]
    lookahead: int
    closers: list[Callable[[], None]] = field(default_factory=list)
    stores: list[Store] = field(default_factory=list)  # kvtier's (not the GPU caches)

    def disk_writes(self) -> DiskWrites:
        """Bytes every store wrote to its disk tier, once their pending writes landed."""
        stats = []
        for store in self.stores:
            store.flush()
            stats.append(store.stats())
        written = sum(s.disk_written_bytes for s in stats)
        return DiskWrites(written, sum(s.admission_rejected for s in stats))

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for close in self.closers:
            close()


def shared_available() -> bool:
    """`shared` needs the kvtier:// remote tier and the cache server."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("kvtier.tiers.remote", "kvtier.server.server")
    )


def build(
    config: str,
    make: EngineFactory,
    caps: Capacities,
    work_dir: Path,
    lookahead: int,
    admit: int = 1,
) -> Setup:
    """The engine nodes of one configuration, with fresh stores under `work_dir/config`;
    `admit`: the `disk_admit_after` of every store with an SSD tier."""
    c, cb = caps.chunk_tokens, make.chunk_bytes
    root = work_dir / config.replace("+", "-")  # a fresh directory per configuration
    if config == "none":
        return Setup([make(None, {})], 0)
    if config == "gpu-lru":
        store = Store(store_config(c, cb, caps.gpu_tokens, 0, None))
        return Setup([make(store, {"dram": "gpu"})], 0)
    if config in ("tiered", "tiered+prefetch"):
        shutil.rmtree(root, ignore_errors=True)
        disk = root / "node0"
        store = Store(store_config(c, cb, caps.dram_tokens, caps.disk_tokens, disk, None, admit))
        node = make(store, {}, gpu=_gpu_store(caps, cb))
        return Setup([node], lookahead if config == "tiered+prefetch" else 0, stores=[store])
    if config == "shared":
        return _build_shared(make, caps, root, admit)
    raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")


def _gpu_store(caps: Capacities, chunk_bytes: int) -> Store | None:
    """The engine's own VRAM prefix cache, in front of kvtier's tiers (None if it has none)."""
    if caps.gpu_tokens < caps.chunk_tokens:
        return None
    return Store(store_config(caps.chunk_tokens, chunk_bytes, caps.gpu_tokens, 0, None))


def _build_shared(make: EngineFactory, caps: Capacities, root: Path, admit: int) -> Setup:
    """A cache server (DRAM + SSD of the same sizes as one node) and SHARED_NODES nodes."""
    from kvtier.server.server import ServerThread

    c, cb = caps.chunk_tokens, make.chunk_bytes

    def config(name: str, remote: str | None = None) -> StoreConfig:
        disk = root / name
        return store_config(c, cb, caps.dram_tokens, caps.disk_tokens, disk, remote, admit)

    shutil.rmtree(root, ignore_errors=True)
    server_store = Store(config("server"))
    server = ServerThread(server_store)
    stores = [Store(config(f"node{k}", server.url)) for k in range(SHARED_NODES)]
    nodes = [make(store, {}, gpu=_gpu_store(caps, cb)) for store in stores]

    def stop() -> None:
        server.stop()
        server_store.close()

    return Setup(nodes, 0, [stop], [server_store, *stores])


def replay(
    requests: Iterable[Request],
    setup: Setup,
    total: int | None = None,
    desc: str = "replay",
) -> list[RequestResult]:
    """Serve every request in arrival order; request i goes to node i mod len(nodes)."""
    nodes = setup.nodes
    free_at = [0.0] * len(nodes)
    ssd_free = [0.0] * len(nodes)
    ready: dict[int, float] = {}
    results: list[RequestResult] = []
    window: deque[tuple[int, Request]] = deque()
    source = enumerate(requests)
    bar = tqdm(total=total, desc=desc, unit="req", leave=False, mininterval=0.5)
    with bar:
        for i, req in _windowed(source, window, setup.lookahead):
            k = i % len(nodes)
            start = max(req.arrival_s, free_at[k])
            if setup.lookahead:
                _hint(window, nodes, start, ready, ssd_free)
            out = nodes[k].run(req)
            wait = max(0.0, ready.pop(i, start) - start)
            service = out.load_s + out.compute_s
            free_at[k] = start + wait + service
            ttft = free_at[k] - req.arrival_s
            results.append(
                RequestResult(
                    req.arrival_s, start, ttft, req.turn, k, out.prompt_tokens, out.hits,
                    out.load_s, out.compute_s, out.baseline_s,
                )
            )  # fmt: skip
            bar.update()
    return results


def _windowed(
    source: Iterator[tuple[int, Request]], window: deque[tuple[int, Request]], lookahead: int
) -> Iterator[tuple[int, Request]]:
    """Yield requests in order while `window` holds up to `lookahead` of the next ones."""
    for item in source:
        window.append(item)
        if len(window) > lookahead:
            yield window.popleft()
    while window:
        yield window.popleft()


def _hint(
    window: deque[tuple[int, Request]],
    nodes: Sequence[Engine],
    now: float,
    ready: dict[int, float],
    ssd_free: list[float],
) -> None:
    """Prefetch (once) and protect the queued requests of the look-ahead window, nearest
    last so it ends up the most recently used."""
    queued = [(j, r) for j, r in window if r.arrival_s <= now]
    for j, req in reversed(queued):
        k = j % len(nodes)
        if j not in ready:
            seconds = nodes[k].prefetch(req)
            begin = max(now, ssd_free[k])
            ready[j] = begin + seconds
            if seconds:
                ssd_free[k] = ready[j]
        nodes[k].protect(req)
