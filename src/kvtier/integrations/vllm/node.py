"""The node-local kvtier process every engine process on a node shares.

vLLM runs its scheduler and each worker in separate processes, and a node often runs several
engines; a disk directory opens in one Store only. So the tiers live in one process per node
(per tier configuration): DRAM, disk and, when configured, the shared remote tier behind it,
served on 127.0.0.1 to the engine processes, which are plain clients (`remote=kvtier://...`).

Discovery, with nothing started by hand: the tier configuration names a run directory
(`/tmp/kvtier-node-<uid>/<digest>`). Under its flock, the first engine process finds no live
node there and starts one (`python -m kvtier.integrations.vllm.node RUN_DIR`, a new session so
it outlives the engine), which writes `node.json` (port, random token; mode 0600) once it
listens. Every engine process registers its pid in `clients/`; the node exits (flushing to
disk) once no registered process has been alive for `idle_exit_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from kvtier.config import StoreConfig
from kvtier.errors import ConfigError, KvtierError
from kvtier.protocol import HEADER_BYTES, Op, pack_header, parse_header

if TYPE_CHECKING:
    from kvtier.store import Store

NODE_MODULE = "kvtier.integrations.vllm.node"
START_TIMEOUT_S = 60.0
IDLE_EXIT_S = 30.0
STATS_TIMEOUT_S = 10.0


def default_node_dir() -> Path:
    return Path("/tmp") / f"kvtier-node-{os.getuid()}"


def engine_config(config: StoreConfig, node_dir: Path | None = None) -> StoreConfig:
    """The config an engine process opens: a client of this node's kvtier process, started
    here if none is running; `config` itself when it has no node-local tier. `node_dir`
    holds the run directories (default `/tmp/kvtier-node-<uid>`)."""
    if not _node_local(config):
        return config
    return _client_config(config, *_locator(config, node_dir)())


def engine_store(config: StoreConfig, node_dir: Path | None = None) -> Store:
    """The store of `engine_config`; one whose node process dies (kill -9, the OOM killer)
    finds it again, or starts a new one (under the run directory's lock, so once per node),
    the first time it cannot reach it: until then, and while the node restarts, its chunks
    are misses. A restarted node has its disk chunks, not its DRAM ones."""
    from kvtier.store import Store

    if not _node_local(config):
        return Store(config)
    locate = _locator(config, node_dir)
    return Store(_client_config(config, *locate()), locate_remote=locate)


def _node_local(config: StoreConfig) -> bool:
    return config.dram_bytes is not None or config.disk_dir is not None


def _locator(config: StoreConfig, node_dir: Path | None) -> Callable[[], tuple[str, str]]:
    """() -> the URL and token of this configuration's node process, started if needed."""
    run_dir = _run_dir(config, node_dir or default_node_dir())

    def locate() -> tuple[str, str]:
        port, token = _ensure_node(run_dir, config)
        _register(run_dir)
        return f"kvtier://127.0.0.1:{port}", token

    return locate


def _client_config(config: StoreConfig, url: str, token: str) -> StoreConfig:
    return StoreConfig(
        chunk_tokens=config.chunk_tokens,
        dram_bytes=None,
        remote=url,
        remote_token=token,
        io_workers=config.io_workers,
    )


def _run_dir(config: StoreConfig, node_dir: Path) -> Path:
    """One node per tier configuration, shared-tier credentials included: a node talks to
    the shared tier with its own token, and engines with other tokens must not share it."""
    tiers = {k: v for k, v in _serialise(config).items() if k != "remote_token"}
    if config.remote_token:
        tiers["remote_token"] = hashlib.sha256(config.remote_token.encode()).hexdigest()
    digest = hashlib.blake2b(json.dumps(tiers, sort_keys=True).encode(), digest_size=8).hexdigest()
    node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(node_dir)
    path = node_dir / digest
    path.mkdir(exist_ok=True, mode=0o700)
    _check_private(path)
    (path / "clients").mkdir(exist_ok=True)
    return path


def _check_private(directory: Path) -> None:
    """Refuses a run directory another user owns or may write: whoever can write
    `node.json` there decides which server the engine sends its KV to and loads it from."""
    info = os.lstat(directory)
    if info.st_uid != os.getuid() or info.st_mode & 0o022 or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"kvtier: {directory} must be a directory owned by this user (uid {os.getuid()}) "
            f"that no one else may write (it is uid {info.st_uid}, mode "
            f"{oct(info.st_mode & 0o777)}); remove it or set node_dir"
        )


