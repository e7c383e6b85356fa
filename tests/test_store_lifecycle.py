"""Store lifecycle under concurrency: flush waits for what came before it, close races saves."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from tests.conftest import make_config

import kvtier
from kvtier.errors import StoreClosed

WIDE = kvtier.KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype="float16")
WIDE_CHUNK = 16  # tokens: 32 KiB chunks, so a save spends a while between reserve and commit


def _save_until_closed(
    cache: kvtier.BoundCache, started: threading.Event, outcome: list[BaseException]
) -> None:
    """Save new chunks until the store refuses; append the exception that stopped it."""
    kv = np.ones(WIDE.shape(4 * WIDE_CHUNK), WIDE.storage_dtype)  # (L, 2, T, H, D)
    i = 0
    try:
        while True:
            cache.save([i] * (4 * WIDE_CHUNK), kv)
            i += 1
            started.set()
    except BaseException as exc:
        outcome.append(exc)
    finally:
        started.set()


def test_close_racing_a_save_raises_store_closed(tmp_path: Path) -> None:
    """A save racing close() on a DRAM-only store ends with StoreClosed, never another error
    (close cleared the DRAM tier between a save's reserve and its commit: KeyError)."""
    for _ in range(40):
        config = make_config(
            tmp_path, chunk_tokens=WIDE_CHUNK, dram_bytes=1 << 20, disk_dir=None, disk_bytes=None
        )
        store = kvtier.Store(config)
        cache = store.bind("m", WIDE)
        started = threading.Event()
        outcome: list[BaseException] = []
        saver = threading.Thread(target=_save_until_closed, args=(cache, started, outcome))
        saver.start()
        started.wait()
        store.close()
        saver.join(timeout=30)
        assert not saver.is_alive(), "the saver hung"
        assert isinstance(outcome[0], StoreClosed), repr(outcome[0])


def test_release_after_close_is_harmless(tmp_path: Path) -> None:
    """A reader that releases its chunk after the store closed gets no error."""
    store = kvtier.Store(make_config(tmp_path, chunk_tokens=WIDE_CHUNK))
    cache = store.bind("m", WIDE)
    tokens = list(range(WIDE_CHUNK))
    cache.save(tokens, np.ones(WIDE.shape(WIDE_CHUNK), WIDE.storage_dtype))
    key = cache.keys(tokens)[0]
    held = store.acquire_chunk(key, cache.chunk_bytes)
    assert held is not None
    store.close()
    store.release_chunk(key)
    del held
