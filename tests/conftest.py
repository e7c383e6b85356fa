"""Shared fixtures: small layouts and stores on real files in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import kvtier

LAYOUT = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
CHUNK = 4  # tokens per chunk in tests


def make_kv(tokens: int, seed: int = 0, layout: kvtier.KVLayout = LAYOUT) -> np.ndarray:
    """Random KV for `tokens` tokens, (L, 2, T, H, D)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(layout.shape(tokens)).astype(layout.storage_dtype)


def make_config(tmp_path: Path, **overrides: object) -> kvtier.StoreConfig:
    values: dict[str, object] = {
        "chunk_tokens": CHUNK,
        "dram_bytes": 64 << 10,
        "disk_dir": tmp_path / "disk",
        "disk_bytes": 1 << 20,
    }
    values.update(overrides)
    return kvtier.StoreConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[kvtier.Store]:
    s = kvtier.Store(make_config(tmp_path))
    yield s
    s.close()
