"""The routing decision alone, in process: a `Pool` of 8 workers whose `PrefixIndex` holds
1M blocks, timing `block_keys` over a prompt plus `pool.route(...)` (then unbooking it; the
route's own index insert stays, each holder's LRU bound keeps the index at its size).

The index is filled with the key chains of long random documents, each on one worker; a
query is a prefix of a document (2k-32k tokens, uniform) with a fresh tail of up to 512
tokens, so `match` walks a long run of hits and then stops, as a real prompt does.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from kvtier.gateway.index import GPU
from kvtier.gateway.pool import Pool
from kvtier.gateway.routing import make_policy
from kvtier.gateway.tokens import block_keys

DOC_TOKENS = 32 * 1024
BLOCK = 16


class RouteTiming(NamedTuple):
    workers: int
    indexed_blocks: int
    decisions: int
    p50_ms: float  # block_keys + route
    p99_ms: float
    hash_p99_ms: float  # block_keys alone
    route_p99_ms: float  # route alone
    prompt_tokens: tuple[int, int]


def _doc(seed: int, number: int) -> np.ndarray:
    return np.random.default_rng([seed, number]).integers(0, 1 << 31, DOC_TOKENS, np.int64)


def time_routing(
    workers: int = 8, blocks: int = 1 << 20, decisions: int = 500, seed: int = 0
) -> RouteTiming:
    pool = Pool([f"http://w{i}" for i in range(workers)], make_policy("kvtier"), BLOCK,
                blocks // workers + 1)  # fmt: skip
    docs = -(-blocks // (DOC_TOKENS // BLOCK))
    for d in range(docs):
        keys = block_keys(_doc(seed, d), BLOCK)
        pool.index.add(d % workers, GPU, keys[: blocks - d * len(keys)])
    indexed = len(pool.index)
    rng = np.random.default_rng([seed, 99])
    times, hashing = [], []
    for _ in range(decisions):
        length = int(rng.integers(2048, DOC_TOKENS + 1))
        tail = int(rng.integers(0, 513))
        prompt = np.concatenate(
            [_doc(seed, int(rng.integers(docs)))[: length - tail],
             rng.integers(0, 1 << 31, tail, np.int64)]
        )  # fmt: skip
        start = time.perf_counter()
        keys = block_keys(prompt, BLOCK)
        hashing.append(time.perf_counter() - start)
        booking = pool.route(keys, len(prompt), 16, None)
        times.append(time.perf_counter() - start)
        pool.finished(booking)
    total, hashed = np.asarray(times) * 1e3, np.asarray(hashing) * 1e3
    p50, p99 = np.percentile(total, [50, 99])
    return RouteTiming(
        workers, indexed, decisions, float(p50), float(p99),
        float(np.percentile(hashed, 99)), float(np.percentile(total - hashed, 99)),
        (2048, DOC_TOKENS),
    )  # fmt: skip
