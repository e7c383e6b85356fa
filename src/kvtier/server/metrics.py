"""Prometheus text metrics and a health check on a separate, tiny asyncio HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.server.server import CacheServer

_TIER_FIELDS = {
    "capacity_bytes": ("gauge", "configured capacity of the tier"),
    "bytes": ("gauge", "bytes held by the tier"),
    "chunks": ("gauge", "chunks held by the tier"),
    "hits": ("counter", "reads served by the tier"),
    "misses": ("counter", "reads the tier could not serve"),
    "evictions": ("counter", "chunks evicted from the tier"),
    "errors": ("counter", "I/O errors of the tier"),
    "checksum_failures": ("counter", "chunks that failed verification"),
}


def render(server: CacheServer) -> str:
    """The server's store and connection counters in Prometheus text format."""
    stats = server.store.stats()
    lines: list[str] = []
    for field, (kind, text) in _TIER_FIELDS.items():
        name = f"kvtier_tier_{field}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{tier="{t.name}"}} {getattr(t, field)}' for t in stats.tiers]
    store_values = {
        "kvtier_saved_chunks_total": stats.saved_chunks,
        "kvtier_dropped_chunks_total": stats.dropped_chunks,
        "kvtier_pending_writes": stats.pending_writes,
    }
    for name, value in store_values.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    for key, value in sorted(server.counters.items()):
        name = f"kvtier_server_{key}" + ("" if key.endswith("_total") else "_total")
        lines += [f"# TYPE {name} counter", f"{name} {value}"]
    return "\n".join(lines) + "\n"


REQUEST_LIMIT_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0


def _response(status: str, body: str) -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )


def _answer(request: bytes, text: Callable[[], str]) -> bytes:
    parts = request.split(b" ", 2)
    if len(parts) < 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", "not an HTTP request\n")
    path = parts[1] if parts[0] == b"GET" else b""
    if path == b"/metrics":
        return _response("200 OK", text())
    if path == b"/healthz":
        return _response("200 OK", "ok\n")
    return _response("404 Not Found", "try /metrics or /healthz\n")


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """The request head, b"" when it is too large, None when the client left early."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
    except asyncio.LimitOverrunError:
        return b""
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
        return None


async def start_metrics(host: str, port: int, text: Callable[[], str]) -> asyncio.Server:
    """Serve `GET /metrics` (text()) and `GET /healthz` on host:port. A request head over
    8 KiB gets 431, a malformed one 400; a client that leaves early is closed quietly."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        with contextlib.suppress(OSError):
            if request == b"":
                writer.write(_response("431 Request Header Fields Too Large", "too large\n"))
            elif request is not None:
                writer.write(_answer(request, text))
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=REQUEST_LIMIT_BYTES)
