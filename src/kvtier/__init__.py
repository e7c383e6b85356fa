"""kvtier: reuse LLM KV cache across GPU, DRAM, SSD and a shared cache server."""

from kvtier.cache import BoundCache
from kvtier.chunkstore import Located
from kvtier.config import StoreConfig, parse_size
from kvtier.errors import (
    AuthError,
    ChunkMissing,
    ConfigError,
    KvtierError,
    PinRefused,
    ProtocolError,
    TLSError,
)
from kvtier.layout import KVLayout
from kvtier.store import Store, StoreStats
from kvtier.tiers.base import TierStats

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BoundCache",
    "ChunkMissing",
    "ConfigError",
    "KVLayout",
    "KvtierError",
    "Located",
    "PinRefused",
    "ProtocolError",
    "Store",
    "StoreConfig",
    "StoreStats",
    "TLSError",
    "TierStats",
    "parse_size",
]
