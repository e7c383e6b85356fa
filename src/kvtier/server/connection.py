"""One client connection: a frame state machine over an asyncio BufferedProtocol.

Headers are received into a fixed 24-byte buffer. A small body (keys, sizes, a token) goes
into the connection's own buffer of at most SMALL_BODY_BYTES; a larger one (a PUT's chunks)
into an extent of the server's shared receive budget, taken when its header arrives and given
back once the frame is handled. With no budget free, reading pauses until there is.
GET sends pinned DRAM views of the chunks (no copy; over TLS a piece at a time, `tls.py`) and
keeps them pinned until the transport has drained. A same-host client copies chunks out of
and into the server's shared DRAM file itself (GET_LOCAL, PUT_LOCAL: `local.py`). Frames of
one connection are handled in order; a malformed frame closes only that connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, cast

from kvtier.errors import ProtocolError
from kvtier.keys import KEY_BYTES, Key
from kvtier.protocol import (
    COUNT,
    HEADER_BYTES,
    SIZE,
    TIER_CODES,
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
from kvtier.server.auth import tenant_key
from kvtier.server.budget import Grant
from kvtier.server.local import LocalPath
from kvtier.server.tls import write_paced

if TYPE_CHECKING:
    from kvtier.server.server import CacheServer

log = logging.getLogger("kvtier.server")
SMALL_BODY_BYTES = 128 << 10  # a GET of max_keys keys (96 KiB) fits


class Connection(LocalPath, asyncio.BufferedProtocol):
    """One client connection; `expired()` tells the server's sweep when to drop it. Its
    same-host requests (MAP, GET_LOCAL, RELEASE, PUT_LOCAL, COMMIT) are in `local.py`."""

    def __init__(self, server: CacheServer) -> None:
        self.server: CacheServer = server
        self.tenant: str | None = "" if server.auth.open else None
        self.pending = True  # until a valid HELLO (auth file) or a first valid frame
        self.opened_at = self.last_rx = time.monotonic()
        self._header = memoryview(bytearray(HEADER_BYTES))
        self._small = memoryview(bytearray(0))
        self._grant: Grant | None = None
        self._waiting_since: float | None = None
        self._busy = False  # a request is being handled; reading is paused
        self._target = self._header
        self._filled = 0
        self._frame: Header | None = None
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._peer = ""
        self._started = 0.0  # when the frame being handled was received (perf_counter)
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._pins: Counter[Key] = Counter()  # chunks GET_LOCAL pinned for this client
        self._reserved: dict[Key, memoryview] = {}  # DRAM slots PUT_LOCAL lent, not committed

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self._tls = transport.get_extra_info("ssl_object") is not None  # pauses at size >= high
        transport.set_write_buffer_limits(high=1 if self._tls else 0)
        self.server.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.server.closed(self)
        self.server.budget.cancel(self)
        if not self._busy:
            self._give_back()
        self._wake_drain()
        self._unpin_all()
        self._abort_reserved()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
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

    # -- timeouts --------------------------------------------------------------------------

    def expired(self, now: float) -> str | None:
        """The counter to bump if this connection has outlived a timeout, else None."""
        policy = self.server.policy
        if self.pending:
            late = now - self.opened_at > policy.handshake_timeout_s
            return "handshake_timeouts" if late else None
        if self._waiting_since is not None:
            late = now - self._waiting_since > policy.stall_timeout_s
            return "budget_timeouts" if late else None
        if self._busy:
            return None  # a GET's drain has its own timeout
        if self._frame is not None or self._filled:
            return "stall_timeouts" if now - self.last_rx > policy.stall_timeout_s else None
        return "idle_timeouts" if now - self.last_rx > policy.idle_timeout_s else None

    def drop(self, reason: str) -> None:
        """Close for `reason` (a counter name); a client waiting for budget hears why."""
        self.server.counters[reason] += 1
        self.server.closed(self)  # out of the cap's counts now, not when the loop closes it
        self.server.budget.cancel(self)
        if not self._busy:
            self._give_back()  # its room goes to the next waiter at once
        if reason == "budget_timeouts":
            self._fail(Status.ERROR, "server busy: no receive budget free; retry later")
        elif self._transport is not None:
            self._transport.abort()

    # -- frames ----------------------------------------------------------------------------

    def _on_header(self) -> None:
        header = parse_header(self._header)
        op = check_request(header, self.server.limits)
        if self.tenant is None and op not in (Op.HELLO, Op.PING):
            self._fail(Status.AUTH_REQUIRED, "send HELLO with a token first (KVTIER_REMOTE_TOKEN)")
            return
        if self.tenant is not None and self.pending:
            self._admitted()
        self._frame = header
        size = header.body_bytes
        if size == 0:
            self._on_body()
        elif size <= SMALL_BODY_BYTES:
            if len(self._small) < size:
                self._small = memoryview(bytearray(max(size, 4096)))
            self._target, self._filled = self._small[:size], 0
        else:
            self._want_budget(size)

    def _want_budget(self, size: int) -> None:
        budget = self.server.budget
        if size > budget.capacity_bytes:
            raise ProtocolError(
                f"frame of {size} bytes is larger than the server's receive budget "
                f"({budget.capacity_bytes} bytes): raise kvtier serve --recv-budget"
            )
        grant = budget.take(self, size, self._granted)
        if grant is not None:
            self._grant, self._target, self._filled = grant, grant.view, 0
            return
        self.server.counters["budget_waits"] += 1
        self._waiting_since = time.monotonic()
        assert self._transport is not None
        self._transport.pause_reading()

    def _granted(self, grant: Grant) -> None:
        self._waiting_since = None
        if self._transport is None:
            self.server.budget.give(grant)
            return
        self._grant, self._target, self._filled = grant, grant.view, 0
        self.last_rx = time.monotonic()
        self._transport.resume_reading()

    def _give_back(self) -> None:
        grant, self._grant = self._grant, None
        if grant is not None:
            self.server.budget.give(grant)

    def _admitted(self) -> None:
        self.pending = False
        self.server.admitted(self)

    def _on_body(self) -> None:
        header, body = self._frame, self._target
        assert header is not None and self._transport is not None
        op = Op(header.opcode)
        self.server.counters[f"requests_{op.name.lower()}"] += 1
        self._started = time.perf_counter()
        wait_s = self._hello_wait_s() if op is Op.HELLO else 0.0
        if (
            op in (Op.GET, Op.GET_LOCAL, Op.PUT, Op.PUT_LOCAL, Op.DELETE, Op.PIN, Op.UNPIN)
            or wait_s
        ):
            self._busy = True
            self._transport.pause_reading()
            run = self._run_async(op, header, body, wait_s)
            task = asyncio.get_running_loop().create_task(run)
            task.add_done_callback(self._after_async)
            return
        self._run_sync(op, header, body)
        self._next_frame()

    def _next_frame(self) -> None:
        if self._frame is not None:  # answered: count its time
            self.server.metrics.observe(Op(self._frame.opcode), time.perf_counter() - self._started)
        self._give_back()
        self._frame, self._target, self._filled = None, self._header, 0
        self.last_rx = time.monotonic()

    def _hello_wait_s(self) -> float:
        if self.server.auth.open:
            return 0.0
        return self.server.throttle.wait_s(self._peer, time.monotonic())

    def _hello(self, rid: int, body: memoryview) -> None:
        if self._transport is None:
            return  # timed out while throttled
        tenant = self.server.auth.tenant(str(body, "utf-8", "replace"))
        if tenant is None:
            self.server.counters["auth_failures"] += 1
            self.server.throttle.failed(self._peer, time.monotonic())
            self._fail(Status.AUTH_FAILED, "token rejected; check KVTIER_REMOTE_TOKEN", rid)
            return
        self.tenant = tenant
        if self.pending:
            self._admitted()
        self._reply(Op.HELLO, rid, [tenant.encode()])

    def _run_sync(self, op: Op, header: Header, body: memoryview) -> None:
        rid = header.request_id
        if op is Op.HELLO:
            self._hello(rid, body)
        elif op is Op.PING:
            self._reply(op, rid, [])
        elif op is Op.STATS:
            assert self.tenant is not None
            self._reply(op, rid, [self.server.stats_json(self.tenant)])
        elif op is Op.MAP:
            self._map(rid)
        elif op is Op.RELEASE:
            self._reply(op, rid, [COUNT.pack(self._unpin(self._keys(header, body)))])
        elif op is Op.COMMIT:
            self._reply(op, rid, [COUNT.pack(self._commit(self._keys(header, body)))])
        elif op is Op.LOCATE:
            tiers = self.server.store.locate(self._keys(header, body)).tiers
            self._reply(op, rid, [bytes(TIER_CODES[t] for t in tiers)])
        else:
            found = self.server.store.locate(self._keys(header, body)).chunks
            self._reply(op, rid, [COUNT.pack(found)])

    async def _run_async(self, op: Op, header: Header, body: memoryview, wait_s: float) -> None:
        if op is Op.HELLO:
            await asyncio.sleep(wait_s)  # a throttled peer: check its token later
            self._run_sync(op, header, body)
            return
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
                if None in views:
                    await run(ex, self.server.copy_misses, keys, sizes, views)
                flags = bytes(v is not None for v in views)
                found = [v for v in views if v is not None]
                if self._tls:  # TLS copies what it is given: hand it a piece at a time
                    size = len(flags) + sum(v.nbytes for v in found)
                    self.server.counters["bytes_out"] += HEADER_BYTES + size
                    head = memoryview(pack_header(op, rid, 0, size) + flags)
                    deadline = self._drain_deadline()
                    await write_paced(self._transport, [head, *found], self._drained, deadline)
                else:
                    self._reply(op, rid, [flags, *found])
                    await self._drained(self._drain_deadline())
            finally:
                self.server.release(keys, views)
        elif op is Op.GET_LOCAL:
            self._reply(op, rid, [await self._get_local(keys, unpack_sizes(tail, n))])
        elif op is Op.PUT_LOCAL:
            await self._put_local(rid, keys, unpack_sizes(tail, n))
        elif op is Op.PUT:
            data = _put_views(tail, n, self.server.limits)
            self._reply(op, rid, [await run(ex, self.server.put, keys, data)])
        elif op in (Op.PIN, Op.UNPIN):  # a pin waits for the keys' writes and an fsync
            self._reply(op, rid, [await run(ex, self.server.pin, keys, op is Op.PIN)])
        else:
            deleted = await run(ex, self.server.delete, keys)
            self._reply(op, rid, [COUNT.pack(deleted)])

    def _after_async(self, task: asyncio.Task[None]) -> None:
        self._busy = False
        exc = None if task.cancelled() else task.exception()
        if self._transport is None or self._transport.is_closing():
            self._give_back()
            return
        if exc is not None:
            if not isinstance(exc, ProtocolError):
                log.error("request failed: %r", exc)
            self._give_back()
            self._fail(Status.ERROR, str(exc))
            return
        self._next_frame()
        self._transport.resume_reading()

    def _keys(self, header: Header, body: memoryview) -> list[Key]:
        tenant = self.tenant
        assert tenant is not None
        keys = split_keys(body, header.key_count)
        if not self.server.namespaced:
            return keys
        return [tenant_key(tenant, k) for k in keys]

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

    def _drain_deadline(self) -> float:
        """When a reply written now must have left the process (event loop time)."""
        return asyncio.get_running_loop().time() + self.server.limits.drain_timeout_s

    async def _drained(self, deadline: float) -> None:
        """Wait until what was written left the process; a client that has not read the
        reply by `deadline` (`_drain_deadline()` when the reply began: `drain_timeout_s` for
        the whole reply, however it is written) loses its connection, so the chunks it pinned
        are released."""
        if self._write_paused and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._drain = loop.create_future()
            try:  # a deadline already past times out at once
                await asyncio.wait_for(self._drain, deadline - loop.time())
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
