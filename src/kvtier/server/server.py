"""The cache server: an asyncio service over a normal kvtier Store (same DRAM and disk tiers).

Each connection receives frames with a BufferedProtocol straight into a pre-allocated header
buffer and a reused body buffer. GET sends pinned DRAM views of the chunks (no copy) and keeps
them pinned until the transport has drained; PUT copies the received body into the Store.
Frames of one connection are handled in order; a malformed frame closes only that connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from kvtier.errors import ProtocolError
from kvtier.keys import KEY_BYTES, Key
from kvtier.server.auth import Auth, tenant_key
from kvtier.server.protocol import (
    COUNT,
    HEADER_BYTES,
    SIZE,
    Header,
    Limits,
    Op,
    Status,
    check_request,
    pack_header,
    parse_header,
    split_keys,
    unpack_sizes,
)
from kvtier.store import Store

log = logging.getLogger("kvtier.server")


class CacheServer:
    """Serves one Store to many connections; the owner closes the Store after `stop()`."""

    def __init__(
        self, store: Store, auth: Auth | None = None, limits: Limits | None = None
    ) -> None:
        self.store = store
        self.auth = auth or Auth()
        self.limits = limits or Limits()
        self.counters: Counter[str] = Counter()
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="kvtier-serve")
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Transport] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, backlog=1024
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stop listening, drop every connection, wait for running handlers."""
        if self._server is not None:
            self._server.close()
        for transport in list(self._connections):
            transport.abort()
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    # -- store operations (run in the executor) --------------------------------------------

    def acquire(self, keys: list[Key], sizes: list[int]) -> list[memoryview | None]:
        """Pinned views of the chunks present with the expected size; None for misses."""
        views: list[memoryview | None] = []
        try:
            for key, size in zip(keys, sizes, strict=True):
                got = self.store.acquire_chunk(key, size)
                if got is not None and got.view.nbytes != size:
                    self.store.release_chunk(key)
                    got = None
                views.append(None if got is None else got.view)
        except BaseException:
            self.release(keys, views)
            raise
        self.store.touch([k for k, v in zip(keys, views, strict=True) if v is not None])
        return views

    def release(self, keys: list[Key], views: list[memoryview | None]) -> None:
        for key, view in zip(keys, views, strict=False):
            if view is not None:
                self.store.release_chunk(key)

    def put(self, keys: list[Key], data: list[memoryview]) -> bytes:
        for key, view in zip(keys, data, strict=True):
            self.store.write_chunk(key, [view])
        return bytes(self.store.locate([k]).chunks for k in keys)

    def delete(self, keys: list[Key]) -> int:
        return sum(self.store.delete_chunk(key) for key in keys)

    def stats_json(self) -> bytes:
        payload: dict[str, Any] = self.store.stats().as_dict()
        payload["server"] = dict(self.counters)
        return json.dumps(payload).encode()