def _ensure_node(run_dir: Path, config: StoreConfig) -> tuple[int, str]:
    with open(run_dir / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _live_node(run_dir)
        if found is not None:
            return found
        (run_dir / "config.json").write_text(json.dumps(_serialise(config)))
        (run_dir / "node.pid").unlink(missing_ok=True)
        with open(run_dir / "node.log", "ab") as log:
            # The child forks again and exits: the node is nobody's descendant, so an engine
            # that kills its process tree on shutdown (vLLM does) cannot kill it unflushed.
            subprocess.run(
                [sys.executable, "-m", NODE_MODULE, str(run_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False, timeout=30,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = _live_node(run_dir)
            if found is not None:
                return found
            if not _alive(run_dir / "node.pid"):
                break
            time.sleep(0.05)
        tail = (run_dir / "node.log").read_text(errors="replace")[-2000:]
        raise ConfigError(f"kvtier: the node-local store process did not start: {tail}")


def _live_node(run_dir: Path) -> tuple[int, str] | None:
    """The port and token of the node `node.json` names, if it runs: its process is this
    run directory's node (even if it does not answer now: a hung node must not get a second
    one beside it), or, where that cannot be told, it accepts a connection."""
    try:
        info = json.loads((run_dir / "node.json").read_text())
        pid, found = int(info["pid"]), (int(info["port"]), str(info["token"]))
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        command = []
    if command:
        return found if _runs_node(pid, command, run_dir) else None  # else: a pid reused
    try:
        with socket.create_connection(("127.0.0.1", found[0]), timeout=1.0):
            return found
    except OSError:
        return None


def _runs_node(pid: int, command: list[bytes], run_dir: Path) -> bool:
    """Whether process `pid`, run as `command`, is the node of `run_dir` (named as its
    starter named it, maybe relative to its working directory)."""
    if NODE_MODULE.encode() not in command:
        return False
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    here = run_dir.resolve()
    return any((cwd / os.fsdecode(arg)).resolve() == here for arg in command[1:] if arg)


def _alive(pid_file: Path) -> bool:
    """False once the process named in `pid_file` has exited (True until it is written)."""
    try:
        os.kill(int(pid_file.read_text()), 0)
    except FileNotFoundError:
        return True
    except (ProcessLookupError, ValueError):
        return False
    return True


def _write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole or does not exist: a reader never sees it half-written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def _register(run_dir: Path) -> None:
    (run_dir / "clients" / str(os.getpid())).touch()


def _serialise(config: StoreConfig) -> dict[str, object]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def _alive_clients(run_dir: Path) -> int:
    alive = 0
    for entry in (run_dir / "clients").iterdir():
        try:
            os.kill(int(entry.name), 0)
            alive += 1
        except (ValueError, ProcessLookupError):
            entry.unlink(missing_ok=True)
        except PermissionError:
            alive += 1
    return alive


async def _serve(run_dir: Path, idle_exit_s: float) -> None:
    from kvtier.server.auth import Auth
    from kvtier.server.server import CacheServer
    from kvtier.store import Store

    config = StoreConfig(**json.loads((run_dir / "config.json").read_text()))
    with contextlib.suppress(ConfigError):  # DRAM in shared memory if /dev/shm has room for it:
        config = replace(config, dram_shm=config.dram_shm or "/dev/shm")  # memcpy-speed loads
    token = secrets.token_hex(16)
    with Store(config) as store:
        auth = Auth({hashlib.sha256(token.encode()).digest(): "node"})
        # Its clients are this user's engines; it keeps their keys as they are, so an engine
        # with no node-local tier finds what this node wrote to a shared tier, and the reverse.
        server = CacheServer(store, auth, local_writes=True, namespaced=False)
        port = await server.start("127.0.0.1", 0)
        info = {"pid": os.getpid(), "port": port, "token": token}
        _write_atomic(run_dir / "node.json", json.dumps(info))
        print(f"kvtier node: serving {config} on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        idle_since = time.monotonic()
        while not stop.is_set():
            if _alive_clients(run_dir):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_exit_s:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        (run_dir / "node.json").unlink(missing_ok=True)
        await server.stop()
        print(f"kvtier node: stats {json.dumps(store.stats().as_dict())}", flush=True)
    print("kvtier node: stopped", flush=True)


class RunningNode(NamedTuple):
    run_dir: Path
    stats: dict[str, Any]  # pid, port, and the node's STATS answer (tiers, pending writes)


def running_nodes(node_dir: Path | None = None, strict: bool = False) -> Iterator[RunningNode]:
    """Each live node-local process under `node_dir` (default: this user's), with its
    store's stats as it answers them now. A node that does not answer is left out, or with
    `strict` raises."""
    for info_path in sorted((node_dir or default_node_dir()).glob("*/node.json")):
        try:
            info = json.loads(info_path.read_text())
            stats = node_stats(int(info["port"]), str(info["token"]))
        except (OSError, ValueError, KeyError, RuntimeError, struct.error, KvtierError):
            if strict:
                raise
            continue
        yield RunningNode(info_path.parent, {"pid": info["pid"], "port": info["port"], **stats})


def node_stats(port: int, token: str) -> dict[str, Any]:
    """The STATS answer of the node listening on 127.0.0.1:`port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=STATS_TIMEOUT_S) as sock:
        f: BinaryIO = sock.makefile("rwb")  # type: ignore[assignment]
        _call(f, Op.HELLO, token.encode())
        stats: dict[str, Any] = json.loads(_call(f, Op.STATS, b""))
        return stats


def _call(f: BinaryIO, op: Op, payload: bytes) -> bytes:
    f.write(pack_header(op, 1, 0, len(payload)) + payload)
    f.flush()
    header = parse_header(f.read(HEADER_BYTES))
    body = f.read(header.body_bytes)
    if header.status:
        raise RuntimeError(f"kvtier node refused {op.name}: {body.decode(errors='replace')}")
    return body


def stop_nodes(node_dir: Path, timeout_s: float = 30.0) -> int:
    """Stop every node-local process under `node_dir` (each flushes to its disk tier first);
    returns how many were running."""
    pids = []
    for info_path in node_dir.glob("*/node.json"):
        try:
            pid = int(json.loads(info_path.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, KeyError):
            continue
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return len(pids)


def main() -> None:
    run_dir = Path(sys.argv[1])
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    _write_atomic(run_dir / "node.pid", str(os.getpid()))  # read while the starter waits
    asyncio.run(_serve(run_dir, float(sys.argv[2]) if len(sys.argv) > 2 else IDLE_EXIT_S))


if __name__ == "__main__":
    main()
