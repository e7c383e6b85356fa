"""Engines that serve one request at a time against a kvtier store.

`SimEngine` uses the real store (real keys, tiers, eviction and file I/O) with payloads scaled
down: each chunk holds `chunk_bytes` bytes (a multiple of 4096) instead of the model's true
KV, so capacities given in tokens convert exactly and hit rates are those of the real
capacity. Times come from the cost model (modelled). `TransformersEngine` runs a real model
through `kvtier.integrations.transformers.CachedModel` and measures wall-clock times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from kvtier.bench.costmodel import TIERS, CostModel
from kvtier.bench.workloads import Request
from kvtier.cache import BoundCache
from kvtier.config import StoreConfig
from kvtier.errors import ChunkMissing
from kvtier.layout import KVLayout
from kvtier.store import Store
from kvtier.tiers.disk import HEADER_BYTES

PAGE = 4096


class Outcome(NamedTuple):
    """What serving one request reused and cost."""

    prompt_tokens: int
    hits: Mapping[str, int]  # tier -> prompt tokens served from it (TIERS)
    load_s: float
    compute_s: float
    baseline_s: float  # prefill of the whole prompt without any cache; nan when unknown


class Engine(Protocol):
    """Serves requests one at a time; `prefetch`/`protect` are the scheduler's hints."""

    modelled: bool

    def run(self, request: Request) -> Outcome: ...

    def prefetch(self, request: Request) -> float:
        """Start promoting the request's stored prefix to DRAM; modelled seconds it takes."""
        ...

    def protect(self, request: Request) -> None:
        """Re-touch the request's chunks so eviction picks other chunks first."""
        ...

    def close(self) -> None: ...


def scaled_layout(chunk_tokens: int) -> KVLayout:
    """The smallest uint8 layout whose chunk of `chunk_tokens` is a multiple of 4096 bytes."""
    head_dim = PAGE // math.gcd(PAGE, 2 * chunk_tokens)
    return KVLayout(1, 1, head_dim, dtype="uint8")


