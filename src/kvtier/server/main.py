"""`kvtier serve`: run a shared cache node (its own DRAM + disk tiers behind a TCP service)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys

from kvtier.config import StoreConfig, env_default
from kvtier.errors import ConfigError
from kvtier.server.auth import Auth
from kvtier.server.metrics import render, start_metrics
from kvtier.server.server import CacheServer, run_loop
from kvtier.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--host", default=env_default("KVTIER_HOST", "127.0.0.1"), help="address to listen on")
    arg("--port", type=int, default=env_default("KVTIER_PORT", "7400"), help="0: any free port")
    arg("--dram", default=env_default("KVTIER_DRAM", "1GiB"), help="DRAM tier size")
    arg("--disk-dir", default=env_default("KVTIER_DISK_DIR"), help="disk tier directory")
    arg("--disk", default=env_default("KVTIER_DISK"), help="disk tier size, e.g. 500GiB")
    arg("--auth-file", default=env_default("KVTIER_AUTH_FILE"), help="lines 'tenant token'")
    arg("--metrics-port", type=int, default=env_default("KVTIER_METRICS_PORT"),
        help="HTTP port for GET /metrics and /healthz (0: any free port)")  # fmt: skip
    arg("--insecure", action="store_true",
        default=env_default("KVTIER_INSECURE", "") in ("1", "true", "yes"),
        help="allow a non-loopback address without an auth file")  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth(args: argparse.Namespace) -> Auth:
    if args.auth_file:
        return Auth.from_file(args.auth_file)
    if not _is_loopback(args.host) and not args.insecure:
        raise ConfigError(
            f"refusing to listen on {args.host} without --auth-file: any host could read and "
            "write the cache. Give --auth-file (lines 'tenant token') or --insecure"
        )
    return Auth()


def run(args: argparse.Namespace) -> int:
    try:
        auth = _auth(args)
        config = StoreConfig(dram_bytes=args.dram, disk_dir=args.disk_dir, disk_bytes=args.disk)
        store = Store(config)
    except ConfigError as exc:
        print(f"kvtier serve: {exc}", file=sys.stderr)
        return 2
    try:
        run_loop(_serve(CacheServer(store, auth), args.host, args.port, args.metrics_port))
    except OSError as exc:
        print(f"kvtier serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    persisted = "; every chunk is on disk" if args.disk_dir else ""
    print(f"kvtier serve: stopped{persisted}", flush=True)
    return 0


async def _serve(server: CacheServer, host: str, port: int, metrics_port: int | None) -> None:
    bound = await server.start(host, port)
    metrics = None
    note = ""
    if metrics_port is not None:
        metrics = await start_metrics(host, metrics_port, lambda: render(server))
        note = f", metrics on http://{host}:{metrics.sockets[0].getsockname()[1]}/metrics"
    print(f"kvtier serve: listening on {host}:{bound}{note}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if metrics is not None:
        metrics.close()
    await server.stop()
