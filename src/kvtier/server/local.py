"""The same-host fast path of a connection: a client on the server's host maps the server's
shared DRAM file (MAP) and copies chunks out of it and into it itself.

GET_LOCAL pins chunks for the client (it copies them out of the shared DRAM file) until its
RELEASE, or until the connection closes; PUT_LOCAL reserves DRAM slots the client fills in
that file, published by its COMMIT, or given back when the connection closes.

`LocalPath` is a part of `Connection` (its base class); it uses the connection's server,
transport and replies, declared below. What it needs of the server is `LocalServer` (the
`CacheServer`, named by a protocol: this module does not import the server's).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from kvtier.errors import ProtocolError
from kvtier.keys import Key
from kvtier.protocol import MAP_INFO, SIZE, Limits, Op, Status

if TYPE_CHECKING:
    from kvtier.store import Store


class LocalServer(Protocol):
    """What the same-host path uses of its server."""

    store: Store
    limits: Limits
    counters: Counter[str]
    executor: ThreadPoolExecutor
    local_writes: bool

    def acquire(
        self, keys: list[Key], sizes: list[int], promote: bool = True
    ) -> list[memoryview | None]: ...
    def release(self, keys: list[Key], views: list[memoryview | None]) -> None: ...


class LocalPath:
    """The same-host half of `Connection`."""

    server: LocalServer
    _transport: asyncio.Transport | None
    _pins: Counter[Key]  # chunks GET_LOCAL pinned for this client
    _reserved: dict[Key, memoryview]  # DRAM slots PUT_LOCAL lent, not committed

    if TYPE_CHECKING:

        def _reply(
            self, op: Op, rid: int, parts: list[bytes | memoryview], status: int = Status.OK
        ) -> None: ...

    def _map(self, rid: int) -> None:
        shared = self.server.store.shared_dram()
        if shared is None:
            message = "this server's DRAM tier is not in shared memory (kvtier serve --dram-shm)"
            self._reply(Op.MAP, rid, [message.encode()], Status.UNSUPPORTED)
            return
        info = MAP_INFO.pack(shared.capacity_bytes, shared.device, shared.inode)
        self._reply(Op.MAP, rid, [info + shared.path.encode()])

    async def _get_local(self, keys: list[Key], sizes: list[int]) -> bytes:
        """Pin the chunks present for this connection; found flags, then their offsets."""
        store = self.server.store
        if store.shared_dram() is None:
            raise ProtocolError("GET_LOCAL without a shared DRAM tier: ask MAP first")
        self.server.limits.check_sizes(sizes)
        if sum(self._pins.values()) + len(keys) > self.server.limits.max_keys:
            raise ProtocolError(
                f"more than {self.server.limits.max_keys} chunks pinned by one connection: "
                "RELEASE chunks after copying them"
            )
        views = await self._acquire_local(keys, sizes)
        found = [(k, v) for k, v in zip(keys, views, strict=True) if v is not None]
        if self._transport is None:  # closed meanwhile: nobody will release these
            self.server.release(keys, views)
            return b""
        self._pins.update(k for k, _ in found)
        self.server.counters["local_hits"] += len(found)
        offsets = b"".join(SIZE.pack(store.dram_offset(v)) for _, v in found)
        return bytes(v is not None for v in views) + offsets

    async def _acquire_local(self, keys: list[Key], sizes: list[int]) -> list[memoryview | None]:
        """Pin chunks already in DRAM here on the loop (a thread hop costs more than the rest
        of a GET_LOCAL); promote the others from the lower tiers in the executor."""
        views = self.server.acquire(keys, sizes, promote=False)
        rest = [i for i, v in enumerate(views) if v is None]
        if rest:
            run = asyncio.get_running_loop().run_in_executor
            ex, acquire = self.server.executor, self.server.acquire
            try:
                more = await run(ex, acquire, [keys[i] for i in rest], [sizes[i] for i in rest])
            except BaseException:
                self.server.release(keys, views)
                raise
            for i, view in zip(rest, more, strict=True):
                views[i] = view
        return views

    def _unpin(self, keys: list[Key]) -> int:
        """Drop one pin of this connection per key; how many it held."""
        released = 0
        for key in keys:
            if self._pins[key] > 0:
                self._pins[key] -= 1
                self.server.store.release_chunk(key)
                released += 1
            if self._pins[key] == 0:
                del self._pins[key]
        return released

    def _unpin_all(self) -> None:
        pins, self._pins = self._pins, Counter()
        for key, count in pins.items():
            for _ in range(count):
                self.server.store.release_chunk(key)

    async def _put_local(self, rid: int, keys: list[Key], sizes: list[int]) -> None:
        """Reserve a DRAM slot per new chunk and answer flags, then offsets. Reserving waits
        (in the executor) while in-flight lower-tier writes pin every DRAM chunk, as a PUT
        does."""
        store = self.server.store
        if not self.server.local_writes or store.shared_dram() is None:
            message = "this server does not take same-host writes into its DRAM file"
            self._reply(Op.PUT_LOCAL, rid, [message.encode()], Status.UNSUPPORTED)
            return
        self.server.limits.check_sizes(sizes)
        if len(self._reserved) + len(keys) > self.server.limits.max_keys:
            raise ProtocolError(f"more than {self.server.limits.max_keys} slots reserved: COMMIT")
        run = asyncio.get_running_loop().run_in_executor
        slots = await run(self.server.executor, self._reserve, keys, sizes)
        mine = [(k, slot) for k, slot in zip(keys, slots, strict=True) if slot is not None]
        if self._transport is None:  # closed meanwhile: nobody will commit these
            for key, _ in mine:
                store.abort_chunk(key)
            return
        self._reserved.update(mine)
        offsets = b"".join(SIZE.pack(store.dram_offset(slot)) for _, slot in mine)
        flags = bytes(slot is not None for slot in slots)
        self._reply(Op.PUT_LOCAL, rid, [flags + offsets])  # one write: no Nagle wait

    def _reserve(self, keys: list[Key], sizes: list[int]) -> list[memoryview | None]:
        """A slot per key not reserved by this connection already (the executor's side)."""
        store = self.server.store
        slots: list[memoryview | None] = []
        try:
            for key, size in zip(keys, sizes, strict=True):
                # a key twice in one request: the second finds the first's slot held
                slots.append(None if key in self._reserved else store.reserve_chunk(key, size))
        except BaseException:
            for key, slot in zip(keys, slots, strict=False):
                if slot is not None:
                    store.abort_chunk(key)
            raise
        return slots

    def _commit(self, keys: list[Key]) -> int:
        """Publish the reserved slots named; how many were reserved."""
        committed = 0
        for key in keys:
            slot = self._reserved.pop(key, None)
            if slot is not None:
                self.server.store.commit_chunk(key, slot)
                committed += 1
        self.server.counters["local_puts"] += committed
        return committed

    def _abort_reserved(self) -> None:
        reserved, self._reserved = self._reserved, {}
        for key in reserved:
            self.server.store.abort_chunk(key)
