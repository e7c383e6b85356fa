"""The same-host write path: PUT_LOCAL and COMMIT against a real server that lets its
same-host clients write into its shared DRAM file, the remote tier's `lend` and puts through
it, and `Store.writing` in a client store."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tests.server.test_shm import (
    CHUNK,
    TOKENS,
    RawClient,
    _chunk,
    _dram_bytes,
    _key,
    _serve,
    _store,
)

import kvtier
from kvtier.config import parse_remote
from kvtier.pool import aligned
from kvtier.protocol import COUNT, SIZE, Op, Status
from kvtier.server.auth import Auth, tenant_key
from kvtier.server.server import ServerThread
from kvtier.tiers.remote import RemoteTier


def _writable_server(tmp_path: Path, **kw: object) -> ServerThread:
    path = tmp_path / "auth"
    path.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    store = _store(tmp_path, **kw)  # type: ignore[arg-type]
    return ServerThread(store, auth=Auth.from_file(path), local_writes=True)


@pytest.fixture
def server(tmp_path: Path) -> ServerThread:
    handle = _writable_server(tmp_path)
    yield handle  # type: ignore[misc]
    handle.stop()
    handle.server.store.close()


def _tier(handle: ServerThread, tenant: str = "alice", local_map: bool = True) -> RemoteTier:
    return RemoteTier(parse_remote(handle.url), TOKENS[tenant], local_map=local_map)


def _read(handle: ServerThread, key: bytes, tenant: str = "alice") -> np.ndarray | None:
    """The chunk as a plain GET over the socket (no mapping) returns it."""
    tier = _tier(handle, tenant, local_map=False)
    out = np.zeros(CHUNK, dtype=np.uint8)
    try:
        return out if tier.get_into(key, [memoryview(out)]) else None
    finally:
        tier.close()


def test_lent_slots_filled_in_place_become_chunks(server: ServerThread) -> None:
    """Slots lent for new chunks, filled in the mapping and committed, are read back
    byte-exact by another client over plain GET; a chunk the server holds gets no slot;
    the lower tiers are written too."""
    tier = _tier(server)
    assert tier.put(_key(0), [memoryview(_chunk(0))])  # through PUT_LOCAL already
    assert tier.writes_in_place
    lent = tier.lend([_key(0), _key(1), _key(2)], CHUNK)
    assert lent is not None
    assert lent.slots[0] is None  # held already
    for i in (1, 2):
        slot = lent.slots[i]
        assert slot is not None and not slot.readonly
        slot[:] = _chunk(i).tobytes()
    assert _read(server, _key(1)) is None  # not published before COMMIT
    assert lent.commit() == 2
    for i in range(3):
        got = _read(server, _key(i))
        assert got is not None and np.array_equal(got, _chunk(i)), i
    store = server.server.store
    store.flush()
    assert store.stats().tier("disk").chunks == 3
    assert server.server.counters["local_puts"] == 3
    store.check_integrity()
    tier.close()


def test_aborted_or_abandoned_slots_are_given_back(server: ServerThread, tmp_path: Path) -> None:
    """Slots not committed, because the writer aborted or its process was killed with
    SIGKILL, are given back when the connection closes: nothing is published and the DRAM
    they held is free again."""
    tier = _tier(server)
    lent = tier.lend([_key(3), _key(4)], CHUNK)
    assert lent is not None and all(s is not None for s in lent.slots)
    assert _dram_bytes(server) == 2 * aligned(CHUNK)
    lent.abort()
    _wait_for(lambda: _dram_bytes(server) == 0)
    assert _read(server, _key(3)) is None

    script = (
        "import sys, time\n"
        "from kvtier.config import parse_remote\n"
        "from kvtier.tiers.remote import RemoteTier\n"
        "tier = RemoteTier(parse_remote(sys.argv[1]), sys.argv[2])\n"
        "lent = tier.lend([bytes(16)], int(sys.argv[3]))\n"
        "lent.slots[0][:4] = b'half'\n"
        "print('lent', flush=True)\n"
        "time.sleep(60)\n"
    )
    args = [server.url, TOKENS["alice"], str(CHUNK)]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "lent"
    assert _dram_bytes(server) == aligned(CHUNK)
    proc.kill()
    proc.wait()
    _wait_for(lambda: _dram_bytes(server) == 0)
    assert _read(server, bytes(16)) is None  # the half-written chunk never became one
    server.server.store.check_integrity()
    tier.close()


def test_tenants_write_into_their_own_key_space(server: ServerThread) -> None:
    """A chunk alice wrote in place is hers: bob, with the same key, gets a slot of his own
    and reads back his bytes, alice hers."""
    alice, bob = _tier(server, "alice"), _tier(server, "bob")
    assert alice.put(_key(5), [memoryview(_chunk(5))])
    assert bob.put(_key(5), [memoryview(_chunk(6))])
    a, b = _read(server, _key(5), "alice"), _read(server, _key(5), "bob")
    assert a is not None and np.array_equal(a, _chunk(5))
    assert b is not None and np.array_equal(b, _chunk(6))
    alice.close()
    bob.close()


def test_a_server_that_refuses_same_host_writes_gets_plain_puts(tmp_path: Path) -> None:
    """A server without local writes answers PUT_LOCAL with UNSUPPORTED: the tier stores the
    chunk with a plain PUT on the same connection, lends nothing, and asks no more."""
    handle = _serve(tmp_path, _store(tmp_path))
    tier = _tier(handle)
    assert tier.writes_in_place  # mapped, not asked yet
    assert tier.put(_key(7), [memoryview(_chunk(7))])
    assert not tier.writes_in_place
    assert tier.lend([_key(8)], CHUNK) is None
    got = _read(handle, _key(7))
    assert got is not None and np.array_equal(got, _chunk(7))
    assert handle.server.counters["requests_put_local"] == 1
    assert handle.server.counters["requests_put"] == 1
    assert tier.stats().errors == 0
    tier.close()
    handle.stop()
    handle.server.store.close()


def test_garbage_commits_and_reservations_are_refused(server: ServerThread) -> None:
    """COMMIT of a key never reserved publishes nothing; a PUT_LOCAL whose sizes do not
    match its keys closes that connection only; one over the chunk limit too."""
    raw = RawClient(server)
    header, body = raw.call(Op.COMMIT, [_key(9)])
    assert header.status == Status.OK and COUNT.unpack(body)[0] == 0
    header, body = raw.call(Op.PUT_LOCAL, [_key(9)], SIZE.pack(CHUNK)[:4])
    assert header.status == Status.ERROR
    raw.sock.close()
    raw = RawClient(server)
    header, _ = raw.call(Op.PUT_LOCAL, [_key(9)], SIZE.pack(1 << 40))
    assert header.status == Status.ERROR
    raw.sock.close()
    _wait_for(lambda: _dram_bytes(server) == 0)
    assert _tier(server).put(_key(9), [memoryview(_chunk(9))])  # the server is fine


def test_client_store_writes_in_place_and_gives_back_on_error(server: ServerThread) -> None:
    """A store whose one tier is this server lends its DRAM slots through `writing`: filled
    slots are chunks after the block; an exception inside it publishes none of them;
    `write_chunk` takes the same path (no staging)."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=None, remote=server.url,
                                            remote_token=TOKENS["alice"]))  # fmt: skip
    keys = [_key(10 + i) for i in range(3)]
    with store.writing(keys, CHUNK) as slots:
        assert slots is not None and all(s is not None for s in slots)
        for i, slot in enumerate(slots):
            assert slot is not None
            slot[:] = _chunk(10 + i).tobytes()
    assert store.stats().saved_chunks == 3
    for i, key in enumerate(keys):
        got = _read(server, key)
        assert got is not None and np.array_equal(got, _chunk(10 + i))
    with pytest.raises(RuntimeError), store.writing([_key(20)], CHUNK) as slots:
        assert slots is not None and slots[0] is not None
        slots[0][:] = _chunk(20).tobytes()
        raise RuntimeError("the writer failed halfway")
    _wait_for(lambda: _read(server, _key(20)) is None and _dram_bytes(server) == 3 * aligned(CHUNK))
    with store.writing([keys[0]], CHUNK) as slots:
        assert slots == [None]  # held already
    store.write_chunk(_key(21), [memoryview(_chunk(21))])
    got = _read(server, _key(21))
    assert got is not None and np.array_equal(got, _chunk(21))
    for lending in (store.writing, store.reading):
        with lending([], CHUNK):  # nothing to lend: no request goes out
            pass
    assert server.server.counters["requests_put"] == 0
    assert server.server.counters["protocol_errors"] == 0
    store.close()


