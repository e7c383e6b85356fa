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
    """Accepts on `sock` and hands each new socket to `on_socket` while `ready()` says so
    (otherwise it waits for `resume()`); reports resource errors to `on_error`."""

    def __init__(
        self,
        sock: socket.socket,
        on_socket: Callable[[socket.socket], None],
        on_error: Callable[[OSError], None],
        ready: Callable[[], bool],
    ) -> None:
        self.sock = sock
        self._on_socket = on_socket
        self._on_error = on_error
        self._can_accept = ready
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        sock.setblocking(False)
        self.resume()

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._pause()
        self.sock.close()

    def resume(self) -> None:
        """Accept again (after `ready()` said no); a no-op while accepting or retrying."""
        if not self._reading and self._retry is None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._ready)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._can_accept():
                self._pause()
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # ECONNABORTED and the like: that one peer's problem
                self._on_error(exc)
                self._pause()
                self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._retried)
                return
            self._on_socket(conn)

    def _retried(self) -> None:
        self._retry = None
        self.resume()


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
