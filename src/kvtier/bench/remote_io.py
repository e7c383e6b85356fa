"""Remote tiers against the raw loopback socket (`kvtier bench io --remote`: the cache server
in plaintext and over TLS, Redis), and the node-local server's shared-memory load path
against memcpy (`--remote` or `--shm`).

Also the helpers that start a `kvtier serve` or a `redis-server` process on 127.0.0.1 for
benchmarks and tests; both are always stopped on exit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import numpy as np

from kvtier.bench.certs import make_certs
from kvtier.config import StoreConfig
from kvtier.store import Store
from kvtier.tiers.link import recv_exact, send_all

GB = 1e9
_LISTENING = re.compile(r"listening on (\S+):(\d+)( \(TLS\))?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Process:
    proc: subprocess.Popen[str]
    url: str

    def __enter__(self) -> _Process:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ServeProcess(_Process):
    """`kvtier serve --port 0` in a subprocess; `url` once it listens."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "kvtier.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            match = _LISTENING.search(line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                self.url = f"kvtier{'s' if match.group(3) else ''}://{self.host}:{self.port}"
                self.banner = line
                return
        self.proc.wait()
        raise RuntimeError(f"kvtier serve did not start: {''.join(lines)}")

    def output(self) -> str:
        """The rest of the server's output (after it stopped)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


class RedisProcess(_Process):
    """A throw-away `redis-server` on 127.0.0.1 (no persistence); `url` once it answers."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install redis-server (make test does this)")
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")


def _chunks(buf: np.ndarray, chunk_bytes: int) -> list[memoryview]:
    view = memoryview(buf.data)
    return [view[i : i + chunk_bytes] for i in range(0, buf.nbytes, chunk_bytes)]