def test_a_store_without_in_place_writes_says_so(tmp_path: Path) -> None:
    """`writing` yields None for a store that cannot lend slots (a lower tier only, over a
    socket): callers fall back to `write_chunk`."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=None, disk_dir=tmp_path / "d",
                                            disk_bytes=8 << 20))  # fmt: skip
    with store.writing([_key(1)], CHUNK) as slots:
        assert slots is None
    store.close()


def test_a_dram_store_lends_its_own_slots(tmp_path: Path) -> None:
    """With a DRAM tier, `writing` lends DRAM slots: published on a clean exit (and written
    to disk), given back on an exception."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=8 * CHUNK, disk_dir=tmp_path / "d",
                                            disk_bytes=8 << 20))  # fmt: skip
    with store.writing([_key(1), _key(2)], CHUNK) as slots:
        assert slots is not None
        for i, slot in enumerate(slots, 1):
            assert slot is not None
            slot[:] = _chunk(i).tobytes()
    with pytest.raises(RuntimeError), store.writing([_key(3)], CHUNK) as slots:
        raise RuntimeError("failed")
    store.flush()
    out = np.zeros(CHUNK, dtype=np.uint8)
    for i in (1, 2):
        assert store.read_chunk(_key(i), [memoryview(out)]) == "dram"
        assert np.array_equal(out, _chunk(i))
    assert store.read_chunk(_key(3), [memoryview(out)]) is None
    assert store.stats().tier("disk").chunks == 2
    assert store.stats().saved_chunks == 2
    store.check_integrity()
    store.close()


