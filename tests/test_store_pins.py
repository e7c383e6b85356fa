"""User pins (`BoundCache.pin` / `unpin`): never evicted, bounded per tier, kept apart from
reader pins, shared prefixes, stats, and persistence across a restart (clean and kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import CHUNK, LAYOUT, make_config, make_kv

import kvtier
from kvtier.journal import Journal

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096  # a DRAM chunk of the test layout (512 bytes) takes one page
FILE = 4096 + 512  # a disk chunk: header + payload


def dram_only(tmp_path: Path, pages: int, **extra: object) -> kvtier.Store:
    config = make_config(tmp_path, dram_bytes=pages * PAGE, disk_dir=None, disk_bytes=None, **extra)
    return kvtier.Store(config)


def toks(seed: int, chunks: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 1000, chunks * CHUNK)]


def churn(cache: kvtier.BoundCache, saves: int, chunks: int = 2, seed: int = 1000) -> None:
    """Save `saves` unrelated prefixes: enough to evict everything evictable."""
    for i in range(saves):
        tokens = toks(seed + i, chunks)
        cache.save(tokens, make_kv(len(tokens), i))
    cache.store.flush()


def test_pinned_prefix_survives_eviction_and_unpin_frees_it(tmp_path: Path) -> None:
    """A pinned prefix stays stored however much else is saved; after unpin it is evicted
    like any other chunk."""
    with dram_only(tmp_path, 16) as store:
        cache = store.bind("m", LAYOUT)
        doc, other = toks(1, 4), toks(2, 4)
        kv = make_kv(len(doc))
        cache.save(doc, kv)
        cache.save(other, kv)
        assert cache.pin(doc) == len(doc)
        churn(cache, 20)
        assert cache.lookup(doc) == len(doc)
        assert cache.lookup(other) == 0
        np.testing.assert_array_equal(cache.load(doc), kv)
        assert store.stats().tier("dram").evictions > 0
        assert cache.unpin(doc) == len(doc)
        churn(cache, 20, seed=2000)
        assert cache.lookup(doc) == 0
        store.check_integrity()


def test_pin_returns_the_stored_prefix_only(tmp_path: Path) -> None:
    """pin() pins what is stored (its length in tokens, 0 for nothing); chunks saved later
    are not pinned by it."""
    with dram_only(tmp_path, 16) as store:
        cache = store.bind("m", LAYOUT)
        doc = toks(1, 4)
        assert cache.pin(doc) == 0
        cache.save(doc[: 2 * CHUNK], make_kv(2 * CHUNK))
        assert cache.pin([*doc, 1]) == 2 * CHUNK
        cache.save(doc, make_kv(len(doc)))
        assert store.stats().tier("dram").pinned_chunks == 2
        churn(cache, 20)
        assert cache.lookup(doc) == 2 * CHUNK


def test_reader_unpin_never_drops_a_user_pin(tmp_path: Path) -> None:
    """Acquiring and releasing a user-pinned chunk (a reader's pin) leaves the user pin."""
    with dram_only(tmp_path, 8) as store:
        cache = store.bind("m", LAYOUT)
        doc = toks(1, 1)
        cache.save(doc, make_kv(CHUNK))
        cache.pin(doc)
        key = cache.keys(doc)[0]
        for _ in range(3):
            held = store.acquire_chunk(key, cache.chunk_bytes)
            assert held is not None
            store.release_chunk(key)
        churn(cache, 10, chunks=1)
        assert cache.lookup(doc) == CHUNK
        assert store.stats().tier("dram").pinned_chunks == 1


def test_dram_only_pin_beyond_the_bound_is_refused(tmp_path: Path) -> None:
    """With DRAM as the only tier, a pin past pin_fraction of it raises PinRefused naming
    the tier, the bound and the fix, and pins nothing; pin_fraction=0 refuses every pin."""
    with dram_only(tmp_path, 16, pin_fraction=0.25) as store:  # bound: 4 pages
        cache = store.bind("m", LAYOUT)
        small, big = toks(1, 3), toks(2, 2)
        cache.save(small, make_kv(len(small)))
        cache.save(big, make_kv(len(big)))
        assert cache.pin(small) == len(small)
        with pytest.raises(kvtier.PinRefused) as info:
            cache.pin(big)
        text = str(info.value)
        assert "dram" in text and "16384" in text and "pin_fraction=0.25" in text
        assert "KVTIER_PIN_FRACTION" in text and "unpin" in text
        dram = store.stats().tier("dram")
        assert (dram.pinned_chunks, dram.pinned_bytes) == (3, 3 * PAGE)
    with dram_only(tmp_path, 16, pin_fraction=0) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(small, make_kv(len(small)))
        with pytest.raises(kvtier.PinRefused, match="pinning is off"):
            cache.pin(small)


def test_disk_holds_every_pin_dram_what_fits(tmp_path: Path) -> None:
    """Over a disk tier, DRAM holds a pin's head chunks within its bound and the disk tier
    holds all of them; the disk tier's bound refuses a pin that does not fit it."""
    config = make_config(tmp_path, dram_bytes=8 * PAGE, disk_bytes=20 * FILE, pin_fraction=0.5)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        doc, more = toks(1, 6), toks(2, 6)
        cache.save(more, make_kv(len(more)))
        cache.save(doc, make_kv(len(doc)))  # all of it in DRAM
        store.flush()
        assert cache.pin(doc) == len(doc)
        stats = store.stats()
        assert stats.tier("disk").pinned_chunks == 6
        assert stats.tier("dram").pinned_chunks == 4  # 4 pages = half of DRAM
        with pytest.raises(kvtier.PinRefused, match="disk tier"):
            cache.pin(more)  # 12 disk chunks would pass 10 files' worth
        assert store.stats().tier("disk").pinned_chunks == 6
        churn(cache, 30)
        assert cache.lookup(doc) == len(doc)
        store.check_integrity()


def test_shared_head_stays_pinned_until_every_pin_is_gone(tmp_path: Path) -> None:
    """Two pinned prefixes sharing their head: unpinning one keeps the head pinned; pinning
    the same prefix twice is one pin."""
    with dram_only(tmp_path, 16) as store:
        cache = store.bind("m", LAYOUT)
        head = toks(1, 2)
        a, b = head + toks(2, 1), head + toks(3, 1)
        for tokens in (a, b):
            cache.save(tokens, make_kv(len(tokens)))
            cache.pin(tokens)
        cache.pin(a)
        assert store.stats().tier("dram").pinned_chunks == 4
        assert cache.unpin(a) == len(a)
        assert store.stats().tier("dram").pinned_chunks == 3
        churn(cache, 20)
        assert cache.lookup(b) == len(b) and cache.lookup(a) == len(head)
        assert cache.unpin(a) == 0
        assert cache.unpin(b + toks(4, 2)) == len(b)  # the pins of every prefix of it
        assert store.stats().tier("dram").pinned_chunks == 0


def test_pins_persist_across_a_clean_restart(tmp_path: Path) -> None:
    """After close and reopen on the same disk dir, pinned chunks are still held on disk,
    survive eviction, are held in DRAM again once promoted, and can be unpinned."""
    config = make_config(tmp_path, dram_bytes=8 * PAGE, disk_bytes=16 * FILE)
    doc = toks(1, 3)
    kv = make_kv(len(doc))
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(doc, kv)
        cache.pin(doc)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        assert store.stats().tier("disk").pinned_chunks == 3
        churn(cache, 30)
        np.testing.assert_array_equal(cache.load(doc), kv)
        assert store.stats().tier("dram").pinned_chunks == 3  # promoted, held there too
        assert cache.unpin(doc) == len(doc)
        churn(cache, 30, seed=5000)
        assert cache.lookup(doc) == 0
    with kvtier.Store(config) as store:
        assert store.stats().tier("disk").pinned_chunks == 0


PINNER = """
import sys, time
import numpy as np
import kvtier
from tests.conftest import CHUNK, LAYOUT, make_kv

store = kvtier.Store(kvtier.StoreConfig(
    chunk_tokens=CHUNK, dram_bytes=8 * 4096, disk_dir=sys.argv[1], disk_bytes=16 * 4608))
cache = store.bind("m", LAYOUT)
doc = list(range(3 * CHUNK))
cache.save(doc, make_kv(len(doc)))
print(cache.pin(doc), flush=True)
time.sleep(60)
"""


def test_pinned_chunks_survive_a_reopen_with_a_smaller_disk(tmp_path: Path) -> None:
    """Reopened with disk_bytes too small for every chunk, the disk tier keeps the pinned
    ones (held again before it is trimmed), though they are the least recently used (the
    recency journal lost, as after kill -9: the oldest files)."""
    doc = toks(1, 2)
    kv = make_kv(len(doc))
    with kvtier.Store(make_config(tmp_path, dram_bytes=None)) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(doc, kv)
        assert cache.pin(doc) == len(doc)
        churn(cache, 6)
        doc_keys = cache.keys(doc)
    root = tmp_path / "disk" / "kvtier-v1"
    (root / "RECENCY").unlink()
    for key in doc_keys:
        os.utime(root / key.hex()[:2] / f"{key.hex()}.kv", ns=(10**9, 10**9))
    small = make_config(tmp_path, dram_bytes=None, disk_bytes=4 * FILE)
    with kvtier.Store(small) as store:
        cache = store.bind("m", LAYOUT)
        np.testing.assert_array_equal(cache.load(doc), kv)
        disk = store.stats().tier("disk")
        assert (disk.chunks, disk.pinned_chunks) == (4, 2)
        store.check_integrity()


def test_pins_survive_kill_9(tmp_path: Path) -> None:
    """A pin that returned survives SIGKILL of its process: the reopened disk tier holds it
    against eviction."""
    disk = tmp_path / "disk"
    proc = subprocess.Popen(
        [sys.executable, "-c", PINNER, str(disk)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == str(3 * CHUNK)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    config = make_config(tmp_path, dram_bytes=8 * PAGE, disk_bytes=16 * FILE)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        doc = list(range(3 * CHUNK))
        assert store.stats().tier("disk").pinned_chunks == 3
        churn(cache, 30)
        np.testing.assert_array_equal(cache.load(doc), make_kv(len(doc)))
        store.check_integrity()


def test_a_torn_pins_journal_keeps_the_whole_records(tmp_path: Path) -> None:
    """Bytes of a record torn mid-append are ignored; the pins before it are kept."""
    config = make_config(tmp_path)
    doc = toks(1, 2)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        cache.save(doc, make_kv(len(doc)))
        cache.pin(doc)
    journal = tmp_path / "disk" / "kvtier-v1" / "pins"
    with open(journal, "ab") as f:
        f.write(b"\x30\x00\x00\x00garbage")  # a frame cut short
    with kvtier.Store(config) as store:
        assert store.stats().tier("disk").pinned_chunks == 2


def test_an_unusable_pins_journal_is_a_clear_error(tmp_path: Path) -> None:
    """A pins journal that cannot be opened is a ConfigError naming it, and the store's
    tiers are released (the disk dir opens once it is fixed)."""
    journal = tmp_path / "disk" / "kvtier-v1" / "pins"
    journal.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(kvtier.ConfigError, match="pins journal"):
        kvtier.Store(make_config(tmp_path))
    journal.rmdir()
    kvtier.Store(make_config(tmp_path)).close()


def test_a_pin_whose_record_cannot_be_written_leaves_nothing_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the journal append fails (disk full), the pin raises and no tier keeps a hold
    that no record would ever release."""
    with kvtier.Store(make_config(tmp_path)) as store:
        cache = store.bind("m", LAYOUT)
        doc = toks(1, 2)
        cache.save(doc, make_kv(len(doc)))

        def full(self: Journal, record: bytes) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Journal, "append", full)
        with pytest.raises(OSError):
            cache.pin(doc)
        stats = store.stats()
        assert stats.tier("dram").pinned_chunks == stats.tier("disk").pinned_chunks == 0


def test_an_unpin_between_the_check_and_the_hold_of_a_promotion_leaves_no_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pinned chunk promoted into DRAM while its pin is removed: however the promotion's
    check of the registry and its hold interleave with the unpin, no chunk stays held
    without a pin."""
    config = make_config(tmp_path, dram_bytes=8 * PAGE, disk_bytes=16 * FILE, pin_fraction=0.5)
    with kvtier.Store(config) as store:
        cache = store.bind("m", LAYOUT)
        doc = toks(1, 5)
        cache.save(doc, make_kv(len(doc)))
        store.flush()
        assert cache.pin(doc) == len(doc)  # DRAM holds the head 4 (its bound), disk all 5
        churn(cache, 10)
        last = cache.keys(doc)[-1]
        assert store.locate([last]).tiers == ("disk",)
        checked, go = threading.Event(), threading.Event()
        pinned = store._pins.pinned

        def slow_pinned(key: bytes) -> bool:
            """The promotion pauses right after it first finds its chunk pinned."""
            answer = pinned(key)
            if key == last and answer and not checked.is_set():
                checked.set()
                go.wait(10)
            return answer

        monkeypatch.setattr(store._pins, "pinned", slow_pinned)
        got: list[object] = []
        promote = threading.Thread(
            target=lambda: got.append(store.acquire_chunk(last, cache.chunk_bytes))
        )
        promote.start()
        assert checked.wait(10)
        unpin = threading.Thread(target=cache.unpin, args=(doc,))
        unpin.start()
        unpin.join(1)  # done, unless a fix makes it wait for the promotion's hold
        go.set()
        promote.join(10)
        unpin.join(10)
        assert got and got[0] is not None  # promoted from disk, pinned for this reader
        store.release_chunk(last)
        assert len(store._pins) == 0
        stats = store.stats()
        assert stats.tier("dram").pinned_chunks == stats.tier("disk").pinned_chunks == 0
        store.check_integrity()
