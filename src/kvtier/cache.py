"""BoundCache: one model's (and tenant's) view of a Store, in tokens and arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtier.chunkstore import ChunkStore, Located
from kvtier.errors import ChunkMissing, ConfigError
from kvtier.expiry import expiry_ns
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
        ttl_s: float | None = None,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise ConfigError(f"layout: expected a kvtier.KVLayout, got {type(layout).__name__}")
        if not isinstance(model_id, str) or not model_id:
            raise ConfigError(f"model_id: expected a non-empty string, got {model_id!r}")
        number = isinstance(ttl_s, int | float) and not isinstance(ttl_s, bool)
        if ttl_s is not None and not (number and ttl_s > 0):
            raise ConfigError(
                f"ttl_s: expected a positive number of seconds or None, got {ttl_s!r}"
            )
        self.store = store
        self.model_id = model_id
        self.layout = layout
        self.salt = salt
        self.ttl_s = None if ttl_s is None else float(ttl_s)
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
        expires = self.expiry_ns()
        # Tail first: when the prefix does not fit, making room evicts its own tail, not its head.
        for i in reversed(range(len(keys))):
            start = i * self.chunk_tokens
            views = chunk_views(arr, start, start + self.chunk_tokens)
            self.store.write_chunk(keys[i], views, expires)
        self.store.touch(keys)

    def expiry_ns(self) -> int:
        """When a chunk this cache saves now expires (wall clock ns; 0: no TTL)."""
        return expiry_ns(self.ttl_s)

    def pin(self, tokens: TokensLike) -> int:
        """Keep the stored prefix of `tokens` from eviction and from expiry, in every tier
        that holds it (and across restarts, with a disk tier or a kvtier server); returns its
        length in tokens (0 when nothing of it is stored; chunks saved later are not pinned
        by this call). Pinning a prefix again changes nothing. Raises PinRefused, pinning
        nothing, when a tier's pinned bytes would pass `pin_fraction` of it."""
        return self.store.pin_keys(self.keys(tokens)) * self.chunk_tokens

    def unpin(self, tokens: TokensLike) -> int:
        """Remove the pins made on `tokens` or on any prefix of them; their chunks are
        evictable (and expire) again unless another pin covers them. Returns the longest
        prefix unpinned, in tokens (0 when none was pinned). Raises KvtierError when a kvtier
        server cannot be asked, after the local pins are removed: unpin again once it is
        back."""
        return self.store.unpin_keys(self.keys(tokens)) * self.chunk_tokens

    def prefetch(self, tokens: TokensLike) -> None:
        """Hint: start promoting the stored prefix of `tokens` towards DRAM."""
        self.store.prefetch_keys(self.keys(tokens), self.chunk_bytes)

    def __repr__(self) -> str:
        return f"BoundCache(model_id={self.model_id!r}, layout={self.layout}, salt=...)"
