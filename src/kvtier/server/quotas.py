"""Per-tenant quotas of the cache server: the quota file and the defaults for every tenant.

A quota file has one `tenant dram disk` line per tenant (`#` starts a comment): sizes like
`4GiB`, `-` for the default (`--tenant-dram`, `--tenant-disk`), `none` for no limit. Every
tenant it names must be in the auth file; tenants it does not name get the defaults.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from kvtier.config import parse_size, read_columns
from kvtier.errors import ConfigError
from kvtier.quota import Quota, Quotas

DEFAULT = "-"
UNLIMITED = "none"


def load_quotas(
    tenants: Collection[str],
    path: str | Path | None = None,
    dram_bytes: int | None = None,
    disk_bytes: int | None = None,
) -> Quotas:
    """Every tenant's quota: the line of the quota file naming it, else the defaults.
    Raises ConfigError naming the file, the line and the fix."""
    default = Quota(dram_bytes, disk_bytes)
    by_name = dict.fromkeys(tenants, default)
    if path is not None:
        by_name.update(_parse(path, tenants, default))
    return Quotas(by_name)


def _parse(path: str | Path, tenants: Collection[str], default: Quota) -> dict[str, Quota]:
    found: dict[str, Quota] = {}
    for where, parts in read_columns(path, "quota file"):
        if len(parts) != 3:
            raise ConfigError(
                f"{where}: expected 'tenant dram disk' (sizes like 4GiB, '{DEFAULT}' for the "
                f"default, '{UNLIMITED}' for no limit)"
            )
        tenant, dram, disk = parts
        if tenant not in tenants:
            raise ConfigError(f"{where}: tenant {tenant!r} is not in the auth file")
        if tenant in found:
            raise ConfigError(f"{where}: tenant {tenant!r} has a quota line already")
        found[tenant] = Quota(
            _size(dram, default.dram_bytes, f"{where}: dram"),
            _size(disk, default.disk_bytes, f"{where}: disk"),
        )
    return found


def _size(value: str, default: int | None, name: str) -> int | None:
    if value == DEFAULT:
        return default
    if value.lower() == UNLIMITED:
        return None
    return parse_size(value, name)


def check_fits(quotas: Quotas, tier_bytes: dict[str, int | None]) -> list[str]:
    """Problems with the quotas against the tiers: ConfigError for a quota on a tier the
    server does not have; warnings (returned) where the quotas add up to more than a tier,
    so a full tier may still evict one tenant's chunks for another's."""
    notes = []
    for tier, capacity in tier_bytes.items():
        limits = [q.limit(tier) for q in quotas.by_name.values()]
        if capacity is None:
            if any(limit is not None for limit in limits):
                flag = "--disk-dir and --disk" if tier == "disk" else "--dram"
                raise ConfigError(f"a {tier} quota needs a {tier} tier: give {flag}")
            continue
        if all(limit is None for limit in limits):
            continue
        if None in limits or sum(limit or 0 for limit in limits) > capacity:
            notes.append(
                f"tenants' {tier} quotas add up to more than the {tier} tier ({capacity} "
                "bytes): when it is full, its least recently used chunks go, whoever's they are"
            )
    return notes
