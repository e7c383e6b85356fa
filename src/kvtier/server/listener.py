"""The listening socket, accepted by hand so that running out of descriptors is survivable.

`loop.create_server` under uvloop closes the listening socket for good on EMFILE; here an
accept error that means "no descriptors / memory right now" stops accepting for
`ACCEPT_RETRY_S` (no busy loop: the backlog waits in the kernel) and then resumes.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

ACCEPT_BATCH = 16
ACCEPT_RETRY_S = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    """Accepts on `sock` and hands each new socket to `on_socket`; counts resource errors."""

    def __init__(
        self,
        sock: socket.socket,
        on_socket: Callable[[socket.socket], None],
        on_error: Callable[[OSError], None],
    ) -> None:
        self.sock = sock
        self._on_socket = on_socket
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._ready)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # ECONNABORTED and the like: that one peer's problem
                self._on_error(exc)
                self._loop.remove_reader(self.sock.fileno())
                self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            self._on_socket(conn)

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._ready)


def listen(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A bound, listening TCP socket on host:port (0 = any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
