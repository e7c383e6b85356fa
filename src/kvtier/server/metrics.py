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


async def start_metrics(host: str, port: int, text: Callable[[], str]) -> asyncio.Server:
    """Serve `GET /metrics` (text()) and `GET /healthz` on host:port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = request.split(b" ", 2)
            path = parts[1].decode() if len(parts) > 1 and parts[0] == b"GET" else ""
            if path == "/metrics":
                status, body = "200 OK", text()
            elif path == "/healthz":
                status, body = "200 OK", "ok\n"
            else:
                status, body = "404 Not Found", "try /metrics or /healthz\n"
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port, limit=8192)