def store_config(
    chunk_tokens: int,
    chunk_bytes: int,
    dram_tokens: int,
    disk_tokens: int,
    disk_dir: Path | None,
    remote: str | None = None,
    disk_admit_after: int = 1,
) -> StoreConfig:
    """A StoreConfig whose DRAM pool and disk budget hold exactly the given tokens' chunks
    (disk files carry a 4 KiB header each; DRAM extents are page-aligned)."""
    dram_chunks, disk_chunks = dram_tokens // chunk_tokens, disk_tokens // chunk_tokens
    slot = -(-chunk_bytes // PAGE) * PAGE
    use_disk = disk_chunks > 0 and disk_dir is not None
    return StoreConfig(
        chunk_tokens=chunk_tokens,
        dram_bytes=dram_chunks * slot if dram_chunks else None,
        disk_dir=disk_dir if use_disk else None,
        disk_bytes=disk_chunks * (chunk_bytes + HEADER_BYTES) if use_disk else None,
        remote=remote,
        disk_admit_after=disk_admit_after,
    )


class SimEngine:
    """The real store with scaled payloads; times from `cost` (modelled)."""

    modelled = True

    def __init__(
        self,
        cost: CostModel,
        store: Store | None,
        chunk_tokens: int,
        tier_names: Mapping[str, str] | None = None,
        gpu: Store | None = None,
    ) -> None:
        self.cost = cost
        self.store = store
        self.gpu = gpu
        self.chunk_tokens = chunk_tokens
        layout = scaled_layout(chunk_tokens)
        self.cache: BoundCache | None = store.bind(cost.model.name, layout) if store else None
        self.gpu_cache = gpu.bind(cost.model.name, layout) if gpu else None
        self.names = dict(tier_names or {})  # store tier -> reported tier ("dram" -> "gpu")
        self._zeros = np.zeros((1, 2, 0, 1, 1), dtype=np.uint8)

    def run(self, request: Request) -> Outcome:
        tokens, c = request.tokens, self.chunk_tokens
        n = len(tokens)
        usable = (n - 1) // c * c  # always compute at least the last prompt token
        hits = dict.fromkeys(TIERS, 0)
        # The engine's own prefix cache in VRAM is consulted first; kvtier serves what it lacks.
        on_gpu = self.gpu_cache.locate(tokens[:usable]).chunks if self.gpu_cache else 0
        hits["gpu"] = on_gpu * c
        if self.cache is not None and self.store is not None:
            located = self.cache.locate(tokens[:usable])
            found = located.chunks
            if found > on_gpu:
                try:
                    self.cache.load(tokens[: found * c])
                except ChunkMissing as exc:
                    found = exc.loaded_tokens // c
            for tier in located.tiers[on_gpu:found]:
                hits[self.names.get(tier, tier)] += c
            self.cache.save(tokens[: n // c * c], self._kv(n // c * c))
            self.store.flush()
        if self.gpu_cache is not None:
            self.gpu_cache.save(tokens[: n // c * c], self._kv(n // c * c))
        hit = sum(hits.values())
        load_s = sum(self.cost.load_s(t, tier) for tier, t in hits.items() if t)
        compute_s = self.cost.prefill_s(n - hit, hit)
        return Outcome(n, hits, load_s, compute_s, self.cost.prefill_s(n))

    def prefetch(self, request: Request) -> float:
        if self.cache is None or self.store is None:
            return 0.0
        located = self.cache.locate(request.tokens)
        lower = [t for t in located.tiers if t != "dram"]
        if not lower:
            return 0.0
        self.cache.prefetch(request.tokens[: located.chunks * self.chunk_tokens])
        self.store.flush()
        return sum(self.cost.load_s(self.chunk_tokens, t) for t in lower)

    def protect(self, request: Request) -> None:
        if self.cache is not None and self.store is not None:
            self.store.touch(self.cache.keys(request.tokens))

    def close(self) -> None:
        for store in (self.store, self.gpu):
            if store is not None:
                store.close()

    def _kv(self, tokens: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Zeros shaped (1, 2, tokens, 1, D) of the scaled layout, from one reused buffer."""
        assert self.cache is not None
        if self._zeros.shape[2] < tokens:
            size = max(tokens, 2 * self._zeros.shape[2])
            self._zeros = np.zeros(self.cache.layout.shape(size), np.uint8)
        return self._zeros[:, :, :tokens]


class SimFactory:
    """Makes `SimEngine` nodes for one cost model and chunk size."""

    def __init__(self, cost: CostModel, chunk_tokens: int) -> None:
        self.cost = cost
        self.chunk_tokens = chunk_tokens
        self.chunk_bytes = scaled_layout(chunk_tokens).chunk_bytes(chunk_tokens)
        self.scale = cost.model.kv_bytes_per_token / scaled_layout(chunk_tokens).bytes_per_token

    def __call__(
        self, store: Store | None, tier_names: Mapping[str, str], gpu: Store | None = None
    ) -> Engine:
        return SimEngine(self.cost, store, self.chunk_tokens, tier_names, gpu)


class TransformersEngine:
    """A real model through CachedModel; TTFT measured on this machine (not modelled)."""

    modelled = False

    def __init__(self, model: Any, store: Store, names: Mapping[str, str]) -> None:
        cached_model = _cached_model_class()
        self.store = store
        self.names = dict(names)
        self.cached = cached_model(model, store, model_id="kvtier-bench")

    def run(self, request: Request) -> Outcome:
        import torch

        tokens = request.tokens
        c = self.cached.cache.chunk_tokens
        located = self.cached.cache.locate(tokens[: (len(tokens) - 1) // c * c])
        ids = torch.from_numpy(tokens.astype(np.int64))[None]  # (1, T)
        self.cached.generate(ids, max_new_tokens=1, do_sample=False)
        stats = self.cached.last_request
        assert stats is not None
        hits = dict.fromkeys(TIERS, 0)
        for tier in located.tiers[: stats.hit_tokens // c]:
            hits[self.names.get(tier, tier)] += c
        self.cached.flush()
        return Outcome(len(tokens), hits, 0.0, stats.ttft_s, math.nan)

    def prefetch(self, request: Request) -> float:
        self.cached.cache.prefetch(request.tokens)
        return 0.0

    def protect(self, request: Request) -> None:
        self.store.touch(self.cached.cache.keys(request.tokens))

    def close(self) -> None:
        self.cached.close()
        self.store.close()


class TransformersFactory:
    """A tiny random-weight Llama (or a local checkpoint) shared by every node."""

    def __init__(self, chunk_tokens: int, model_dir: str | None = None) -> None:
        _cached_model_class()
        from kvtier.integrations.transformers import kv_layout

        self.chunk_tokens = chunk_tokens
        self.model = _load_model(model_dir)
        self.chunk_bytes = kv_layout(self.model).chunk_bytes(chunk_tokens)

    def __call__(
        self, store: Store | None, tier_names: Mapping[str, str], gpu: Store | None = None
    ) -> Engine:
        if gpu is not None:  # the model keeps its own cache object; no separate GPU tier
            gpu.close()
        store = store or Store(StoreConfig(chunk_tokens=self.chunk_tokens, dram_bytes=None))
        return TransformersEngine(self.model, store, tier_names)


def _cached_model_class() -> Any:
    try:
        from kvtier.integrations.transformers import CachedModel
    except ImportError as exc:
        raise RuntimeError(
            f"--engine transformers needs kvtier.integrations.transformers ({exc}); "
            "install kvtier[torch] or use --engine sim"
        ) from exc
    return CachedModel


def _load_model(model_dir: str | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_dir is not None:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()  # type: ignore[no-untyped-call]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32_000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 17,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]
