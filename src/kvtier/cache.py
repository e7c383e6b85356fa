"""BoundCache: one model's (and tenant's) view of a Store, in tokens and arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtier.chunkstore import ChunkStore, Located
from kvtier.errors import ChunkMissing, ConfigError
from kvtier.keys import Key, Salt, TokensLike, chain_keys, root_key
from kvtier.layout import Array, KVLayout, chunk_views, rows_contiguous


class BoundCache:
    """Lookup, load, save and prefetch of token prefixes for one model; thread-safe. Built by
    `Store.bind`, over the store's key-level API (`ChunkStore`)."""

    def __init__(
        self,
        store: ChunkStore,
        model_id: str,
        layout: KVLayout,
        salt: Salt | None,
        chunk_tokens: int,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise ConfigError(f"layout: expected a kvtier.KVLayout, got {type(layout).__name__}")
        if not isinstance(model_id, str) or not model_id:
            raise ConfigError(f"model_id: expected a non-empty string, got {model_id!r}")
        self.store = store
        self.model_id = model_id
        self.layout = layout
        self.salt = salt
        self.chunk_tokens = chunk_tokens
        self.chunk_bytes = layout.chunk_bytes(self.chunk_tokens)
        self._root = root_key(model_id, layout.fingerprint, self.chunk_tokens, salt)

    def keys(self, tokens: TokensLike) -> list[Key]:
        """Keys of every full chunk of `tokens`."""
        return chain_keys(self._root, tokens, self.chunk_tokens)

    def lookup(self, tokens: TokensLike) -> int:
        """Longest stored prefix of `tokens`, in tokens (a multiple of chunk_tokens)."""
        return self.locate(tokens).chunks * self.chunk_tokens

    def locate(self, tokens: TokensLike) -> Located:
        """Like `lookup`, with the tier holding each leading chunk."""
        return self.store.locate(self.keys(tokens))

    def load(self, tokens: TokensLike, out: Any = None) -> Any:
        """KV of `tokens` (a multiple of chunk_tokens), shape (L, 2, T, H, D).

        Fills `out` in place when given. Raises ChunkMissing naming how many tokens were
        loaded if a chunk cannot be served; never returns wrong or partial data silently.
        """
        n = len(tokens)
        if n % self.chunk_tokens:
            raise ValueError(
                f"load: {n} tokens is not a multiple of chunk_tokens={self.chunk_tokens}; "
                "pass tokens[:cache.lookup(tokens)]"
            )
        result = self.layout.empty(n) if out is None else out
        arr = self.layout.as_storage(result, n, "out")  # (L, 2, T, H, D)
        # empty_like would copy a transposed `out`'s stride order, and rows of such a target
        # are not contiguous: data read into copies of them would be lost.
        target = arr if rows_contiguous(arr) else np.empty(arr.shape, arr.dtype)
        keys = self.keys(tokens)
        c = self.chunk_tokens
        try:
            views = [chunk_views(target, i * c, (i + 1) * c) for i in range(len(keys))]
            served = self.store.read_chunks(keys, views)
            missing = next((i for i, tier in enumerate(served) if tier is None), None)
            if missing is not None:
                raise ChunkMissing(missing * c, n)
        finally:
            if target is not arr:
                np.copyto(arr, target)
            self.store.touch(keys)
        return result

    def save(self, tokens: TokensLike, kv: Any) -> None:
        """Store the full chunks of `tokens`; `kv` (L, 2, len(tokens), H, D) is copied before
        this returns, lower tiers are written in the background."""
        n = len(tokens)
        arr: Array = self.layout.as_storage(kv, n)  # (L, 2, T, H, D)
        if not rows_contiguous(arr):
            arr = np.ascontiguousarray(arr)
        keys = self.keys(tokens)
        # Tail first: when the prefix does not fit, making room evicts its own tail, not its head.
        for i in reversed(range(len(keys))):
            start = i * self.chunk_tokens
            self.store.write_chunk(keys[i], chunk_views(arr, start, start + self.chunk_tokens))
        self.store.touch(keys)

    def prefetch(self, tokens: TokensLike) -> None:
        """Hint: start promoting the stored prefix of `tokens` towards DRAM."""
        self.store.prefetch_keys(self.keys(tokens), self.chunk_bytes)

    def __repr__(self) -> str:
        return f"BoundCache(model_id={self.model_id!r}, layout={self.layout}, salt=...)"
