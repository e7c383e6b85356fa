"""The sim replay's hit rates agree with an independent pure-Python LRU over chunk chains."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import pytest

from kvtier.bench.costmodel import parse_sim
from kvtier.bench.engines import SimFactory, store_config
from kvtier.bench.replay import Setup, replay
from kvtier.bench.trace import SAMPLE, read_trace, trace_requests
from kvtier.bench.workloads import Request
from kvtier.store import Store

CHUNK = 512


def independent_lru(requests: Sequence[Request], capacity_chunks: int) -> list[int]:
    """Hit tokens per request: a chunk hits only if it and every earlier chunk are cached
    (and at least the last prompt token is computed); then every full chunk is inserted,
    evicting the least recently used; the request's chunks end up head-most-recent."""
    ids: dict[tuple[int, bytes], int] = {}
    lru: OrderedDict[int, None] = OrderedDict()
    hits = []
    for req in requests:
        chain, prev = [], 0
        data = req.tokens.tobytes()
        for start in range(0, len(req.tokens) // CHUNK * CHUNK, CHUNK):
            prev = ids.setdefault((prev, data[4 * start : 4 * (start + CHUNK)]), len(ids) + 1)
            chain.append(prev)
        usable = (len(req.tokens) - 1) // CHUNK
        hit = 0
        while hit < usable and chain[hit] in lru:
            hit += 1
        for key in reversed(chain[:hit]):
            lru.move_to_end(key)
        for key in chain:
            if key not in lru:
                if len(lru) >= capacity_chunks:
                    lru.popitem(last=False)
                lru[key] = None
        for key in reversed(chain):
            lru.move_to_end(key)
        hits.append(hit * CHUNK)
    return hits


@pytest.mark.parametrize("capacity_chunks", [60, 400])
def test_sim_replay_hits_match_independent_lru(capacity_chunks: int) -> None:
    """Per request, the DRAM-only sim replay hits exactly the tokens the independent LRU
    computes for the same capacity in chunks on the sample trace."""
    requests = list(trace_requests(read_trace(SAMPLE)))
    make = SimFactory(parse_sim("h100:llama-3-8b"), CHUNK)
    store = Store(store_config(CHUNK, make.chunk_bytes, capacity_chunks * CHUNK, 0, None))
    setup = Setup([make(store, {})], 0)
    try:
        results = replay(requests, setup)
    finally:
        setup.close()
    expected = independent_lru(requests, capacity_chunks)
    got = [r.hits["dram"] for r in results]
    assert got == expected
    rate = sum(expected) / sum(len(r.tokens) for r in requests)
    assert 0.05 < rate < 0.95  # evictions happen and hits happen: the comparison has teeth
