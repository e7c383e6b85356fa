"""`kvtier worker-sim`: fake OpenAI-compatible inference workers, for tests and benchmarks
without a GPU (in the style of llm-d's inference simulator).

Each worker stands in for a vLLM server running kvtier's connector: a prefix cache on GPU,
optionally kvtier DRAM behind it and a shared kvtier tier behind several workers
(`simcache`), a prefill lane and concurrent decode timed by per-token costs (`simengine`),
vLLM's HTTP routes (`simapp`) and, optionally, vLLM's KV events on a ZeroMQ PUB socket
with a replay socket beside it.

`--count K` runs K workers in one process on ports P..P+K-1 (port 0: any free ports), all
behind one shared tier when `--shared-tokens` is set. Each prints one flushed line,
`worker-sim http://HOST:PORT[ events tcp://127.0.0.1:EPORT replay tcp://127.0.0.1:RPORT]`
(the replay port is any free one). In-process use:
`sims = await start_sims(SimConfig(...), count)`, then `await sim.stop()` for each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from kvtier.config import env_default
from kvtier.gateway.events import Publisher
from kvtier.gateway.simapp import make_app
from kvtier.gateway.simcache import SharedTier
from kvtier.gateway.simengine import SimConfig, SimEngine
from kvtier.server.server import run_loop

GRACEFUL_SHUTDOWN_S = 1
ANY_PORT = "tcp://127.0.0.1:0"


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner (several run in one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class RunningSim:
    """One started worker: `url` (`http://host:port`, no `/v1`), `events_endpoint` and
    `replay_endpoint` (its ZeroMQ PUB and replay sockets, None when events are off) and its
    `engine` (cache, counters)."""

    url: str
    events_endpoint: str | None
    replay_endpoint: str | None
    engine: SimEngine
    server: _Server
    task: asyncio.Task[None]

    @property
    def banner(self) -> str:
        if self.events_endpoint is None:
            return f"worker-sim {self.url}"
        return f"worker-sim {self.url} events {self.events_endpoint} replay {self.replay_endpoint}"

    async def stop(self) -> None:
        """Stop serving (open streams get GRACEFUL_SHUTDOWN_S) and close the event socket."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.engine.publisher is not None:
            self.engine.publisher.close()


