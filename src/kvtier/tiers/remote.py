"""Remote tier: a client of one or more `kvtier serve` nodes (`remote="kvtier://h1:7400,h2:7400"`).

Chunks are placed by rendezvous hashing over the listed servers, so adding a server moves about
1/N of the keys. Each server has a small thread-safe pool of blocking sockets (`link.py`);
requests go out with `sendmsg([header, payload views])` and replies are received with
`recv_into` straight into the caller's views. A server that is down, hung or misbehaving yields
misses (counted as errors) and is retried with exponential backoff; only a rejected token or a
TLS mismatch (`kvtiers://` with TLS, `tls.py`: a server without it, an untrusted certificate)
at construction time raises. Backoff is for a server that cannot be reached or does not answer: a
chunk over the wire limit is refused here before any byte is sent, and an error reply (the
server refused one request) closes that connection only. Connecting, HELLO, EXISTS_PREFIX and
the first reply to a GET wait at most `REPLY_TIMEOUT_S`, so a hung server never stalls a lookup
for long; only moving GET/PUT bodies may take up to `TRANSFER_TIMEOUT_S` (a socket timeout
bounds each send/recv, not the whole body). A pooled connection the server has closed (idle
timeout) is noticed before it is used and replaced, without backoff.

Same host: when a server on a loopback address keeps its DRAM tier in shared memory, each new
connection asks MAP and, if the file it names can be mapped read-only (`shm.py`), loads go
GET_LOCAL (the server pins the chunk and answers its offset) -> memcpy from the mapping ->
RELEASE, instead of the chunk's bytes crossing the socket. A server that refuses MAP, or a file
that cannot be mapped, leaves that server on plain GET. A server that takes same-host writes
gets puts the same way: PUT_LOCAL (it reserves a DRAM slot and answers its offset) -> memcpy
into the mapping -> COMMIT; one that refuses PUT_LOCAL is sent plain PUTs from then on. The
store's in-place writes and reads do either for many chunks at once (`lend`, `borrow`:
`remote_local.py`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import xxhash

from kvtier.config import Endpoint, RemoteURL, parse_remote
from kvtier.errors import AuthError, ConfigError, KvtierError, PinRefused, ProtocolError, TLSError
from kvtier.keys import Key
from kvtier.protocol import COUNT, LIMITS, SIZE, TIER_CODES, Op, Status
from kvtier.tiers.base import Counters, TierStats, Views, copy_views, total_bytes
from kvtier.tiers.link import FAILURES as _FAILURES
from kvtier.tiers.link import Connection, Refused, ServerLink, Unavailable, recv_exact
from kvtier.tiers.remote_local import Borrowed, Lent, local_offsets
from kvtier.tiers.shm import SharedMapping
from kvtier.tiers.tls import client_context

log = logging.getLogger("kvtier.remote")
_TIER_NAMES = {code: name for name, code in TIER_CODES.items()}
REPLY_TIMEOUT_S = 1.0
TRANSFER_TIMEOUT_S = 10.0


def owner(endpoints: Sequence[Endpoint], key: Key) -> int:
    """Index of the server a key lives on (rendezvous / highest-random-weight hashing)."""
    scores = [xxhash.xxh3_64_intdigest(key, seed=_seed(ep)) for ep in endpoints]
    return scores.index(max(scores))


def _seed(endpoint: Endpoint) -> int:
    return xxhash.xxh3_64_intdigest(f"{endpoint.host}:{endpoint.port}".encode())


Locator = Callable[[], tuple[str, str]]  # () -> (kvtier:// URL of one server, its token)


def _endpoint_of(locate: Locator) -> Callable[[], tuple[Endpoint, str]]:
    def find() -> tuple[Endpoint, str]:
        url, token = locate()
        return parse_remote(url).endpoints[0], token

    return find


class RemoteTier:
    """The shared tier over a pool of kvtier servers; thread-safe; never raises on I/O."""

    name = "remote"

    def __init__(
        self,
        url: RemoteURL,
        token: str | None,
        timeout_s: float = REPLY_TIMEOUT_S,
        transfer_timeout_s: float = TRANSFER_TIMEOUT_S,
        local_map: bool = True,
        ca: str | Path | None = None,
        locate: Locator | None = None,
    ) -> None:
        """`local_map`: load from a same-host server's shared DRAM file when it offers one.
        `ca`: for `kvtiers://`, the PEM file of the CA that signed the servers' certificates
        (None: the system's default CAs). `locate`: for a single server that may come back
        elsewhere, its URL and token now (`link.py`)."""
        self.url = url
        self.max_chunk_bytes = LIMITS.max_chunk_bytes
        self._timeout_s = timeout_s
        self._transfer_s = max(timeout_s, transfer_timeout_s)
        tls = client_context(ca) if url.scheme == "kvtiers" else None
        if locate is not None and len(url.endpoints) != 1:
            raise ConfigError("a remote tier that is located again must have one server")
        find = None if locate is None else _endpoint_of(locate)
        self._links = [
            ServerLink(ep, token or "", timeout_s, local_map, tls, find) for ep in url.endpoints
        ]
        self._lock = threading.Lock()
        self._count = Counters()
        try:
            self._connect_all()
        except (AuthError, TLSError):
            self.close()
            raise

    def _connect_all(self) -> None:
        """One pooled connection per server now; AuthError for a rejected token, TLSError
        for a TLS mismatch."""
        for link in self._links:
            try:
                link.give(link.take())
            except Unavailable as exc:
                self._counted(errors=1)
                log.warning("kvtier remote tier: %s; its chunks are misses until it is up", exc)

    # -- the Tier interface ---------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        done = 0
        while done < len(keys):
            batch = keys[done : done + LIMITS.max_keys]
            found = self._exists_prefix(batch)
            done += found
            if found < len(batch):
                break
        return done

    def locate(self, keys: Sequence[Key]) -> tuple[str, ...]:
        """The tier of each leading key present: a same-host server's own tier names (its
        DRAM is as near as ours), "remote" for any other server."""
        link = self._links[0] if len(self._links) == 1 else None
        if link is None or not link.mapped or not link.locates:
            return (self.name,) * self.contains_prefix(keys)
        names: list[str] = []
        while len(names) < len(keys):
            batch = keys[len(names) : len(names) + LIMITS.max_keys]
            found = self._locate(link, batch)
            names += found
            if len(found) < len(batch):
                break
        return tuple(names)

    def _locate(self, link: ServerLink, keys: Sequence[Key]) -> list[str]:
        conn = self._take(link)
        if conn is None:
            return []
        try:
            header = conn.waiting(self._timeout_s).call(Op.LOCATE, keys, [])
            codes = conn.recv_bytes(header.payload_bytes)
            if len(codes) > len(keys) or not set(codes) <= set(_TIER_NAMES):
                raise ProtocolError(f"server {conn.where} sent a garbled LOCATE reply")
        except Refused as exc:
            link.broken(conn, exc)
            link.locates = False  # a server from before LOCATE: ask EXISTS_PREFIX instead
            return [self.name] * self.contains_prefix(keys)
        except _FAILURES as exc:
            link.broken(conn, exc)
            self._counted(errors=1)
            return []
        link.give(conn)
        return [_TIER_NAMES[c] for c in codes]

    def get_into(self, key: Key, dst: Views) -> bool:
        size = total_bytes(dst)
        link = self._link(key)
        conn = self._take(link) if self._fits(size) else None
        if conn is None:
            self._counted(misses=1)
            return False
        try:
            if conn.mapping is not None:
                found = self._get_local(conn, conn.mapping, key, dst)
            else:
                found = self._get(conn, key, dst)
        except _FAILURES as exc:
            link.broken(conn, exc)
            self._counted(misses=1, errors=1)
            return False
        link.give(conn)
        self._counted(hits=int(found), misses=int(not found))
        return found

    def _get(self, conn: Connection, key: Key, dst: Views) -> bool:
        """GET: the chunk's bytes come over the socket straight into `dst`."""
        conn.waiting(self._timeout_s).call(Op.GET, [key], [SIZE.pack(total_bytes(dst))])
        found = conn.waiting(self._transfer_s).recv_bytes(1) == b"\x01"
        if found:
            for view in dst:
                recv_exact(conn.sock, view)
        return found

    def _get_local(self, conn: Connection, mapping: SharedMapping, key: Key, dst: Views) -> bool:
        """GET_LOCAL: copy the chunk out of the server's DRAM file while the server holds it
        pinned for this connection, then RELEASE it (closing the connection on any error
        releases it too). After a miss, EXISTS_PREFIX asks whether the server holds the
        chunk at all (a second round trip, counted as no second miss); if it does, its DRAM
        had no room to promote it (pinned full), and GET gets a copy read straight from its
        lower tiers. The server handles a connection's frames in order, so the next request
        on it comes after the unpin whether or not its reply was read."""
        size = total_bytes(dst)
        header = conn.waiting(self._timeout_s).call(Op.GET_LOCAL, [key], [SIZE.pack(size)])
        reply = conn.recv_bytes(header.payload_bytes)
        if reply == b"\x00":  # absent, or held where no DRAM room was left to promote it
            conn.waiting(self._timeout_s).call(Op.EXISTS_PREFIX, [key], [])
            (held,) = COUNT.unpack(conn.recv_bytes(COUNT.size))
            return bool(held) and self._get(conn, key, dst)  # GET copies it from there
        if len(reply) != 1 + SIZE.size or reply[0] != 1:
            raise ProtocolError(f"server {conn.where} sent a garbled GET_LOCAL reply")
        (offset,) = SIZE.unpack_from(reply, 1)
        try:
            copy_views([mapping.chunk(offset, size)], dst)
        finally:
            conn.send_unread(Op.RELEASE, [key], [])  # its reply is read before the next use
        return True

    def put(self, key: Key, src: Views) -> bool:
        size = total_bytes(src)
        if self.writes_in_place and (lent := self.lend([key], size)) is not None:
            slot = lent.slots[0]  # None: held already, or no room
            if slot is not None:
                copy_views(src, [slot])
            return lent.commit() == 1
        link = self._link(key)
        conn = self._take(link) if self._fits(size) else None
        if conn is None:
            return False
        try:
            conn.waiting(self._transfer_s).call(Op.PUT, [key], [SIZE.pack(size), *src])
            stored = conn.recv_bytes(1) == b"\x01"
        except _FAILURES as exc:
            link.broken(conn, exc)
            self._counted(errors=1)
            return False
        link.give(conn)
        return stored

    @property
    def writes_in_place(self) -> bool:
        """Whether a put is a memcpy into a same-host server's DRAM file (one server, mapped,
        taking writes): the store then writes synchronously instead of staging."""
        return len(self._links) == 1 and self._links[0].writes_in_place

    def lend(self, keys: Sequence[Key], nbytes: int) -> Lent | None:
        """PUT_LOCAL for many chunks at once: writable slots of `nbytes` in a same-host
        server's DRAM file (None for a chunk it holds already or has no room for), to fill
        and then `commit` or `abort`. None when this tier cannot write in place (several
        servers, none on this host, or one that refuses)."""
        if not keys or not self.writes_in_place or not self._fits(nbytes):
            return None
        link = self._links[0]
        conn = self._take(link)
        if conn is None or conn.mapping is None:
            if conn is not None:
                link.give(conn)
            return None
        try:
            waiting = conn.waiting(self._transfer_s)  # the server may wait for DRAM, as for a PUT
            count_error = functools.partial(self._counted, errors=1)
            return Lent(link, waiting, conn.mapping, list(keys), nbytes, count_error)
        except Refused as exc:
            if exc.status == Status.UNSUPPORTED:
                link.local_writes = False
                link.give(conn)
            else:
                link.broken(conn, exc)
        except _FAILURES as exc:
            link.broken(conn, exc)
            self._counted(errors=1)
        return None

    def borrow(self, keys: Sequence[Key], nbytes: int) -> Borrowed | None:
        """GET_LOCAL for many chunks at once: views of `nbytes` in a same-host server's DRAM
        file (None for a chunk it cannot serve), pinned until `Borrowed.release`; writable
        views where this client may write there (no read-only buffer for tensors). None
        when this tier has no such server."""
        if not keys or len(self._links) != 1 or not self._fits(nbytes):
            return None
        link = self._links[0]
        conn = self._take(link)
        if conn is None:
            return None
        if conn.mapping is None:
            link.give(conn)
            return None
        try:
            offsets = local_offsets(conn.waiting(self._timeout_s), Op.GET_LOCAL, keys, nbytes)
            view = conn.mapping.slot if link.writes_in_place else conn.mapping.chunk
            views = [None if at is None else view(at, nbytes) for at in offsets]
        except _FAILURES as exc:
            link.broken(conn, exc)  # closing the connection drops its pins
            self._counted(misses=len(keys), errors=1)
            return None
        found = [k for k, at in zip(keys, offsets, strict=True) if at is not None]
        self._counted(hits=len(found), misses=len(keys) - len(found))
        return Borrowed(views, link, conn, found)

    def touch(self, keys: Sequence[Key]) -> None:
        """Servers keep their own LRU, refreshed by every GET; nothing to send."""

    def pin(self, keys: Sequence[Key]) -> list[Key]:
        """PIN on each server the keys it owns (it pins its stored leading run of them); the
        keys pinned. Raises PinRefused when a server refuses (those that had pinned are sent
        UNPIN), KvtierError when one cannot be asked."""
        done: list[tuple[ServerLink, list[Key]]] = []
        pinned: list[Key] = []
        try:
            for link, keys_of in self._by_server(keys):
                pinned += keys_of[: self._pin_call(link, Op.PIN, keys_of)]
                done.append((link, keys_of))
        except BaseException:
            for link, keys_of in done:
                with contextlib.suppress(KvtierError):  # unreachable now: pinned till unpinned
                    self._pin_call(link, Op.UNPIN, keys_of)
            raise
        return pinned

    def unpin(self, keys: Sequence[Key]) -> int:
        """UNPIN on each server the keys it owns; the longest prefix a server unpinned."""
        return max([0, *(self._pin_call(ln, Op.UNPIN, ks) for ln, ks in self._by_server(keys))])

    def stats(self) -> TierStats:
        fields = ("capacity_bytes", "bytes", "chunks", "pinned_bytes", "pinned_chunks")
        sums = dict.fromkeys(fields, 0)
        for link in self._links:
            for tier in self._server_tiers(link):
                for field in fields:
                    sums[field] += int(tier.get(field, 0))
        with self._lock:
            return self._count.snapshot(self.name, *sums.values())

    def close(self) -> None:
        for link in self._links:
            link.close()

    # -- internals -------------------------------------------------------------------------

    def _link(self, key: Key) -> ServerLink:
        return self._links[owner(self.url.endpoints, key)]

    def _fits(self, size: int) -> bool:
        """A chunk the wire protocol carries; one that is not is an error counted here,
        refused before any connection is touched (the server is not to blame)."""
        if 0 < size <= LIMITS.max_chunk_bytes:
            return True
        self._counted(errors=1)
        return False

    def _take(self, link: ServerLink) -> Connection | None:
        try:
            return link.take()
        except Unavailable as exc:
            self._counted(errors=int(exc.__cause__ is not None))
        except _FAILURES:
            self._counted(errors=1)
        return None

    def _exists_prefix(self, keys: Sequence[Key]) -> int:
        """Leading keys present: one EXISTS_PREFIX per server, all sent before any reply."""
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(owner(self.url.endpoints, key), []).append(i)
        first_missing = len(keys)
        sent: list[tuple[ServerLink, Connection, int, list[int]]] = []
        for server, positions in groups.items():
            link = self._links[server]
            conn = self._take(link)
            if conn is not None:
                try:
                    rid = conn.waiting(self._timeout_s).send(
                        Op.EXISTS_PREFIX, [keys[i] for i in positions], []
                    )
                    sent.append((link, conn, rid, positions))
                    continue
                except _FAILURES as exc:
                    link.broken(conn, exc)
                    self._counted(errors=1)
            first_missing = min(first_missing, positions[0])
        for link, conn, rid, positions in sent:
            try:
                conn.reply(Op.EXISTS_PREFIX, rid)
                (count,) = COUNT.unpack(conn.recv_bytes(COUNT.size))
                link.give(conn)
            except _FAILURES as exc:
                link.broken(conn, exc)
                self._counted(errors=1)
                count = 0
            if count < len(positions):
                first_missing = min(first_missing, positions[count])
        return first_missing

    def _by_server(self, keys: Sequence[Key]) -> list[tuple[ServerLink, list[Key]]]:
        """The keys each server owns, in order, in batches of at most `max_keys`."""
        groups: dict[int, list[Key]] = {}
        for key in keys:
            groups.setdefault(owner(self.url.endpoints, key), []).append(key)
        step = LIMITS.max_keys
        return [
            (self._links[i], ks[at : at + step])
            for i, ks in groups.items()
            for at in range(0, len(ks), step)
        ]

    def _pin_call(self, link: ServerLink, op: Op, keys: list[Key]) -> int:
        """One PIN or UNPIN; its count. Raises PinRefused for a refused pin, KvtierError
        when the server cannot be asked (down, or from before pins)."""
        try:
            conn = link.take()
        except Unavailable as exc:
            raise KvtierError(f"cannot {op.name} on server {link.where}: {exc}; retry") from exc
        try:
            header = conn.waiting(self._transfer_s).call(op, keys, [])
            reply = conn.recv_bytes(header.payload_bytes)
            if len(reply) < COUNT.size:
                raise ProtocolError(f"server {link.where} sent a garbled {op.name} reply")
        except _FAILURES as exc:
            link.broken(conn, exc)
            self._counted(errors=1)
            hint = (
                "; upgrade it (pins need kvtier serve with PIN)" if isinstance(exc, Refused) else ""
            )
            raise KvtierError(f"{op.name} on server {link.where} failed: {exc}{hint}") from exc
        link.give(conn)
        if len(reply) > COUNT.size:
            raise PinRefused(f"server {link.where}: {reply[COUNT.size :].decode(errors='replace')}")
        count: int = COUNT.unpack_from(reply)[0]
        return count

    def _server_tiers(self, link: ServerLink) -> list[dict[str, int]]:
        conn = self._take(link)
        if conn is None:
            return []
        try:
            header = conn.waiting(self._timeout_s).call(Op.STATS, [], [])
            tiers = json.loads(conn.recv_bytes(header.payload_bytes))["tiers"]
        except (*_FAILURES, ValueError, KeyError) as exc:
            link.broken(conn, exc)
            return []
        link.give(conn)
        return list(tiers.values())

    def _counted(self, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._lock:
            self._count.hits += hits
            self._count.misses += misses
            self._count.errors += errors
