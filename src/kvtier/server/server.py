"""The cache server: an asyncio service over a normal kvtier Store (same DRAM and disk tiers).

The server accepts connections itself (`listener.py`), admits them under a connection cap with
head-room for logged-in clients, sweeps out those past a timeout (`admission.py`), and lends
every connection receive memory from one shared budget (`budget.py`); each connection is a
frame state machine (`connection.py`). With TLS (`tls.py`) a socket still in its handshake
counts as pending: it is evicted for a newcomer like one that has not sent HELLO yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvtier.errors import PinRefused
from kvtier.keys import Key
from kvtier.protocol import COUNT, Limits
from kvtier.server.admission import AuthThrottle, ServerPolicy
from kvtier.server.auth import Auth
from kvtier.server.budget import RecvBudget
from kvtier.server.connection import Connection
from kvtier.server.listener import Listener, listen
from kvtier.server.metrics import ServerMetrics
from kvtier.server.tls import starts_tls
from kvtier.store import Store

log = logging.getLogger("kvtier.server")


class CacheServer:
    """Serves one Store to many connections; the owner closes the Store after `stop()`."""

    def __init__(
        self,
        store: Store,
        auth: Auth | None = None,
        limits: Limits | None = None,
        policy: ServerPolicy | None = None,
        local_writes: bool = False,
        tls: ssl.SSLContext | None = None,
        namespaced: bool = True,
    ) -> None:
        """`local_writes`: same-host clients may write new chunks straight into the shared
        DRAM file (PUT_LOCAL); for a server whose clients are the owner's own processes.
        `tls`: speak TLS on every connection, with this server-side context.
        `namespaced=False`: keys are taken as clients send them, not put in their tenant's
        namespace; for a server with one tenant that fronts for its clients (the node-local
        process), so that its tiers hold the keys an engine without it would use."""
        self.store = store
        self.local_writes = local_writes
        self.namespaced = namespaced
        self.tls = tls
        self.auth = auth or Auth()
        self.limits = limits or Limits()
        self.policy = policy or ServerPolicy()
        self.counters: Counter[str] = Counter()
        self.metrics = ServerMetrics(self.store, self.counters)
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="kvtier-serve")
        self.budget = RecvBudget(self.policy.recv_budget_bytes)
        self.throttle = AuthThrottle(self.policy.auth_delay_s)
        self._listener: Listener | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: dict[Connection, None] = {}
        self._pending: dict[Connection, None] = {}  # oldest first
        self._opening = 0  # accepted sockets whose Connection is not made yet
        self._handshakes: dict[asyncio.Task[Any], None] = {}  # the same with TLS; oldest first

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the bound port."""
        self._listener = Listener(
            listen(host, port), self._accepted, self._accept_failed, self._can_accept
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self._listener.port

    async def stop(self) -> None:
        """Stop listening, drop every connection, wait for running handlers."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._handshakes):
            task.cancel()
        for conn in list(self._connections):
            conn.drop("connections_stopped")
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        self.budget.close()

    @property
    def connections(self) -> int:
        return len(self._connections) + self._opening + len(self._handshakes)

    # -- admission (event loop) ------------------------------------------------------------

    def _can_accept(self) -> bool:
        """False while the next socket could only be refused for want of a pending
        connection to drop, but sockets still being set up will become droppable soon."""
        crowded = self._crowded()
        return not (crowded and not self._pending and not self._handshakes and self._opening)

    def _crowded(self) -> bool:
        opening = self._opening + len(self._handshakes)
        over_quota = len(self._pending) + opening >= self.policy.max_pending
        return over_quota or self.connections >= self.policy.max_connections

    def _accepted(self, sock: socket.socket) -> None:
        """A new socket: make room by dropping the oldest pending connection when pending
        ones (sockets still being set up included) fill their half, or the cap is reached;
        refuse it when the cap is reached and nothing is pending."""
        if self._crowded() and self._pending:
            next(iter(self._pending)).drop("pending_evicted")
        elif self._crowded() and self._handshakes:
            oldest = next(iter(self._handshakes))
            del self._handshakes[oldest]
            oldest.cancel()
            self.counters["pending_evicted"] += 1
        elif self.connections >= self.policy.max_connections:
            self.counters["connections_refused"] += 1
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small writes
        loop = asyncio.get_running_loop()
        task: asyncio.Task[Any]
        if self.tls is None:
            self._opening += 1
            task = loop.create_task(loop.connect_accepted_socket(lambda: Connection(self), sock))
        else:
            task = loop.create_task(self._open_tls(sock, self.tls))
            self._handshakes[task] = None
        task.add_done_callback(lambda t: self._connected(t, sock))

    async def _open_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """A TLS Connection on a new socket: its first byte and its handshake within the
        handshake timeout; a client that starts in plaintext is told to use kvtiers://."""
        timeout_s = self.policy.handshake_timeout_s
        loop = asyncio.get_running_loop()

        async def handshake() -> None:
            if not await starts_tls(sock):
                self.counters["tls_required"] += 1
                raise ConnectionRefusedError("a plaintext client on a TLS server")
            await loop.connect_accepted_socket(
                lambda: Connection(self), sock, ssl=context, ssl_handshake_timeout=timeout_s
            )

        try:
            await asyncio.wait_for(handshake(), timeout_s)
        except TimeoutError:
            self.counters["handshake_timeouts"] += 1
            raise
        except ssl.SSLError:
            self.counters["tls_handshake_failures"] += 1
            raise

    def _connected(self, task: asyncio.Task[Any], sock: socket.socket) -> None:
        if self.tls is None:
            self._opening -= 1
        else:
            self._handshakes.pop(task, None)
        if task.cancelled() or task.exception() is not None:
            sock.close()
        if self._listener is not None:
            self._listener.resume()

    def _accept_failed(self, exc: OSError) -> None:
        self.counters["accept_errors"] += 1
        if self.counters["accept_errors"] == 1:
            log.warning("kvtier serve: accept failed (%s); lower --max-connections", exc)

    def opened(self, conn: Connection) -> None:
        self._connections[conn] = None
        self._pending[conn] = None
        self.counters["connections_total"] += 1

    def admitted(self, conn: Connection) -> None:
        self._pending.pop(conn, None)

    def closed(self, conn: Connection) -> None:
        self._connections.pop(conn, None)
        self._pending.pop(conn, None)

    async def _sweep(self) -> None:
        """Drop connections past their handshake, idle or stall timeout."""
        while True:
            await asyncio.sleep(self.policy.sweep_s)
            now = time.monotonic()
            for conn in list(self._connections):
                reason = conn.expired(now)
                if reason is not None:
                    conn.drop(reason)

    # -- store operations (run in the executor) --------------------------------------------

    def acquire(
        self, keys: list[Key], sizes: list[int], promote: bool = True
    ) -> list[memoryview | None]:
        """Pinned views of the chunks present with the expected size; None for misses. With
        `promote=False` only chunks already in DRAM are found, and nothing waits for I/O."""
        views: list[memoryview | None] = []
        try:
            for key, size in zip(keys, sizes, strict=True):
                got = self.store.acquire_chunk(key, size, promote)
                if got is not None and got.view.nbytes != size:
                    self.store.release_chunk(key)
                    got = None
                views.append(None if got is None else got.view)
        except BaseException:
            self.release(keys, views)
            raise
        self.store.touch([k for k, v in zip(keys, views, strict=True) if v is not None])
        return views

    def copy_misses(
        self, keys: list[Key], sizes: list[int], views: list[memoryview | None]
    ) -> None:
        """Fill in, as private copies, the chunks `acquire` found no DRAM room to promote
        (pinned full by the chunks of this very GET, or by others'): read straight from a
        lower tier into a buffer of their own (the rare path: only chunks some tier holds
        get one). `release` leaves such copies alone: DRAM views are over an mmap, never a
        bytearray."""
        for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
            if views[i] is None and self.store.locate([key]).chunks:  # no buffer for a miss
                copy = memoryview(bytearray(size))
                if self.store.read_chunk(key, [copy], promote=False) is not None:
                    views[i] = copy

    def release(self, keys: list[Key], views: list[memoryview | None]) -> None:
        for key, view in zip(keys, views, strict=False):
            if view is not None and not isinstance(view.obj, bytearray):  # not a private copy
                self.store.release_chunk(key)

    def put(self, keys: list[Key], data: list[memoryview]) -> bytes:
        for key, view in zip(keys, data, strict=True):
            self.store.write_chunk(key, [view])
        return bytes(self.store.locate([k]).chunks for k in keys)

    def delete(self, keys: list[Key]) -> int:
        return sum(self.store.delete_chunk(key) for key in keys)

    def pin(self, keys: list[Key], pin: bool) -> bytes:
        """A PIN (or UNPIN) reply: the count, or for a refused pin 0 and the reason."""
        if not pin:
            return COUNT.pack(self.store.unpin_keys(keys))
        try:
            return COUNT.pack(self.store.pin_keys(keys))
        except PinRefused as exc:
            return COUNT.pack(0) + str(exc).encode()

    def stats_json(self, tenant: str) -> bytes:
        """The store's and the server's counters, and the asking tenant's own share of the
        tiers (never another tenant's)."""
        payload: dict[str, Any] = self.store.stats().as_dict()
        payload["server"] = dict(self.counters)
        usage = self.store.usage().get(tenant, {})
        payload["tenant"] = {"name": tenant, **{t: u._asdict() for t, u in usage.items()}}
        return json.dumps(payload).encode()


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
        policy: ServerPolicy | None = None,
        local_writes: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server = CacheServer(store, auth, limits, policy, local_writes, tls)
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
        scheme = "kvtier" if self.server.tls is None else "kvtiers"
        return f"{scheme}://{self.host}:{self.port}"

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