def raw_socket_gbps(src: list[memoryview], dst: list[memoryview]) -> float:
    """The ceiling: the same bytes over one loopback TCP socket, sendmsg -> recv_into."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    with sender, receiver:

        def send() -> None:
            for view in src:
                send_all(sender, [view])

        thread = threading.Thread(target=send)
        start = time.perf_counter()
        thread.start()
        for view in dst:
            recv_exact(receiver, view)
        seconds = time.perf_counter() - start
        thread.join()
    return sum(v.nbytes for v in src) / seconds / GB


def store_gbps(
    url: str, src: list[memoryview], dst: list[memoryview], ca: Path | None = None
) -> tuple[float, float]:
    """Save (write_chunk + flush) and load (read_chunk) GB/s through a remote-only Store
    (`ca`: the CA for a kvtiers:// server)."""
    nbytes = sum(v.nbytes for v in src)
    with Store(StoreConfig(dram_bytes=None, remote=url, remote_ca=ca)) as store:
        _save_load(store, b"warm", src, dst)  # a first pass faults in every buffer on both sides
        save_s, load_s = _save_load(store, b"timed", src, dst)
    return nbytes / save_s / GB, nbytes / load_s / GB


def _save_load(
    store: Store, prefix: bytes, src: list[memoryview], dst: list[memoryview]
) -> tuple[float, float]:
    keys = [
        hashlib.blake2b(b"%s:%d" % (prefix, i), digest_size=16).digest() for i in range(len(src))
    ]
    start = time.perf_counter()
    for key, view in zip(keys, src, strict=True):
        store.write_chunk(key, [view])
    store.flush()
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    missing = sum(
        store.read_chunk(key, [view]) is None for key, view in zip(keys, dst, strict=True)
    )
    load_s = time.perf_counter() - start
    if missing:
        raise RuntimeError(f"{missing} of {len(keys)} chunks missing after saving them")
    return save_s, load_s


def measure_remote(
    chunk_bytes: int,
    total_bytes: int,
    workdir: Path,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Raw loopback socket vs kvtier server vs Redis on the same chunks, in GB/s."""
    say = progress or (lambda _: None)
    count = max(1, total_bytes // chunk_bytes)
    src_buf = np.random.default_rng(0).integers(0, 256, count * chunk_bytes, dtype=np.uint8)
    dst_buf = np.zeros_like(src_buf)
    src, dst = _chunks(src_buf, chunk_bytes), _chunks(dst_buf, chunk_bytes)
    say(f"raw loopback socket: {count} x {chunk_bytes} bytes")
    result = {"raw_socket_gbps": raw_socket_gbps(src, dst)}
    # Room for one pass and a little more: the timed pass evicts the warm-up pass and reuses
    # its slots, whose pages are faulted in already (first touch costs ~20x a memcpy here).
    dram = str(int(count * chunk_bytes * 1.1) + (64 << 20))
    say("kvtier server: save and load")
    with ServeProcess("--dram", dram) as server:
        save, load = store_gbps(server.url, src, dst)
    _check_equal(src_buf, dst_buf, "kvtier server")
    result |= {"remote_save_gbps": save, "remote_load_gbps": load}
    dst_buf[:] = 0
    result |= measure_tls(src_buf, dst_buf, chunk_bytes, Path(workdir), say)
    dst_buf[:] = 0
    result |= measure_shm(src_buf, dst_buf, chunk_bytes, say)
    dst_buf[:] = 0
    say("redis: SET and GET")
    with RedisProcess(Path(workdir) / f"redis-{os.getpid()}") as server:
        save, load = store_gbps(server.url, src, dst)
    _check_equal(src_buf, dst_buf, "redis")
    return result | {"redis_save_gbps": save, "redis_load_gbps": load}


def measure_tls(
    src_buf: np.ndarray,
    dst_buf: np.ndarray,
    chunk_bytes: int,
    workdir: Path,
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Save and load GB/s through a `kvtier serve --tls-cert/--tls-key` process on 127.0.0.1
    (a throw-away CA and certificate made in `workdir`); empty without the openssl command."""
    if shutil.which("openssl") is None:
        return {}
    (say or (lambda _: None))("kvtier server over TLS: save and load")
    certs = make_certs(workdir / "certs")
    src, dst = _chunks(src_buf, chunk_bytes), _chunks(dst_buf, chunk_bytes)
    dram = str(int(src_buf.nbytes * 1.1) + (64 << 20))
    tls = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    with ServeProcess("--dram", dram, *tls) as server:
        save, load = store_gbps(server.url, src, dst, certs.ca)
    _check_equal(src_buf, dst_buf, "kvtier server over TLS")
    return {"remote_tls_save_gbps": save, "remote_tls_load_gbps": load}


SHM_DIR = Path("/dev/shm")


def measure_shm(
    src_buf: np.ndarray,
    dst_buf: np.ndarray,
    chunk_bytes: int,
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Save and load GB/s through a `kvtier serve --dram-shm --shm-writes` process on
    127.0.0.1, as an engine process of the node-local server sees it (a remote-only Store):
    saves are PUT_LOCAL + memcpy into the server's DRAM file + COMMIT, loads GET_LOCAL +
    memcpy out of it + RELEASE. Empty without /dev/shm."""
    if not SHM_DIR.is_dir():
        return {}
    (say or (lambda _: None))("kvtier server, shared memory: save and load")
    src, dst = _chunks(src_buf, chunk_bytes), _chunks(dst_buf, chunk_bytes)
    dram = str(int(src_buf.nbytes * 1.1) + (64 << 20))
    with ServeProcess("--dram", dram, "--dram-shm", str(SHM_DIR), "--shm-writes") as server:
        save, load = store_gbps(server.url, src, dst)
    _check_equal(src_buf, dst_buf, "kvtier server (shared memory)")
    return {"shm_save_gbps": save, "shm_load_gbps": load}


def _check_equal(src: np.ndarray, dst: np.ndarray, what: str) -> None:
    if not np.array_equal(src, dst):
        raise RuntimeError(f"{what}: loaded bytes differ from the saved ones")