def _wait_for(condition: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    assert condition(), "condition not met in time"  # type: ignore[operator]


def test_client_store_lends_pinned_views_for_reads(server: ServerThread) -> None:
    """`reading` lends views of the chunks in the server's DRAM file (None for misses, on
    from any chunk the server lacks), pinned until the block ends: a chunk deleted
    meanwhile keeps its bytes for the reader; after the block nothing stays pinned."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=None, remote=server.url,
                                            remote_token=TOKENS["alice"]))  # fmt: skip
    keys = [_key(30 + i) for i in range(3)]
    for i, key in enumerate(keys[:2]):
        store.write_chunk(key, [memoryview(_chunk(30 + i))])
    backing = server.server.store
    with store.reading(keys, CHUNK) as views:
        assert views is not None and views[2] is None
        assert backing.delete_chunk(tenant_key("alice", keys[0]))
        for i in (0, 1):
            view = views[i]
            assert view is not None and not view.readonly  # this client may write there
            assert np.array_equal(np.frombuffer(view, np.uint8), _chunk(30 + i))
        assert _dram_bytes(server) == 2 * aligned(CHUNK)  # the deleted one is still pinned
    _wait_for(lambda: _dram_bytes(server) == aligned(CHUNK))
    backing.check_integrity()
    assert store.stats().tier("remote").hits == 2
    store.close()


def test_a_dram_store_lends_its_own_views(tmp_path: Path) -> None:
    """With a DRAM tier, `reading` lends DRAM hits only (a chunk of another size is a miss),
    released after the block; a store without DRAM or a same-host server yields None."""
    store = kvtier.Store(kvtier.StoreConfig(dram_bytes=8 * CHUNK))
    store.write_chunk(_key(1), [memoryview(_chunk(1))])
    with store.reading([_key(1), _key(2)], CHUNK) as views:
        assert views is not None and views[1] is None and views[0] is not None
        assert np.array_equal(np.frombuffer(views[0], np.uint8), _chunk(1))
    with store.reading([_key(1)], CHUNK // 2) as views:
        assert views == [None]
    store.check_integrity()
    store.close()
    plain = kvtier.Store(kvtier.StoreConfig(dram_bytes=None, disk_dir=tmp_path / "d",
                                            disk_bytes=8 << 20))  # fmt: skip
    with plain.reading([_key(1)], CHUNK) as views:
        assert views is None
    plain.close()


def test_a_reservation_waits_for_the_writes_that_pin_dram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every DRAM chunk pinned by its disk write still under way, PUT_LOCAL waits for
    one to land (as a PUT does) instead of answering "no slot" and dropping the chunk."""
    handle = _writable_server(tmp_path, dram_chunks=4)
    store = handle.server.store
    disk = store._lower[0]
    gate = threading.Event()
    real = disk.put
    monkeypatch.setattr(disk, "put", lambda key, src: gate.wait(30) and real(key, src))
    tier = _tier(handle)
    for i in range(4):
        assert tier.put(_key(i), [memoryview(_chunk(i))])
    stored: list[bool] = []
    writer = threading.Thread(
        target=lambda: stored.append(tier.put(_key(4), [memoryview(_chunk(4))]))
    )
    writer.start()
    time.sleep(0.3)  # the PUT_LOCAL reaches the server, which finds every DRAM chunk pinned
    gate.set()
    writer.join(30)
    assert stored == [True]
    got = _read(handle, _key(4))
    assert got is not None and np.array_equal(got, _chunk(4))
    tier.close()
    handle.stop()
    store.close()
