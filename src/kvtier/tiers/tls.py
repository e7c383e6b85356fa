"""TLS for the remote tier (`remote="kvtiers://..."`): the client context, the handshake with
errors that say what to fix, and sending without `sendmsg` (an SSLSocket has none).

The server's certificate is verified against `StoreConfig.remote_ca` (or the system's default
CAs) and must name the host in the URL (a DNS name or an IP SubjectAltName); TLS 1.2 or newer.
A certificate that fails, or a server that answers in plaintext, raises TLSError: that is
configuration, not an outage. A server that cannot be reached or drops the handshake is
`OSError`, for the caller to treat as down.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from kvtier.errors import ConfigError, TLSError

COALESCE_BYTES = 64 << 10  # smaller parts (header, keys, sizes) go out joined, in one record


def client_context(ca: str | Path | None) -> ssl.SSLContext:
    """A context that verifies servers against `ca` (a PEM file), or the system's CAs."""
    try:
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"remote_ca: cannot load {ca} as PEM CA certificates ({exc}); give the CA "
            "certificate that signed the server's certificate (KVTIER_REMOTE_CA)"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def handshake(context: ssl.SSLContext, sock: socket.socket, host: str, where: str) -> ssl.SSLSocket:
    """`sock` wrapped in TLS with `host` checked against the server's certificate; closes
    `sock` on failure. TLSError for an untrusted certificate or a server without TLS;
    OSError (incl. ssl.SSLEOFError) when the server closed or reset the connection."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        why = str(exc.verify_message).rstrip(".")
        raise TLSError(
            f"the certificate of server {where} is not trusted ({why}): give "
            "the CA that signed it with StoreConfig(remote_ca=...) or KVTIER_REMOTE_CA (and "
            "a certificate whose SubjectAltName names the host in the URL)"
        ) from exc
    except ssl.SSLError as exc:
        sock.close()
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            raise
        if exc.reason == "WRONG_VERSION_NUMBER":  # what a plaintext answer looks like
            what = f"server {where} does not speak TLS (it answered in plaintext)"
        else:
            what = f"TLS handshake with server {where} failed ({exc.reason or exc})"
        raise TLSError(
            f"{what}: start it with kvtier serve --tls-cert/--tls-key, or use kvtier:// for a "
            "server without TLS"
        ) from exc
    except BaseException:
        sock.close()
        raise


def send_parts(sock: ssl.SSLSocket, views: Sequence[memoryview]) -> None:
    """Send every part in order: small ones joined (one TLS record, one segment), large ones
    as they are (the TLS layer copies them while encrypting anyway)."""
    small: list[memoryview] = []
    for view in views:
        if view.nbytes < COALESCE_BYTES:
            small.append(view)
            continue
        if small:
            sock.sendall(b"".join(small))
            small = []
        sock.sendall(view)
    if small:
        sock.sendall(b"".join(small))
