"""`kvtier serve`: run a shared cache node (its own DRAM + disk tiers behind a TCP service)."""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

from kvtier.config import StoreConfig, env_default, is_loopback, parse_size
from kvtier.errors import ConfigError
from kvtier.metrics import MetricsServer
from kvtier.quota import Quotas
from kvtier.server.admission import ServerPolicy
from kvtier.server.auth import Auth
from kvtier.server.quotas import check_fits, load_quotas
from kvtier.server.server import CacheServer, run_loop
from kvtier.server.tls import server_context
from kvtier.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--host", default=env_default("KVTIER_HOST", "127.0.0.1"), help="address to listen on")
    arg("--port", type=int, default=env_default("KVTIER_PORT", "7400"), help="0: any free port")
    arg("--dram", default=env_default("KVTIER_DRAM", "1GiB"), help="DRAM tier size")
    arg("--dram-shm", default=env_default("KVTIER_DRAM_SHM"),
        help="memory file system directory (e.g. /dev/shm) to keep the DRAM tier in, so "
        "clients of this user on this host load chunks from it at memcpy speed")  # fmt: skip
    arg("--shm-writes", action="store_true",
        default=env_default("KVTIER_SHM_WRITES", "") in ("1", "true", "yes"),
        help="with --dram-shm: let those clients also save chunks by writing into that file "
        "(PUT_LOCAL) instead of sending them; they can then write anywhere in it, so use it "
        "only when every such client is your own engine (a node-local server)")  # fmt: skip
    arg("--disk-dir", default=env_default("KVTIER_DISK_DIR"), help="disk tier directory")
    arg("--disk", default=env_default("KVTIER_DISK"), help="disk tier size, e.g. 500GiB")
    arg("--disk-admit-after", default=env_default("KVTIER_DISK_ADMIT_AFTER", "1"),
        help="write a chunk to disk once it has been used this many times (saved or hit); "
        "2 keeps chunks used only once off the disk; off: as 1")  # fmt: skip
    arg("--pin-fraction", default=env_default("KVTIER_PIN_FRACTION", "0.5"),
        help="share of each tier that chunks clients pin may take; 0 or off: no pins")  # fmt: skip
    arg("--auth-file", default=env_default("KVTIER_AUTH_FILE"), help="lines 'tenant token'")
    arg("--quota-file", default=env_default("KVTIER_QUOTA_FILE"),
        help="lines 'tenant dram disk': each tenant's bytes in the DRAM and disk tiers (sizes, "
        "'-' for the default, 'none' for no limit); needs --auth-file")  # fmt: skip
    arg("--tenant-dram", default=env_default("KVTIER_TENANT_DRAM"),
        help="every tenant's DRAM quota unless its quota file line says (e.g. 4GiB)")  # fmt: skip
    arg("--tenant-disk", default=env_default("KVTIER_TENANT_DISK"),
        help="every tenant's disk quota unless its quota file line says (e.g. 100GiB)")  # fmt: skip
    arg("--tls-cert", default=env_default("KVTIER_TLS_CERT"),
        help="PEM certificate (chain): speak TLS; clients then use kvtiers://")  # fmt: skip
    arg("--tls-key", default=env_default("KVTIER_TLS_KEY"),
        help="PEM private key of --tls-cert (unencrypted)")  # fmt: skip
    arg("--metrics-port", type=int, default=env_default("KVTIER_METRICS_PORT"),
        help="HTTP port for GET /metrics and /healthz (0: any free port)")  # fmt: skip
    arg("--insecure", action="store_true",
        default=env_default("KVTIER_INSECURE", "") in ("1", "true", "yes"),
        help="allow a non-loopback address without an auth file")  # fmt: skip
    _add_bounds(parser)


FD_RESERVE = 64  # descriptors kept for the disk tier, the metrics port and accept bursts


