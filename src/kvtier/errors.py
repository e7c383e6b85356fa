"""The few exceptions kvtier raises; each message says what to do about it."""

from __future__ import annotations


class KvtierError(Exception):
    """Base class of every kvtier error."""


class ConfigError(KvtierError, ValueError):
    """A configuration value (size, path, URL, layout) is invalid."""


class ChunkMissing(KvtierError):
    """A chunk reported by `lookup` could not be loaded (evicted, corrupted, server down).

    `loaded_tokens` leading tokens were loaded correctly; recompute the rest.
    """

    def __init__(self, loaded_tokens: int, requested_tokens: int) -> None:
        super().__init__(
            f"chunk missing: loaded {loaded_tokens} of {requested_tokens} tokens; "
            f"recompute from token {loaded_tokens} (the chunk was evicted, corrupted or its "
            "server is down)"
        )
        self.loaded_tokens = loaded_tokens
        self.requested_tokens = requested_tokens


class ProtocolError(KvtierError):
    """A peer sent a frame that breaks the kvtier wire protocol."""


class AuthError(KvtierError):
    """The cache server rejected the client's token."""


class TLSError(KvtierError):
    """Client and cache server do not agree on TLS: one end speaks it and the other does not,
    or the server's certificate is not trusted (see `StoreConfig.remote_ca`)."""


class StoreClosed(KvtierError):
    """The store was used after `close()`."""


class PinRefused(KvtierError):
    """A pin would take a tier's pinned bytes past its bound (`StoreConfig.pin_fraction`);
    nothing was pinned. Unpin something, or raise the bound."""
