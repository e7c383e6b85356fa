"""Saving the new full chunks of a sequence's KV from a transformers cache, in the background.

A chunk is stored under the tokens it covers, so a cache is saved only when its rows certainly
belong to those tokens one to one (`kv_matches_tokens`); anything else is skipped and counted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from kvtier.cache import BoundCache
from kvtier.integrations.hf_load import LayerKV, raw_numpy
from kvtier.layout import KVLayout

TokenArray = np.ndarray[tuple[int], np.dtype[np.int64]]


def kv_matches_tokens(
    prompt: TokenArray, sequence: TokenArray, layers: Sequence[LayerKV], layout: KVLayout
) -> bool:
    """True when `layers` certainly hold the KV of `sequence` row for row: the sequence starts
    with the prompt, and every layer (one per layout layer) holds keys and values of shape
    (1, H, len(sequence) - 1, D) -- one row per token fed to the model, the last generated
    token never being fed back. Not a proof of their values: the request check (`hf_request`)
    admits only decoding modes that write rows in token order; this catches the rest."""
    if len(sequence) < len(prompt) or not np.array_equal(sequence[: len(prompt)], prompt):
        return False
    want = (1, layout.num_kv_heads, len(sequence) - 1, layout.head_dim)
    return len(layers) == layout.num_layers and all(
        isinstance(t, torch.Tensor) and tuple(t.shape) == want for kv in layers for t in kv
    )


class ChunkSaver:
    """Writes chunks on one background thread, in submission order; thread-safe.

    The caller hands over the cache's per-layer tensors (1, H, T, D) as they are; transformers
    replaces them (`torch.cat`) rather than writing into them, so they stay valid while saved.
    A failure is counted in `errors`, never raised into inference; a cache whose rows do not
    match the tokens one to one is not saved at all and counted in `unsafe_skipped`.
    """

    def __init__(self, cache: BoundCache, dtype: torch.dtype) -> None:
        self.cache = cache
        self.errors = 0
        self.unsafe_skipped = 0
        self.last_error: BaseException | None = None
        layout = cache.layout
        shape = layout.shape(cache.chunk_tokens)  # (L, 2, C, H, D)
        self._buf = torch.empty(shape, dtype=dtype)
        self._view = raw_numpy(self._buf).reshape(-1).view(np.uint8).data
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-save")
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []

    def submit(
        self, prompt: TokenArray, tokens: TokenArray, layers: Sequence[LayerKV], first_chunk: int
    ) -> bool:
        """Save full chunks `first_chunk..` of `tokens` (the prompt and what was generated after
        it), whose KV `layers` hold; False (counted, nothing saved) unless `kv_matches_tokens`."""
        if not kv_matches_tokens(prompt, tokens, layers, self.cache.layout):
            self.unsafe_skipped += 1
            return False
        future = self._pool.submit(self._save, tokens, list(layers), first_chunk)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [future]
        return True

    def flush(self) -> None:
        """Wait until every submitted chunk has been handed to the store."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _save(self, tokens: TokenArray, layers: list[LayerKV], first_chunk: int) -> None:
        try:
            self._write(tokens, layers, first_chunk)
        except Exception as exc:  # a failing tier degrades to misses, never to a failed request
            self.errors += 1
            self.last_error = exc

    def _write(self, tokens: TokenArray, layers: list[LayerKV], first_chunk: int) -> None:
        c = self.cache.chunk_tokens
        keys = self.cache.keys(tokens[: (len(tokens) - 1) // c * c])  # rows held: len - 1
        store, buf = self.cache.store, self._buf
        expires = self.cache.expiry_ns()  # the bound cache's TTL, from now
        for i in reversed(range(first_chunk, len(keys))):  # tail first, as BoundCache.save
            lo, hi = i * c, (i + 1) * c
            for layer, (k, v) in enumerate(layers):
                buf[layer, 0].copy_(k[0, :, lo:hi].transpose(0, 1))  # (C, H, D)
                buf[layer, 1].copy_(v[0, :, lo:hi].transpose(0, 1))
            store.write_chunk(keys[i], [self._view], expires)
        store.touch(keys)
