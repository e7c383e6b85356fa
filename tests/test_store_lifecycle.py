"""Store lifecycle under concurrency: flush waits for what came before it, close races saves."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
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


def _save_until_stopped(
    cache: kvtier.BoundCache, started: threading.Event, stop: threading.Event
) -> None:
    """Save new chunks (each save its own prefix) until `stop` is set."""
    kv = np.ones(WIDE.shape(2 * WIDE_CHUNK), WIDE.storage_dtype)  # (L, 2, T, H, D)
    i = 1000
    try:
        while not stop.is_set():
            cache.save([i] * (2 * WIDE_CHUNK), kv)
            i += 1
            started.set()
    finally:
        started.set()


@pytest.mark.parametrize("dram_bytes", [None, 1 << 20])
def test_flush_waits_only_for_earlier_saves(tmp_path: Path, dram_bytes: int | None) -> None:
    """flush() returns while another thread keeps saving, and by then every save issued
    before it has reached the disk tier (it used to wait for the pending count to reach 0)."""
    config = make_config(
        tmp_path, chunk_tokens=WIDE_CHUNK, dram_bytes=dram_bytes, disk_bytes=64 << 20
    )
    with kvtier.Store(config) as store:
        cache = store.bind("m", WIDE)
        started, stop = threading.Event(), threading.Event()
        saver = threading.Thread(target=_save_until_stopped, args=(cache, started, stop))
        saver.start()
        try:
            started.wait()
            mine = [[i] * (2 * WIDE_CHUNK) for i in range(8)]
            for tokens in mine:
                cache.save(tokens, np.full(WIDE.shape(len(tokens)), tokens[0], WIDE.storage_dtype))
            found: list[int] = []

            def flush_then_look() -> None:
                store.flush()
                found.extend(cache.lookup(tokens) for tokens in mine)

            flusher = threading.Thread(target=flush_then_look)
            flusher.start()
            flusher.join(timeout=30)
            assert not flusher.is_alive(), "flush() did not return while another thread saved"
        finally:
            stop.set()
            saver.join()
        assert found == [2 * WIDE_CHUNK] * len(mine)
