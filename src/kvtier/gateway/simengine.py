"""The timing model of `kvtier worker-sim`: one prefill lane, concurrent decode.

A GPU prefills one batch at a time, so each worker has one FIFO prefill lane. A request
waits for the lane, then holds it for

    uncached_tokens x prefill_ms_per_token + dram_tokens x dram_load_ms_per_token
        + shared_tokens x shared_load_ms_per_token

after which its first token is out (TTFT = lane wait + that). Its blocks are admitted to the
cache (and the KV events published) at the end of that time, still holding the lane, so a
request cancelled before then leaves no trace. Further tokens follow every
`decode_ms_per_token`; decodes of different requests overlap. All waiting is asyncio sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import xxhash

from kvtier.gateway.events import Publisher
from kvtier.gateway.simcache import SharedTier, SimCache
from kvtier.gateway.tokens import BLOCK_TOKENS, block_keys

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated worker. `kvtier_tokens=None`: no kvtier DRAM tier; `shared_tokens`
    sizes the `SharedTier` that `start_sims` builds for all its workers (None: none)."""

    model: str = "sim"
    cache_tokens: int = 65536
    block_tokens: int = BLOCK_TOKENS
    prefill_ms_per_token: float = 0.1
    decode_ms_per_token: float = 5.0
    kvtier_tokens: int | None = None
    dram_load_ms_per_token: float = 0.01
    shared_tokens: int | None = None
    shared_load_ms_per_token: float = 0.02
    api_key: str = ""  # as vLLM's --api-key: /v1 routes answer 401 without it

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {self.block_tokens}")
        sizes = {
            "cache_tokens": self.cache_tokens,
            "kvtier_tokens": self.kvtier_tokens,
            "shared_tokens": self.shared_tokens,
        }
        for name, tokens in sizes.items():
            if tokens is not None and tokens < self.block_tokens:
                raise ValueError(f"{name} must hold at least one block of {self.block_tokens}")
        times = (
            self.prefill_ms_per_token,
            self.decode_ms_per_token,
            self.dram_load_ms_per_token,
            self.shared_load_ms_per_token,
        )
        if min(times) < 0:
            raise ValueError("per-token times must not be negative")

    def blocks(self, tokens: int | None) -> int | None:
        """Whole blocks in `tokens` (None stays None)."""
        return None if tokens is None else tokens // self.block_tokens


class Prefill(NamedTuple):
    """A request's prompt and where its reused prefix came from, in tokens."""

    prompt_tokens: int
    gpu_tokens: int
    dram_tokens: int
    shared_tokens: int

    @property
    def cached_tokens(self) -> int:
        return self.gpu_tokens + self.dram_tokens + self.shared_tokens


class Token(NamedTuple):
    """One generated token (4 ASCII characters) and the prefill of its request."""

    text: str
    prefill: Prefill


@dataclass(slots=True)
class SimCounters:
    """What `/metrics` reports: counters since start and the current queue."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    prefill_s_sum: float = 0.0
    prefill_count: int = 0
    dram_hit_tokens: int = 0
    shared_hit_tokens: int = 0
    dram_load_s: float = 0.0
    shared_load_s: float = 0.0
    in_flight: int = 0  # requests between arrival and their last token
    waiting: int = 0  # of those, waiting for the prefill lane

    @property
    def running(self) -> int:
        return self.in_flight - self.waiting


def output_tokens(prompt: np.ndarray, count: int) -> list[str]:
    """`count` deterministic tokens for a prompt, each three letters and a space, so a
    4-bytes-a-token tokenizer counts each as one token."""
    seed = xxhash.xxh3_64_intdigest(np.ascontiguousarray(prompt, dtype=np.int64).tobytes())
    out = []
    for i in range(count):
        h = xxhash.xxh3_64_intdigest(i.to_bytes(8, "little"), seed=seed)
        out.append("".join(chr(97 + (h >> (8 * j)) % 26) for j in range(3)) + " ")
    return out


class SimEngine:
    """One simulated worker: its cache, prefill lane, counters and event publisher."""

    def __init__(
        self,
        config: SimConfig,
        shared: SharedTier | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        gpu_blocks = config.blocks(config.cache_tokens)
        assert gpu_blocks is not None
        self.config = config
        self.cache = SimCache(
            gpu_blocks, config.block_tokens, config.blocks(config.kvtier_tokens), shared
        )
        self.counters = SimCounters()
        self.publisher = publisher
        self._lane = asyncio.Lock()  # FIFO: waiters acquire in arrival order

    async def generate(
        self, prompt: np.ndarray, salt: str, max_tokens: int
    ) -> AsyncGenerator[Token, None]:
        """The tokens of one request, paced by the timing model. Closing or cancelling the
        iterator drops the rest of the request's work."""
        self.counters.in_flight += 1
        try:
            async with self._lane_turn():
                prefill = await self._prefill(prompt, salt)
            decode_s = self.config.decode_ms_per_token / 1e3
            for i, text in enumerate(output_tokens(prompt, max_tokens)):
                if i:
                    await asyncio.sleep(decode_s)
                self.counters.generation_tokens += 1
                yield Token(text, prefill)
        finally:
            self.counters.in_flight -= 1

    @contextlib.asynccontextmanager
    async def _lane_turn(self) -> AsyncIterator[None]:
        self.counters.waiting += 1
        try:
            await self._lane.acquire()
        finally:
            self.counters.waiting -= 1
        try:
            yield
        finally:
            self._lane.release()

    async def _prefill(self, prompt: np.ndarray, salt: str) -> Prefill:
        """Hold the lane for the prompt's compute and loads, then admit its blocks."""
        c, size = self.config, self.config.block_tokens
        keys = block_keys(prompt, size, salt)
        hit = self.cache.lookup(keys)
        p = Prefill(
            len(prompt), hit.gpu_blocks * size, hit.dram_blocks * size, hit.shared_blocks * size
        )
        dram_s = p.dram_tokens * c.dram_load_ms_per_token / 1e3
        shared_s = p.shared_tokens * c.shared_load_ms_per_token / 1e3
        compute_s = (p.prompt_tokens - p.cached_tokens) * c.prefill_ms_per_token / 1e3
        start = time.perf_counter()
        await asyncio.sleep(compute_s + dram_s + shared_s)
        events = self.cache.admit(keys, prompt, salt)
        if self.publisher is not None:
            self.publisher.publish(events)
        n = self.counters
        n.prefill_s_sum += time.perf_counter() - start
        n.prefill_count += 1
        n.prompt_tokens += p.prompt_tokens
        n.cached_tokens += p.cached_tokens
        n.dram_hit_tokens += p.dram_tokens
        n.shared_hit_tokens += p.shared_tokens
        n.dram_load_s += dram_s
        n.shared_load_s += shared_s
        return p
