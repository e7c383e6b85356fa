"""Prometheus metrics, one way for every kvtier process (prometheus-client).

The cache server, the gateway and the vLLM connector share what is here: histogram buckets
(so a dashboard compares a server's op latency with a connector's load time on one scale), a
registry per process part (two servers or gateways in one test process never share one) with
the `process_*` and `python_*` metrics, and the HTTP exposition: Prometheus text or
OpenMetrics as the scraper asks. A part that has no HTTP server of its own (the cache server)
serves `GET /metrics` and `GET /healthz` on a separate port with `serve()`; the gateway answers
`/metrics` from its own app with `exposition()`; the vLLM connector's metrics live in vLLM's
registry and are served by vLLM.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    make_wsgi_app,
)
from prometheus_client.exposition import choose_encoder

# Seconds. One cache operation: a server request, a chunk or request loaded or saved.
OP_BUCKETS = (
    25e-6, 50e-6, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
)  # fmt: skip
# A decision made in memory (the gateway's routing).
FAST_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
# Time to first token.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUEST_TIMEOUT_S = 5.0  # a scraper that sends nothing for this long is closed


def new_registry(process: bool = True) -> CollectorRegistry:
    """A registry of its own; with `process`, also the process's CPU, memory and open files
    (`process_*`, Linux) and the interpreter's (`python_info`, `python_gc_*`)."""
    registry = CollectorRegistry()
    if process:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's metrics in the format the `Accept` header asks for (Prometheus text by
    default, OpenMetrics if asked), and its content type."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


class _QuietHandler(WSGIRequestHandler):
    """Logs nothing (a bad request gets its 4xx, not a line on stderr); a client that sends
    nothing for REQUEST_TIMEOUT_S is closed."""

    timeout = REQUEST_TIMEOUT_S
    default_request_version = "HTTP/1.0"  # a garbled request line gets a status line too

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """`GET /metrics` and `GET /healthz` on their own port, served by a thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                return _plain(start, "405 Method Not Allowed", b"use GET\n")
            if path == "/metrics":
                return metrics(environ, start)  # type: ignore[no-any-return]
            if path == "/healthz":
                return _plain(start, "200 OK", b"ok\n")
            return _plain(start, "404 Not Found", b"try /metrics or /healthz\n")

        server_class = _Server6 if ":" in host else _Server
        self._httpd = make_server(host, port, app, server_class, _QuietHandler)
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="kvtier-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def _plain(start: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
    start(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body]
