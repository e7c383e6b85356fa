"""The cache model of `kvtier worker-sim`: a GPU prefix cache with kvtier tiers behind it.

Pure and synchronous. Each tier is an LRU of block keys (the chained keys of
`kvtier.gateway.tokens.block_keys`) with a capacity in blocks. A worker has a GPU tier and
optionally a kvtier DRAM tier; several workers may share one `SharedTier` (kvtier's shared
cache server). DRAM and shared are write-through: every block a worker computes or loads is
also saved there, as kvtier's connector saves every chunk.

`lookup` finds the prefix a request can reuse: the leading blocks on GPU, then the further
blocks each found in DRAM (preferred) or the shared tier, stopping at the first block found
nowhere. `admit` puts all of a prompt's full blocks in every tier and returns the vLLM KV
events that say so, in the order they happened, so a subscriber replaying them holds exactly
what each tier holds. Engine block hashes in the events are the keys themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kvtier.gateway.events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_SHARED,
    BlockRemoved,
    BlockStored,
    Event,
)


class CacheHit(NamedTuple):
    """Leading blocks of a prompt found on GPU, then in DRAM, then in the shared tier."""

    gpu_blocks: int
    dram_blocks: int
    shared_blocks: int

    @property
    def blocks(self) -> int:
        return self.gpu_blocks + self.dram_blocks + self.shared_blocks


class BlockLRU:
    """An LRU set of block keys holding at most `capacity_blocks`, reported as `medium`."""

    def __init__(self, capacity_blocks: int, medium: str) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"{medium} tier: capacity must be at least one block")
        self.capacity_blocks = capacity_blocks
        self.medium = medium
        self._keys: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[int]:
        """The keys held, least recently used first."""
        return list(self._keys)

    def contains(self, key: int) -> bool:
        """Whether `key` is held (does not touch the LRU order)."""
        return key in self._keys

    def put(
        self, keys: Sequence[int], tokens: np.ndarray, block_tokens: int, salt: str
    ) -> list[Event]:
        """Hold every key of one prompt's chain (`keys[i]` covers `tokens[i*block_tokens:]`),
        most recent last, evicting the least recently used as needed. Returns the events:
        `BlockStored` runs for keys not held before, `BlockRemoved` for evictions."""
        log = _EventLog(self.medium, keys, tokens, block_tokens, salt)
        for i, key in enumerate(keys):
            if key in self._keys:
                self._keys.move_to_end(key)
                log.held(i)
                continue
            if len(self._keys) >= self.capacity_blocks:
                log.removed(self._keys.popitem(last=False)[0])
            self._keys[key] = None
            log.stored(i)
        return log.finish()

    def clear(self) -> None:
        self._keys.clear()

    def check_integrity(self) -> None:
        assert len(self._keys) <= self.capacity_blocks, "tier holds more than its capacity"


class SharedTier(BlockLRU):
    """kvtier's shared cache server: one LRU that several sim workers load from and save to."""

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks, MEDIUM_SHARED)


class SimCache:
    """One worker's tiers: GPU, optional DRAM (`dram_blocks=None`: off), optional shared."""

    def __init__(
        self,
        gpu_blocks: int,
        block_tokens: int,
        dram_blocks: int | None = None,
        shared: SharedTier | None = None,
    ) -> None:
        self.block_tokens = block_tokens
        self.gpu = BlockLRU(gpu_blocks, MEDIUM_GPU)
        self.dram = None if dram_blocks is None else BlockLRU(dram_blocks, MEDIUM_CPU)
        self.shared = shared

    def lookup(self, keys: Sequence[int]) -> CacheHit:
        """How many leading blocks of `keys` each tier serves (touches nothing)."""
        gpu = 0
        while gpu < len(keys) and self.gpu.contains(keys[gpu]):
            gpu += 1
        dram = shared = 0
        for key in keys[gpu:]:
            if self.dram is not None and self.dram.contains(key):
                dram += 1
            elif self.shared is not None and self.shared.contains(key):
                shared += 1
            else:
                break
        return CacheHit(gpu, dram, shared)

    def admit(self, keys: Sequence[int], tokens: np.ndarray, salt: str = "") -> list[Event]:
        """Put a prompt's full blocks on GPU and write them through to DRAM and shared;
        the events of every tier, GPU first."""
        events: list[Event] = []
        for tier in (self.gpu, self.dram, self.shared):
            if tier is not None:
                events += tier.put(keys, tokens, self.block_tokens, salt)
        return events

    def gpu_usage(self) -> float:
        """Fraction of GPU blocks in use, 0..1 (vLLM's kv_cache_usage_perc)."""
        return len(self.gpu) / self.gpu.capacity_blocks


class _EventLog:
    """Builds one tier's events for a `put`, merging neighbours: consecutive new blocks of
    the chain become one `BlockStored`, consecutive evictions one `BlockRemoved`."""

    def __init__(
        self, medium: str, keys: Sequence[int], tokens: np.ndarray, block_tokens: int, salt: str
    ) -> None:
        self.medium, self.keys, self.tokens = medium, keys, tokens
        self.block_tokens, self.salt = block_tokens, salt
        self.events: list[Event] = []
        self.run_start: int | None = None  # first block of the open BlockStored run
        self.run_end = 0
        self.gone: list[int | bytes] = []

    def stored(self, i: int) -> None:
        self._close_removed()
        if self.run_start is None:
            self.run_start = i
        self.run_end = i + 1

    def held(self, i: int) -> None:
        self._close_stored()

    def removed(self, key: int) -> None:
        self._close_stored()
        self.gone.append(key)

    def finish(self) -> list[Event]:
        self._close_stored()
        self._close_removed()
        return self.events

    def _close_removed(self) -> None:
        if self.gone:
            self.events.append(BlockRemoved(block_hashes=self.gone, medium=self.medium))
            self.gone = []

    def _close_stored(self) -> None:
        if self.run_start is None:
            return
        start, end, size = self.run_start, self.run_end, self.block_tokens
        self.run_start = None
        extra: list[tuple[object, ...] | None] | None = None
        if start == 0 and self.salt:
            extra = [(self.salt,)] + [None] * (end - 1)
        event = BlockStored(
            block_hashes=list(self.keys[start:end]),
            parent_block_hash=None if start == 0 else self.keys[start - 1],
            token_ids=self.tokens[start * size : end * size].tolist(),
            block_size=size,
            medium=self.medium,
            extra_keys=extra,
        )
        self.events.append(event)
