"""Storage tiers. Tiers never know about each other; only the Store moves chunks between them."""

from kvtier.tiers.base import Tier, TierStats, Views, copy_views, total_bytes

__all__ = ["Tier", "TierStats", "Views", "copy_views", "total_bytes"]
