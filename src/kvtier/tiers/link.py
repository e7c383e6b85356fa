"""The sockets to one `kvtier serve` node: framing, an idle pool, reconnection with backoff.

Requests go out with `sendmsg([header, payload views])` (over TLS, which has no `sendmsg`:
small parts joined, large ones sent as they are; `tls.py`); replies are received with
`recv_into` straight into the caller's views. A server that cannot be reached or does not
answer is retried with exponential backoff; an error reply (the server refused one request)
closes that connection only, without backoff; a TLS mismatch (`TLSError`) backs off. A
pooled connection the server has closed (idle timeout) is noticed before it is used and
replaced, without backoff.

A server that may come back elsewhere (the node-local process, restarted on another port with
another token) is given `locate`: whenever the link backs off (the token rejected included),
a thread of its own asks `locate` where the server is now (which may start it); if it moved,
the next attempt goes there at once.

Same host: a link to a server on a loopback address asks MAP on each new connection and, if
the DRAM file it names can be mapped read-only (`shm.py`), attaches that mapping to the
connection (one mapping per server process; a restarted server has a new file). A server that
refuses MAP, or a file that cannot be mapped, is not asked again; nor is one that refuses
PUT_LOCAL asked that again.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from kvtier.config import Endpoint, is_loopback
from kvtier.errors import AuthError, KvtierError, ProtocolError, TLSError
from kvtier.keys import Key
from kvtier.pool import SharedFile
from kvtier.protocol import (
    HEADER_BYTES,
    LIMITS,
    Header,
    Op,
    Status,
    pack_header,
    parse_header,
)
from kvtier.tiers import tls
from kvtier.tiers.shm import SharedMapping, parse_map_reply

log = logging.getLogger("kvtier.remote")
IDLE_SOCKETS = 8
IOV_MAX = 512
BACKOFF_S = (1.0, 30.0)  # first wait after a failure, doubling up to the second
FAILURES = (OSError, KvtierError)


class Unavailable(KvtierError):
    """The server is down or backing off; the caller treats this as a miss."""


class Refused(ProtocolError):
    """The server answered one request with an error (and closes that connection unless the
    status is UNSUPPORTED): it is up, so this is no reason to back off."""

    def __init__(self, message: str, status: int = Status.ERROR) -> None:
        super().__init__(message)
        self.status = status


def send_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """`sendmsg` every part (gather I/O), continuing after partial sends."""
    views = [memoryview(p).cast("B") for p in parts]
    if isinstance(sock, ssl.SSLSocket):
        tls.send_parts(sock, views)
        return
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if sent:
            views[0] = views[0][sent:]


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket with `recv_into`; raises ConnectionError on EOF."""
    view = view.cast("B")
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("the server closed the connection")
        view = view[n:]


class Connection:
    """One blocking socket to one server; used by one thread at a time."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self._rid = 0
        self._head = memoryview(bytearray(HEADER_BYTES))
        self._timeout_s = sock.gettimeout()
        self.mapping: SharedMapping | None = None  # the server's DRAM file, when mapped
        self._unread: list[tuple[Op, int]] = []  # requests sent whose replies are not read
        self.generation = 0  # its link's, when it connected (`ServerLink.locate`)

    def waiting(self, timeout_s: float) -> Connection:
        """Let each following send/recv wait at most `timeout_s`; returns self."""
        if timeout_s != self._timeout_s:
            self.sock.settimeout(timeout_s)
            self._timeout_s = timeout_s
        return self

    def send(self, op: Op, keys: Sequence[Key], payload: Sequence[bytes | memoryview]) -> int:
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        size = sum(memoryview(p).nbytes for p in payload)
        send_all(self.sock, [pack_header(op, self._rid, len(keys), size), *keys, *payload])
        return self._rid

    def reply(self, op: Op, rid: int) -> Header:
        """The next reply header; raises ProtocolError / AuthError for an error reply."""
        recv_exact(self.sock, self._head)
        header = parse_header(self._head)
        if header.status != Status.OK:
            message = self.recv_bytes(min(header.payload_bytes, 4096)).decode(errors="replace")
            if header.status in (Status.AUTH_FAILED, Status.AUTH_REQUIRED):
                raise AuthError(f"token rejected by server {self.where}; check KVTIER_REMOTE_TOKEN")
            if header.status == Status.TLS_REQUIRED:
                raise TLSError(f"server {self.where} speaks TLS: use kvtiers://{self.where}")
            text = f"server {self.where} answered {_status_name(header)}: {message}"
            if header.status in (Status.ERROR, Status.UNSUPPORTED):
                raise Refused(text, header.status)
            raise ProtocolError(text)  # a status we do not know: not a server to trust
        if header.opcode != op or header.request_id != rid:
            raise ProtocolError(f"server {self.where} answered out of order")
        if header.payload_bytes > LIMITS.max_frame_bytes:
            raise ProtocolError(f"server {self.where} sent a {header.payload_bytes}-byte reply")
        return header

    def call(self, op: Op, keys: Sequence[Key], payload: Sequence[bytes | memoryview]) -> Header:
        return self.reply(op, self.send(op, keys, payload))

    def recv_bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        recv_exact(self.sock, memoryview(buf))
        return bytes(buf)

    def send_unread(self, op: Op, keys: Sequence[Key], payload: Sequence[bytes]) -> None:
        """Send a request whose reply is read (and checked) only by `settle`, before the
        connection is next used: a RELEASE need not wait for its round trip."""
        self._unread.append((op, self.send(op, keys, payload)))

    def settle(self) -> None:
        """Read the replies of requests sent with `send_unread`; raises like `reply`."""
        unread, self._unread = self._unread, []
        for op, rid in unread:
            self.recv_bytes(self.reply(op, rid).payload_bytes)

    def closed_by_peer(self) -> bool:
        """An idle connection with something to read has been closed (or garbled) by the
        server, e.g. after its idle timeout: not worth a request."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