async def start_sims(
    config: SimConfig,
    count: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    events_port: int | None = None,
) -> list[RunningSim]:
    """Start `count` workers on this event loop, on ports port..port+count-1 (0: any free),
    sharing one SharedTier when `config.shared_tokens` is set. `events_port`: None for no
    KV events, else the first event port (0: any free). Raises OSError if a port is taken."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    shared_blocks = config.blocks(config.shared_tokens)
    shared = None if shared_blocks is None else SharedTier(shared_blocks)
    sims: list[RunningSim] = []
    try:
        for i in range(count):
            eport = None if events_port is None else (events_port and events_port + i)
            sims.append(await _start(config, shared, host, port and port + i, eport))
    except BaseException:
        for sim in sims:
            await sim.stop()
        raise
    return sims


async def _start(
    config: SimConfig, shared: SharedTier | None, host: str, port: int, events_port: int | None
) -> RunningSim:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    publisher = None
    if events_port is not None:  # and a replay socket on any free port
        publisher = Publisher(f"tcp://127.0.0.1:{events_port}", replay_endpoint=ANY_PORT)
    engine = SimEngine(config, shared, publisher)
    uv_config = uvicorn.Config(
        make_app(engine),
        lifespan="off",
        log_level="warning",
        access_log=False,
        http="httptools",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(uv_config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.005)
    if task.done():
        if publisher is not None:
            publisher.close()
        task.result()
        raise OSError(f"worker-sim: could not serve on {host}:{port}")
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    endpoint = None if publisher is None else publisher.endpoint
    replay = None if publisher is None else publisher.replay_endpoint
    return RunningSim(f"http://{url_host}:{bound}", endpoint, replay, engine, server, task)


def _env(name: str, default: object) -> str | None:
    return env_default(f"KVTIER_SIM_{name}", None if default is None else str(default))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    arg = parser.add_argument
    arg("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on")
    arg("--port", type=int, default=_env("PORT", 8000), help="first worker's port (0: any free)")
    arg("--count", type=int, default=_env("COUNT", 1), help="workers in this process")
    arg("--model", default=_env("MODEL", d.model), help="the one model name served")
    arg("--cache-tokens", type=int, default=_env("CACHE_TOKENS", d.cache_tokens),
        help="GPU prefix cache size in tokens")  # fmt: skip
    arg("--block-tokens", type=int, default=_env("BLOCK_TOKENS", d.block_tokens),
        help="tokens per KV block")  # fmt: skip
    arg("--kvtier-tokens", type=int, default=_env("KVTIER_TOKENS", 0),
        help="kvtier DRAM tier behind each worker, in tokens (0: off)")  # fmt: skip
    arg("--shared-tokens", type=int, default=_env("SHARED_TOKENS", 0),
        help="shared kvtier tier behind all workers here, in tokens (0: off)")  # fmt: skip
    arg("--api-key", default=_env("API_KEY", ""),
        help="as vLLM's --api-key: /v1 routes need `Authorization: Bearer KEY`")  # fmt: skip
    arg("--kv-events-port", type=int, default=_env("KV_EVENTS_PORT", None),
        help="publish vLLM KV events on 127.0.0.1 from this port (0: any free)")  # fmt: skip
    _add_timing(parser, d)


def _add_timing(parser: argparse.ArgumentParser, d: SimConfig) -> None:
    times = {
        "prefill": (d.prefill_ms_per_token, "computing an uncached prompt token"),
        "decode": (d.decode_ms_per_token, "between output tokens of one request"),
        "dram-load": (d.dram_load_ms_per_token, "loading a prompt token from kvtier DRAM"),
        "shared-load": (d.shared_load_ms_per_token, "loading a prompt token from the shared tier"),
    }
    for name, (default, text) in times.items():
        env = name.upper().replace("-", "_") + "_MS_PER_TOKEN"
        parser.add_argument(
            f"--{name}-ms-per-token", type=float, default=_env(env, default), help=f"ms {text}"
        )


def _config(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        model=args.model,
        cache_tokens=args.cache_tokens,
        block_tokens=args.block_tokens,
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms_per_token=args.decode_ms_per_token,
        kvtier_tokens=args.kvtier_tokens or None,
        dram_load_ms_per_token=args.dram_load_ms_per_token,
        shared_tokens=args.shared_tokens or None,
        shared_load_ms_per_token=args.shared_load_ms_per_token,
        api_key=args.api_key,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        if args.count < 1:
            raise ValueError(f"--count must be at least 1, got {args.count}")
    except ValueError as exc:
        print(f"kvtier worker-sim: {exc}", file=sys.stderr)
        return 2
    try:
        run_loop(_serve(config, args))
    except OSError as exc:
        print(f"kvtier worker-sim: cannot listen: {exc}", file=sys.stderr)
        return 1
    except WorkerStopped as exc:
        print(f"kvtier worker-sim: {exc}", file=sys.stderr)
        return 1
    return 0


class WorkerStopped(Exception):
    """A worker's server ended without being asked to."""


async def _serve(config: SimConfig, args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT; raises WorkerStopped if a worker's server ends first."""
    sims = await start_sims(config, args.count, args.host, args.port, args.kv_events_port)
    for sim in sims:
        print(sim.banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, *(sim.task for sim in sims)], return_when=asyncio.FIRST_COMPLETED)
    ended = [sim for sim in sims if sim.task.done()]
    stopping.cancel()
    await asyncio.gather(*(sim.stop() for sim in sims), return_exceptions=True)
    if ended and not stop.is_set():
        cause = ended[0].task.exception() if not ended[0].task.cancelled() else None
        raise WorkerStopped(f"{ended[0].url} stopped serving: {cause!r}") from cause
