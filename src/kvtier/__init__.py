"""kvtier: reuse LLM KV cache across GPU, DRAM, SSD and a shared cache server."""

from kvtier.cache import BoundCache
from kvtier.config import StoreConfig, parse_size
from kvtier.errors import (
    AuthError,
    ChunkMissing,
    ConfigError,
    KvtierError,
    PinRefused,
    ProtocolError,
)
from kvtier.layout import KVLayout
from kvtier.store import Located, Store, StoreStats
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
    "TierStats",
    "parse_size",
]