def _status_name(header: Header) -> str:
    known = header.status in Status._value2member_map_
    return Status(header.status).name if known else f"unknown status {header.status}"


class ServerLink:
    """The sockets to one server: an idle pool, reconnection with exponential backoff."""

    def __init__(
        self,
        endpoint: Endpoint,
        token: str,
        reply_timeout_s: float,
        local_map: bool = True,
        tls_context: ssl.SSLContext | None = None,
        locate: Callable[[], tuple[Endpoint, str]] | None = None,
    ) -> None:
        """`tls_context`: speak TLS to this server (`kvtiers://`), verified by that context.
        `locate`: where the server is now, and its token (see the module's docstring)."""
        self.endpoint = endpoint
        self.where = f"{endpoint.host}:{endpoint.port}"
        self._token = token
        self._locate = locate
        self._locating = False
        self._tls = tls_context
        self._timeout_s = reply_timeout_s
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._retry_at = 0.0
        self._backoff_s = BACKOFF_S[0]
        self._local_map = local_map
        self._map_wanted = local_map and is_loopback(endpoint.host)
        self._generation = 0  # one more each time `locate` moves the link to another server
        self._mapping: SharedMapping | None = None
        self.local_writes = True  # until the server refuses PUT_LOCAL (or its slot can't map)
        self.locates = True  # until the server refuses LOCATE

    @property
    def mapped(self) -> bool:
        """Whether this server's DRAM file is mapped here (it is on this host)."""
        return self._mapping is not None

    @property
    def writes_in_place(self) -> bool:
        """Whether puts go PUT_LOCAL: copied into the server's mapped DRAM file."""
        return self.local_writes and self.mapped

    def take(self) -> Connection:
        """An idle or new connection; raises Unavailable while backing off or when the
        server cannot be reached, AuthError when it rejects the token, TLSError when client
        and server disagree on TLS (or its certificate is not trusted)."""
        while (idle := self._idle_connection()) is not None:
            if self._usable(idle):
                return idle
            idle.close()
        with self._lock:
            if time.monotonic() < self._retry_at:
                raise Unavailable(f"server {self.where} is backing off")
        conn = self._connect()
        return self._mapped(conn) if self._map_wanted else conn

    def _usable(self, idle: Connection) -> bool:
        """An idle connection whose unread replies were all good and that the server has
        not closed since."""
        try:
            idle.waiting(self._timeout_s).settle()
        except FAILURES:
            return False
        return not idle.closed_by_peer()

    def _connect(self) -> Connection:
        with self._lock:
            endpoint, where, token = self.endpoint, self.where, self._token
            generation = self._generation
        try:
            sock = socket.create_connection(endpoint, timeout=self._timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = tls.handshake(self._tls, sock, endpoint.host, where)
        except TLSError:
            self._down(generation)
            raise
        except OSError as exc:
            self._down(generation)
            raise Unavailable(f"cannot connect to {where}: {exc}") from exc
        conn = Connection(sock, where)
        conn.generation = generation
        try:
            header = conn.call(Op.HELLO, [], [token.encode()])
            conn.recv_bytes(header.payload_bytes)
        except (AuthError, TLSError):
            self.broken(conn)  # with `locate`, also looked for elsewhere
            raise
        except FAILURES as exc:
            self.broken(conn, exc)
            raise Unavailable(f"server {self.where} failed the handshake: {exc}") from exc
        return conn

    def _relocate(self) -> None:
        """With `locate`, find the server again in a thread of its own (once at a time)."""
        if self._locate is None:
            return
        with self._lock:
            if self._locating:
                return
            self._locating = True
        threading.Thread(target=self._relocated, name="kvtier-locate", daemon=True).start()

    def _relocated(self) -> None:
        assert self._locate is not None
        try:
            endpoint, token = self._locate()
        except Exception as exc:  # logged; the next failed connection asks again
            log.warning("kvtier remote tier: cannot find server %s again: %s", self.where, exc)
            with self._lock:
                self._locating = False
            return
        with self._lock:
            self._locating = False
            if (endpoint, token) == (self.endpoint, self._token):
                return  # where it was: down or hung, so the backoff stands
            self.endpoint, self._token = endpoint, token
            self.where = f"{endpoint.host}:{endpoint.port}"
            self._retry_at, self._backoff_s = 0.0, BACKOFF_S[0]  # try it at once
            # Another server: what was learnt of the old one (its DRAM file, the requests
            # it refused) is not this one's, and failures of the old one's sockets are not
            # this one's to back off for.
            self._generation += 1
            idle, self._idle = self._idle, []
            self._mapping = None
            self._map_wanted = self._local_map and is_loopback(endpoint.host)
            self.local_writes = self.locates = True
        for conn in idle:
            conn.close()
        log.warning("kvtier remote tier: the server is at %s now", self.where)

    def _mapped(self, conn: Connection) -> Connection:
        """Ask MAP on a new connection and attach the server's DRAM file, mapped; a server
        that refuses (or whose file cannot be mapped) is not asked again."""
        try:
            header = conn.call(Op.MAP, [], [])
            shared = parse_map_reply(conn.recv_bytes(header.payload_bytes))
        except Refused as exc:
            self._unwanted(conn.generation)
            if exc.status == Status.UNSUPPORTED:
                return conn
            conn.close()  # a server without MAP closes the connection on its opcode
            return self._connect()
        except FAILURES as exc:
            self.broken(conn, exc)
            raise Unavailable(f"server {self.where} failed MAP: {exc}") from exc
        conn.mapping = self._mapping_of(shared, conn.generation)
        return conn

    def _unwanted(self, generation: int) -> None:
        """MAP is not asked of this server again (unless the link has moved on since)."""
        with self._lock:
            if generation == self._generation:
                self._map_wanted = False

    def _mapping_of(self, shared: SharedFile, generation: int) -> SharedMapping | None:
        """The mapping of `shared` (one per server process: a restarted server has a new
        file), or None when it cannot be mapped here."""
        with self._lock:
            current = self._mapping
        if current is not None and current.shared == shared:
            return current
        try:
            mapping = SharedMapping(shared)
        except OSError as exc:
            log.warning(
                "kvtier remote tier: cannot map the DRAM file of %s (%s); loading over TCP",
                self.where,
                exc,
            )
            self._unwanted(generation)
            return None
        with self._lock:
            if generation == self._generation:  # the link's server's, not a former one's
                self._mapping = mapping
        return mapping

    def _idle_connection(self) -> Connection | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def give(self, conn: Connection) -> None:
        """Pool a connection after a complete exchange: the server answers, so the next
        failure backs off from the shortest wait again."""
        with self._lock:
            if conn.generation != self._generation:  # to a server the link has left
                conn.close()
                return
            self._backoff_s = BACKOFF_S[0]
            if len(self._idle) < IDLE_SOCKETS:
                self._idle.append(conn)
                return
        conn.close()

    def broken(self, conn: Connection, exc: BaseException | None = None) -> None:
        """Close a connection that failed; unless the server merely refused the request
        (`Refused`), drop the idle ones too and back off."""
        conn.close()
        if not isinstance(exc, Refused):
            self._down(conn.generation)

    def _down(self, generation: int) -> None:
        """Back off after a failure of the server of `generation` (none if the link has
        moved on since)."""
        with self._lock:
            if generation != self._generation:
                return
            idle, self._idle = self._idle, []
            self._retry_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_S[1])
        for conn in idle:
            conn.close()
        self._relocate()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
