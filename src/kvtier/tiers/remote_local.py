"""Chunks moved in place through a same-host server's shared DRAM file, many at a time:
slots it reserved for new chunks (PUT_LOCAL, then COMMIT: `Lent`) and chunks it pinned for
reading (GET_LOCAL, then RELEASE: `Borrowed`), each held on one pooled connection
(`RemoteTier.lend`, `RemoteTier.borrow`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvtier.errors import ProtocolError
from kvtier.keys import Key
from kvtier.protocol import COUNT, SIZE, Op, unpack_sizes
from kvtier.tiers.link import FAILURES, Connection, Refused, ServerLink
from kvtier.tiers.shm import SharedMapping


def local_offsets(conn: Connection, op: Op, keys: Sequence[Key], nbytes: int) -> list[int | None]:
    """GET_LOCAL or PUT_LOCAL for `keys` of `nbytes` each: the offset in the server's DRAM
    file it answers per key (None: not found, or no slot)."""
    header = conn.call(op, keys, [SIZE.pack(nbytes)] * len(keys))
    reply = conn.recv_bytes(header.payload_bytes)
    flags = reply[: len(keys)]
    if len(flags) != len(keys) or len(reply) != len(keys) + sum(flags) * SIZE.size:
        raise ProtocolError(f"server {conn.where} sent a garbled {op.name} reply")
    offsets = iter(unpack_sizes(memoryview(reply)[len(keys) :], sum(flags)))
    return [next(offsets) if flag else None for flag in flags]


class Lent:
    """DRAM slots a same-host server reserved for new chunks (PUT_LOCAL), held on one
    connection until `commit` (COMMIT: the filled slots become chunks) or `abort` (closing
    the connection gives them back)."""

    def __init__(
        self,
        link: ServerLink,
        conn: Connection,
        mapping: SharedMapping,
        keys: list[Key],
        nbytes: int,
        on_error: Callable[[], None],
    ) -> None:
        """`conn`: waiting as long as a PUT may (the server may wait for DRAM that in-flight
        disk writes pin); `on_error`: counts a failed COMMIT."""
        self._link, self._conn, self._on_error = link, conn, on_error
        offsets = local_offsets(conn, Op.PUT_LOCAL, keys, nbytes)
        self.keys = [k for k, at in zip(keys, offsets, strict=True) if at is not None]
        self.slots: list[memoryview | None] = []
        try:
            self.slots = [None if at is None else mapping.slot(at, nbytes) for at in offsets]
        except OSError as exc:
            link.local_writes = False
            raise Refused(f"cannot map the DRAM file of {conn.where} writable: {exc}") from exc

    def commit(self) -> int:
        """Publish every lent slot (filled by now); how many the server published."""
        conn, link = self._conn, self._link
        if not self.keys:
            link.give(conn)
            return 0
        try:
            conn.call(Op.COMMIT, self.keys, [])
            committed: int = COUNT.unpack(conn.recv_bytes(COUNT.size))[0]
        except FAILURES as exc:
            link.broken(conn, exc)
            self._on_error()
            return 0
        link.give(conn)
        return committed

    def abort(self) -> None:
        self._conn.close()


class Borrowed:
    """Chunks a same-host server pinned in its DRAM file for one connection (GET_LOCAL),
    until `release` (RELEASE, its reply read before the connection's next use)."""

    def __init__(
        self, views: list[memoryview | None], link: ServerLink, conn: Connection, keys: list[Key]
    ) -> None:
        self.views = views
        self._link, self._conn, self._keys = link, conn, keys

    def release(self) -> None:
        try:
            if self._keys:
                self._conn.send_unread(Op.RELEASE, self._keys, [])
        except FAILURES as exc:
            self._link.broken(self._conn, exc)
            return
        self._link.give(self._conn)
