"""TLS for `kvtier serve --tls-cert FILE --tls-key FILE`: the server context, and a look at a
new connection's first byte before its handshake.

A TLS client starts with a handshake record (first byte 0x16). A kvtier client that starts in
plaintext (`kvtier://` against this server) is read out, answered with one plaintext
TLS_REQUIRED frame naming the fix, and closed; the handshake itself (certificate, protocol
versions: TLS 1.2 or newer) is the ssl module's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from kvtier.errors import ConfigError
from kvtier.protocol import Op, Status, pack_header

TLS_HANDSHAKE = 0x16  # the content type of the first record a TLS client sends
PIECE_BYTES = 256 << 10  # a GET reply's chunks go to the TLS layer this much at a time
_PLAINTEXT_REPLY = b"this server speaks TLS: connect with kvtiers://host:port"


def server_context(cert: str | Path | None, key: str | Path | None) -> ssl.SSLContext | None:
    """The server's context for a PEM certificate (chain) and its private key; None when
    neither is given. ConfigError for one without the other, or files that do not load."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(
            "--tls-cert and --tls-key go together (KVTIER_TLS_CERT, KVTIER_TLS_KEY): give "
            "the server's PEM certificate and its private key, or neither"
        )
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{option}: {path} is not a file; give a PEM file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0  # no session resumption: clients keep their connections
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: cannot load them ({exc}); give a PEM "
            "certificate and the unencrypted PEM private key that belongs to it"
        ) from exc
    return context


async def starts_tls(sock: socket.socket) -> bool:
    """Wait for the first byte of a new non-blocking socket: True for a TLS handshake; False
    for a plaintext client, whose bytes are read out and answered with TLS_REQUIRED.
    ConnectionResetError for a client that closed first. The caller closes the socket."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise ConnectionResetError("the client closed before its TLS handshake")
    if first[0] == TLS_HANDSHAKE:
        return True
    try:
        sock.recv(1 << 16)  # closing with unread bytes would reset the reply away
        head = pack_header(Op.HELLO, 0, 0, len(_PLAINTEXT_REPLY), Status.TLS_REQUIRED)
        sock.send(head + _PLAINTEXT_REPLY)
    except OSError:
        pass  # gone already: nothing to tell it
    return False


async def write_paced(
    transport: asyncio.Transport | None,
    views: Sequence[memoryview],
    drained: Callable[[float], Awaitable[None]],
    deadline: float,
) -> None:
    """Write `views` to a TLS transport PIECE_BYTES at a time, awaiting `drained(deadline)`
    after each: the TLS layer encrypts (copies) at once whatever it is given, so a whole reply
    would be a fresh copy of every chunk (page faults, memory held until the client reads);
    piece by piece it is at most about two pieces. `deadline` (event loop time) is the one
    for the whole reply, not for each piece, so a client reading a piece now and then cannot
    hold the reply's chunks longer than a plaintext one. Stops once the transport is closing."""
    for view in views:
        for start in range(0, view.nbytes, PIECE_BYTES):
            if transport is None or transport.is_closing():
                return
            transport.write(view[start : start + PIECE_BYTES])
            await drained(deadline)
