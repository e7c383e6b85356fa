"""What the connector moves, in chunks and blocks: pure bookkeeping, no vLLM import.

A kvtier chunk is `chunk_tokens / block_size` whole vLLM blocks. The scheduler turns requests
into a `StepPlan` of loads and saves (`ChunkCopy`: a key plus block ids); the workers copy
pages. Token `t` of a
request lives in block `block_ids[t // block_size]`, so chunk `i` is blocks
`[i * blocks_per_chunk, (i + 1) * blocks_per_chunk)` of the request's block table.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.errors import ConfigError
from kvtier.keys import KEY_BYTES, Key, TokensLike, chain_keys


@dataclass(frozen=True, slots=True)
class Geometry:
    """Chunk and block sizes of one engine; chunks are whole blocks."""

    chunk_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.chunk_tokens % self.block_size:
            raise ConfigError(
                f"chunk_tokens={self.chunk_tokens} is not a multiple of vLLM's "
                f"block_size={self.block_size}; set chunk_tokens in kv_connector_extra_config "
                f"to a multiple of {self.block_size}"
            )

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size

    def loadable_chunks(self, num_tokens: int) -> int:
        """Full chunks that may be loaded for a request of `num_tokens` tokens: the last
        token is always computed, so that vLLM has logits to sample from."""
        return max(num_tokens - 1, 0) // self.chunk_tokens

    def chunk_blocks(self, block_ids: Sequence[int], chunk: int, first_token: int = 0) -> list[int]:
        """Block ids of chunk `chunk` holding tokens at or after `first_token`."""
        start = chunk * self.blocks_per_chunk
        skip = max(0, first_token // self.block_size - start)
        return list(block_ids[start + skip : start + self.blocks_per_chunk])


@dataclass(frozen=True, slots=True)
class ChunkCopy:
    """One chunk moved between kvtier and vLLM blocks.

    `block_ids` are the destination (load) or source (save) blocks; for a load that starts
    inside the chunk (vLLM's own prefix cache holds its head) they are its last blocks only,
    and `skip_blocks` says how many leading blocks of the stored chunk to leave out.
    """

    key: Key
    block_ids: tuple[int, ...]
    skip_blocks: int = 0


TIERS = ("dram", "disk", "remote")  # the node's tiers, nearest first, as its lookups name them


def farthest(tiers: Sequence[str]) -> str:
    """The farthest of `tiers` (TIERS' order; "dram" when none)."""
    return max(tiers, key=lambda t: TIERS.index(t) if t in TIERS else len(TIERS), default="dram")


@dataclass(slots=True)
class RequestJobs:
    """One request's copies in one step."""

    req_id: str
    chunks: list[ChunkCopy] = field(default_factory=list)
    async_load: bool = False  # load in the background; the request waits, others run
    tier: str = "dram"  # a load's farthest tier (its time is charged to it: `tierchoice`)


@dataclass(slots=True)
class StepPlan:
    """Everything the workers do in one engine step (the connector metadata's payload)."""

    loads: list[RequestJobs] = field(default_factory=list)
    saves: list[RequestJobs] = field(default_factory=list)
    idle: bool = False  # nothing computes this step: the workers may wait for their loads
    number: int = 0  # the planner's count; TP rank 0's worker echoes it (`tierchoice.STEP`)


class KeyChain:
    """A request's chunk keys, extended as its tokens grow (each chunk hashed once)."""

    __slots__ = ("_root", "_tokens", "keys")

    def __init__(self, root: Key, chunk_tokens: int) -> None:
        self._root = root
        self._tokens = chunk_tokens
        self.keys: list[Key] = []

    def upto(self, tokens: TokensLike, chunks: int) -> list[Key]:
        """The keys of the first `chunks` chunks of `tokens` (which must hold them)."""
        have = len(self.keys)
        if chunks > have:
            c = self._tokens
            prev = self.keys[-1] if self.keys else self._root
            self.keys += chain_keys(prev, tokens[have * c : chunks * c], c)
        return self.keys[:chunks]


def rank_keys(keys: Sequence[Key], tp_rank: int, tp_size: int) -> list[Key]:
    """The keys one tensor-parallel rank stores its head shard under (itself when tp=1)."""
    if tp_size == 1:
        return list(keys)
    tag = f"tp{tp_rank}of{tp_size}".encode()
    return [hashlib.blake2b(k + tag, digest_size=KEY_BYTES).digest() for k in keys]


def page_fingerprint(
    layout: str,
    dtype: str,
    block_size: int,
    page_bytes: int,
    num_layers: int,
    tp_size: int,
    variant: str = "",
) -> str:
    """A digest of everything that fixes a chunk's bytes in vLLM's paged cache; part of
    every key, so an engine with another layout, dtype, block size or TP degree never
    loads these pages. `variant` holds what else changes them: the KV cache dtype as
    configured (fp8_e4m3 and fp8_e5m2 are both stored as uint8) and its quantization mode,
    the weights' quantization and revision."""
    text = f"vllm-pages/{layout}/{dtype}/bs{block_size}/P{page_bytes}/L{num_layers}/tp{tp_size}"
    return hashlib.blake2b(f"{text}/{variant}".encode(), digest_size=8).hexdigest()


HIT_PREFIX = "hit_tokens/"  # + tier name: a Tally counter of hit tokens served by that tier


class Tally:
    """Counter deltas, and samples for histograms, since the last `drain()` (what vLLM's
    stats pipeline wants); thread-safe."""

    __slots__ = ("_data", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, float | list[float]] = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self._add(name, value)

    def add_all(self, values: dict[str, float]) -> None:
        """`add` for each, at once: a `drain` takes all of them or none."""
        with self._lock:
            for name, value in values.items():
                self._add(name, value)

    def _add(self, name: str, value: float) -> None:
        total = self._data.get(name, 0)
        assert not isinstance(total, list)
        self._data[name] = total + value

    def observe(self, name: str, value: float) -> None:
        """One sample (a request's load time) for the histogram `name`."""
        with self._lock:
            samples = self._data.setdefault(name, [])
            assert isinstance(samples, list)
            samples.append(value)

    def drain(self) -> dict[str, float | list[float]]:
        with self._lock:
            data, self._data = self._data, {}
        return data