def _add_bounds(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    d = ServerPolicy()
    arg(
        "--recv-budget",
        default=env_default("KVTIER_RECV_BUDGET", "512MiB"),
        help="bound on receive memory: frame bodies being received, all connections "
        "together (plus 128 KiB per connection for keys); a client that finds it used up "
        "waits, its reads paused, up to --stall-timeout; a frame larger than it is refused",
    )
    arg(
        "--max-connections",
        type=int,
        default=env_default("KVTIER_MAX_CONNECTIONS", str(d.max_connections)),
        help="connection cap (lowered to fit the open-file limit); at most half of it "
        "before a valid HELLO, the oldest of those dropped for a newcomer",
    )
    arg(
        "--handshake-timeout",
        type=float,
        default=env_default("KVTIER_HANDSHAKE_TIMEOUT", str(d.handshake_timeout_s)),
        help="seconds a new connection has to send a valid HELLO (its first frame without "
        "an auth file)",
    )
    arg(
        "--idle-timeout",
        type=float,
        default=env_default("KVTIER_IDLE_TIMEOUT", str(d.idle_timeout_s)),
        help="seconds a logged-in connection may send nothing before it is closed",
    )
    arg(
        "--stall-timeout",
        type=float,
        default=env_default("KVTIER_STALL_TIMEOUT", str(d.stall_timeout_s)),
        help="seconds a connection may wait for receive budget, or send nothing in the "
        "middle of a frame, before it is closed",
    )
    arg("--auth-delay", type=float,
        default=env_default("KVTIER_AUTH_DELAY", str(d.auth_delay_s)),
        help="seconds before an address's next HELLO is checked, after a wrong token")  # fmt: skip


def _policy(args: argparse.Namespace) -> ServerPolicy:
    return ServerPolicy(
        recv_budget_bytes=parse_size(args.recv_budget, "--recv-budget"),
        max_connections=_connection_cap(args.max_connections),
        handshake_timeout_s=args.handshake_timeout,
        idle_timeout_s=args.idle_timeout,
        stall_timeout_s=args.stall_timeout,
        auth_delay_s=args.auth_delay,
    )


def _connection_cap(wanted: int) -> int:
    """`wanted`, lowered so that the cap plus FD_RESERVE fits the open-file limit (raised
    towards its hard limit first), so accepting never runs out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


def _auth(args: argparse.Namespace) -> Auth:
    if args.auth_file:
        return Auth.from_file(args.auth_file)
    if not is_loopback(args.host) and not args.insecure:
        raise ConfigError(
            f"refusing to listen on {args.host} without --auth-file: any host could read and "
            "write the cache. Give --auth-file (lines 'tenant token') or --insecure"
        )
    return Auth()


def _quotas(args: argparse.Namespace, auth: Auth, config: StoreConfig) -> Quotas:
    """Every tenant's quota; prints a note where the quotas add up to more than a tier."""
    if args.quota_file and auth.open:
        raise ConfigError("--quota-file needs --auth-file (it names its tenants)")
    dram = parse_size(args.tenant_dram, "--tenant-dram") if args.tenant_dram else None
    disk = parse_size(args.tenant_disk, "--tenant-disk") if args.tenant_disk else None
    quotas = load_quotas(auth.tenants, args.quota_file, dram, disk)
    tiers = {"dram": _bytes(config.dram_bytes), "disk": _bytes(config.disk_bytes)}
    for note in check_fits(quotas, tiers):
        print(f"kvtier serve: note: {note}", flush=True)
    return quotas


def _bytes(size: int | str | None) -> int | None:
    return None if size is None else parse_size(size)


def store_config(args: argparse.Namespace) -> StoreConfig:
    """The server's store: its options take the values of their KVTIER_* variables, parsed
    as `StoreConfig.from_env` parses them (off: no disk tier, no pins, ...); --dram must be a
    size (a server without DRAM would serve nothing)."""
    text = {
        "disk_dir": args.disk_dir,
        "disk_bytes": args.disk,
        "dram_shm": args.dram_shm,
        "disk_admit_after": args.disk_admit_after,
        "pin_fraction": args.pin_fraction,
    }
    given = {name: value for name, value in text.items() if value is not None}
    return StoreConfig.from_text(given, dram_bytes=parse_size(args.dram, "--dram"))


def run(args: argparse.Namespace) -> int:
    try:
        auth = _auth(args)
        policy = _policy(args)
        tls = server_context(args.tls_cert or None, args.tls_key or None)
        if args.shm_writes and not args.dram_shm:
            raise ConfigError("--shm-writes needs --dram-shm (the file clients write into)")
        config = store_config(args)
        store = Store(config, _quotas(args, auth, config))
    except ConfigError as exc:
        print(f"kvtier serve: {exc}", file=sys.stderr)
        return 2
    try:
        server = CacheServer(
            store, auth, policy=policy, local_writes=bool(args.shm_writes), tls=tls
        )
        run_loop(_serve(server, args.host, args.port, args.metrics_port))
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
        metrics = MetricsServer(host, metrics_port, server.metrics.registry)
        note = f", metrics on http://{host}:{metrics.port}/metrics"
    tls = " (TLS)" if server.tls is not None else ""
    print(f"kvtier serve: listening on {host}:{bound}{tls}{note}", flush=True)
    p = server.policy
    print(
        f"kvtier serve: receive budget {p.recv_budget_bytes} bytes, at most "
        f"{p.max_connections} connections",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if metrics is not None:
        await asyncio.to_thread(metrics.close)
    await server.stop()
