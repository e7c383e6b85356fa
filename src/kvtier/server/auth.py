"""Tenants and tokens: the auth file, token checks and per-tenant key spaces.

An auth file has one `tenant token` pair per line (`#` starts a comment). Without one, every
client is the single default tenant "". Each tenant's keys are rehashed server-side as
its namespace tag (`quota.namespace_tag(tenant)`, 4 bytes) followed by blake2b(tenant || key)
(12 bytes), so tenants never share a key space whatever keys they send, and the server's
tiers can count each tenant's bytes (`quota.py`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.config import read_columns
from kvtier.errors import ConfigError
from kvtier.keys import KEY_BYTES, Key
from kvtier.quota import NS_BYTES, namespace_tag

DEFAULT_TENANT = ""
_OPEN = frozenset({DEFAULT_TENANT})


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Auth:
    """Token -> tenant. `open` (no auth file) accepts every client as the default tenant."""

    tenants_by_digest: dict[bytes, str] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not self.tenants_by_digest

    @property
    def tenants(self) -> frozenset[str]:
        """Every tenant a client can be (the default one alone when open)."""
        return frozenset(self.tenants_by_digest.values()) if not self.open else _OPEN

    def tenant(self, token: str) -> str | None:
        """The tenant a token belongs to, or None if it is not a valid token."""
        if self.open:
            return DEFAULT_TENANT
        wanted = _digest(token)
        found = None
        for digest, tenant in self.tenants_by_digest.items():
            if hmac.compare_digest(digest, wanted):
                found = tenant
        return found

    @classmethod
    def from_file(cls, path: str | Path) -> Auth:
        """Parse an auth file; raises ConfigError naming the line to fix."""
        tenants: dict[bytes, str] = {}
        for where, parts in read_columns(path, "auth file"):
            if len(parts) != 2:
                raise ConfigError(f"{where}: expected 'tenant token'")
            tenant, token = parts
            if len(token) < 8:
                raise ConfigError(f"{where}: token shorter than 8 characters")
            if _digest(token) in tenants:
                raise ConfigError(f"{where}: token used twice")
            tenants[_digest(token)] = tenant
        if not tenants:
            raise ConfigError(f"auth file {path}: no 'tenant token' lines")
        _check_tags(path, set(tenants.values()))
        return cls(tenants)


def _check_tags(path: str | Path, tenants: set[str]) -> None:
    by_tag: dict[bytes, str] = {}
    for tenant in sorted(tenants):
        other = by_tag.setdefault(namespace_tag(tenant), tenant)
        if other != tenant:  # 1 in 4 billion per pair: rename one of them
            raise ConfigError(
                f"auth file {path}: tenants {other!r} and {tenant!r} share a namespace tag; "
                "rename one of them"
            )


_tag = functools.lru_cache(maxsize=1024)(namespace_tag)


def tenant_key(tenant: str, key: Key) -> Key:
    """The server-side key of a tenant's chunk: its namespace tag, then a digest."""
    data = tenant.encode()
    size = KEY_BYTES - NS_BYTES
    h = hashlib.blake2b(len(data).to_bytes(2, "little") + data, digest_size=size)
    h.update(key)
    return _tag(tenant) + h.digest()
