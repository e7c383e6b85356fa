"""Shared fixtures: small layouts and stores on real files in tmp_path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
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


def prefix_kv(tokens: Sequence[int], layout: kvtier.KVLayout = LAYOUT) -> np.ndarray:
    """Deterministic KV (L, 2, T, H, D) where each full chunk depends only on the tokens up to
    its end (as real KV does), so any process can regenerate what a chunk must hold."""
    kv = np.zeros(layout.shape(len(tokens)), dtype=layout.storage_dtype)
    ids = np.asarray(tokens, dtype="<i4")
    for end in range(CHUNK, len(tokens) + 1, CHUNK):
        seed = int.from_bytes(
            hashlib.blake2b(ids[:end].tobytes(), digest_size=8).digest(), "little"
        )
        chunk = np.random.default_rng(seed).standard_normal(layout.shape(CHUNK))
        kv[:, :, end - CHUNK : end] = chunk.astype(layout.storage_dtype)
    return kv


SAVE_CHUNKS = 3


def tokens_for(i: int) -> list[int]:
    """The tokens of the writer's i-th save (two saves in three share a head)."""
    rng = np.random.default_rng(i)
    head = [int(i // 3)] * CHUNK
    return head + [int(t) for t in rng.integers(0, 1000, (SAVE_CHUNKS - 1) * CHUNK + 1)]


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