class Connection(asyncio.BufferedProtocol):
    """One client connection: a frame state machine over a BufferedProtocol."""

    def __init__(self, server: CacheServer) -> None:
        self.server = server
        self.tenant: str | None = "" if server.auth.open else None
        self._header = memoryview(bytearray(HEADER_BYTES))
        self._body = memoryview(bytearray(0))
        self._target = self._header
        self._filled = 0
        self._frame: Header | None = None
        self._transport: asyncio.Transport | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        transport.set_write_buffer_limits(high=0)
        self.server._connections.add(transport)
        self.server.counters["connections_total"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self.server._connections.discard(self._transport)
        self._transport = None
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.server.counters["bytes_in"] += nbytes
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        try:
            if self._frame is None:
                self._on_header()
            else:
                self._on_body()
        except ProtocolError as exc:
            self._fail(Status.ERROR, str(exc))

    def eof_received(self) -> bool:
        return False

    # -- frames ----------------------------------------------------------------------------

    def _on_header(self) -> None:
        header = parse_header(self._header)
        op = check_request(header, self.server.limits)
        if self.tenant is None and op not in (Op.HELLO, Op.PING):
            self._fail(Status.AUTH_REQUIRED, "send HELLO with a token first (KVTIER_REMOTE_TOKEN)")
            return
        self._frame = header
        if header.body_bytes == 0:
            self._on_body()
            return
        if len(self._body) < header.body_bytes:
            self._body = memoryview(bytearray(header.body_bytes))
        self._target, self._filled = self._body[: header.body_bytes], 0

    def _on_body(self) -> None:
        header, body = self._frame, self._target
        assert header is not None
        op = Op(header.opcode)
        self.server.counters[f"requests_{op.name.lower()}"] += 1
        if op in (Op.GET, Op.PUT, Op.DELETE):
            assert self._transport is not None
            self._transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self._run_async(op, header, body))
            task.add_done_callback(self._after_async)
            return
        self._run_sync(op, header, body)
        self._next_frame()

    def _next_frame(self) -> None:
        self._frame, self._target, self._filled = None, self._header, 0

    def _run_sync(self, op: Op, header: Header, body: memoryview) -> None:
        rid = header.request_id
        if op is Op.HELLO:
            tenant = self.server.auth.tenant(str(body, "utf-8", "replace"))
            if tenant is None:
                self.server.counters["auth_failures"] += 1
                self._fail(Status.AUTH_FAILED, "token rejected; check KVTIER_REMOTE_TOKEN", rid)
                return
            self.tenant = tenant
            self._reply(op, rid, [tenant.encode()])
        elif op is Op.PING:
            self._reply(op, rid, [])
        elif op is Op.STATS:
            self._reply(op, rid, [self.server.stats_json()])
        else:
            found = self.server.store.locate(self._keys(header, body)).chunks
            self._reply(op, rid, [COUNT.pack(found)])

    async def _run_async(self, op: Op, header: Header, body: memoryview) -> None:
        keys = self._keys(header, body)
        n, rid = header.key_count, header.request_id
        run = asyncio.get_running_loop().run_in_executor
        ex = self.server.executor
        tail = body[n * KEY_BYTES :]
        if op is Op.GET:
            sizes = unpack_sizes(tail, n)
            self.server.limits.check_sizes(sizes)
            self.server.limits.check_reply(sizes)
            views = await run(ex, self.server.acquire, keys, sizes)
            try:
                flags = bytes(v is not None for v in views)
                found = [v for v in views if v is not None]
                self._reply(op, rid, [flags, *found])
                await self._drained()
            finally:
                self.server.release(keys, views)
        elif op is Op.PUT:
            data = _put_views(tail, n, self.server.limits)
            self._reply(op, rid, [await run(ex, self.server.put, keys, data)])
        else:
            deleted = await run(ex, self.server.delete, keys)
            self._reply(op, rid, [COUNT.pack(deleted)])

    def _after_async(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if self._transport is None or self._transport.is_closing():
            return
        if exc is not None:
            if not isinstance(exc, ProtocolError):
                log.error("request failed: %r", exc)
            self._fail(Status.ERROR, str(exc))
            return
        self._next_frame()
        self._transport.resume_reading()

    def _keys(self, header: Header, body: memoryview) -> list[Key]:
        tenant = self.tenant
        assert tenant is not None
        return [tenant_key(tenant, k) for k in split_keys(body, header.key_count)]

    # -- replies ---------------------------------------------------------------------------

    def _reply(
        self, op: Op, rid: int, parts: list[bytes | memoryview], status: int = Status.OK
    ) -> None:
        """A reply frame (replies carry no keys): header, then `parts` as the payload."""
        transport = self._transport
        if transport is None:
            return
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        head = pack_header(op, rid, 0, size, status)
        first = head + parts[0] if parts and isinstance(parts[0], bytes) else head
        rest = parts[1:] if first is not head else parts
        transport.write(first)
        for part in rest:
            transport.write(part)
        self.server.counters["bytes_out"] += len(head) + size

    def _fail(self, status: Status, message: str, rid: int = 0) -> None:
        """Answer with an error and close this connection (only this one)."""
        self.server.counters["protocol_errors" if status == Status.ERROR else "auth_errors"] += 1
        if self._transport is not None:
            known = self._frame is not None and self._frame.opcode in Op._value2member_map_
            op = Op(self._frame.opcode) if known and self._frame else Op.PING
            self._reply(op, rid, [message.encode()], status)
            self._transport.close()

    async def _drained(self) -> None:
        """Wait until the reply left the process; a client that does not read it within
        `drain_timeout_s` loses its connection, so the chunks it pinned are released."""
        if self._write_paused and self._transport is not None:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._drain, self.server.limits.drain_timeout_s)
            except TimeoutError:
                self.server.counters["drain_timeouts"] += 1
                if self._transport is not None:
                    self._transport.abort()

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)


def _put_views(tail: memoryview, n: int, limits: Limits) -> list[memoryview]:
    """Split a PUT payload into one view per chunk; raises ProtocolError if sizes disagree."""
    sizes = unpack_sizes(tail, n)
    limits.check_sizes(sizes)
    data = tail[n * SIZE.size :]
    if sum(sizes) != data.nbytes:
        raise ProtocolError(f"PUT sizes add up to {sum(sizes)}, payload has {data.nbytes}")
    views, offset = [], 0
    for size in sizes:
        views.append(data[offset : offset + size])
        offset += size
    return views


def run_loop(main: Awaitable[None]) -> None:
    """Run a coroutine on uvloop when installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)  # type: ignore[arg-type]


class ServerThread:
    """A CacheServer on its own event loop thread (tests, benchmarks); `stop()` joins it."""

    def __init__(
        self,
        store: Store,
        auth: Auth | None = None,
        limits: Limits | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.server = CacheServer(store, auth, limits)
        self.host = host
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=run_loop, args=(self._main(port),), name="kvtier-server", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @property
    def url(self) -> str:
        return f"kvtier://{self.host}:{self.port}"

    async def _main(self, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.port = await self.server.start(self.host, port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
