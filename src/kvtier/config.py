"""StoreConfig and the parsing of sizes, paths, URLs and KVTIER_* environment variables.

This is the only module that reads the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from kvtier.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MAX_CHUNK_TOKENS = 1 << 16
MIN_DRAM_BYTES = 4096
REMOTE_SCHEMES = ("kvtier", "kvtiers", "redis", "rediss")


def parse_size(value: int | str, name: str = "size") -> int:
    """Bytes from `8GiB`, `500G`, `64MiB`, `4096` or an int; raises ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size like 8GiB, 500G or 4096, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"{name}: cannot parse {value!r}; use bytes or a unit: 8GiB, 500G, 64MiB, 4096"
            )
        number = int(float(match.group(1)) * _UNITS[unit])
    if number <= 0:
        raise ConfigError(f"{name}: must be positive, got {value!r}")
    return number


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Endpoint(NamedTuple):
    host: str
    port: int


class RemoteURL(NamedTuple):
    """A parsed `remote=` URL: `kvtier://h1:7400,h2:7400` (`kvtiers://` for TLS) or
    `redis://h:6379/0`."""

    scheme: str
    endpoints: tuple[Endpoint, ...]
    url: str


def parse_remote(url: str) -> RemoteURL:
    """Validate a remote URL; raises ConfigError saying what a good one looks like."""
    hint = (
        "use kvtier://host:port[,host:port...] (kvtiers:// for TLS) or redis://host:port/db "
        "(rediss:// for TLS)"
    )
    parts = urlsplit(url)
    if parts.scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"remote: unknown scheme in {url!r}; {hint}")
    netloc = parts.netloc.rpartition("@")[2]
    endpoints = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"remote: bad host:port {item!r} in {url!r}; {hint}")
        endpoints.append(Endpoint(host.strip("[]"), int(port)))
    return RemoteURL(parts.scheme, tuple(endpoints), url)


def _check_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"disk_dir: cannot create {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"disk_dir: {path} is not writable; choose a directory you can write")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Everything a Store needs. `None` switches a tier off.

    Sizes accept ints or strings like `8GiB`; they are normalised to ints.

    `dram_bytes=None` with a lower tier: saves are staged in a small pool of io_workers + 2
    chunk slots, sized to the largest chunk bound (e.g. 4 x 32 MiB for Llama-3-8B bf16 at 256
    tokens with the default 2 workers), so memory stays small; a save then waits while every
    slot is still being written.

    `dram_shm`: a directory on a memory file system (e.g. `/dev/shm`) to hold the DRAM tier in
    a shared file instead of anonymous memory, so a cache server can let clients of the same
    user on this host load chunks straight from it (see docs/server.md). Off by default.

    `disk_admit_after`: a chunk goes to the disk tier once it has been used this many times
    (saved, or hit in DRAM); 1 writes every save through to disk, 2 keeps chunks used only
    once off the disk (see kvtier/admission.py).

    `remote_ca`: a PEM file of the CA certificate(s) that signed the cache servers'
    certificates, for `remote="kvtiers://..."`; None trusts the system's default CAs.

    `pin_fraction`: at most this fraction of each local tier's capacity may hold pinned chunks
    (`BoundCache.pin`); a pin beyond it is refused with `PinRefused`. 0 switches pinning off.

    `io_nice`: the background I/O threads (write-behind to disk and the remote tier, prefetch)
    run this much below the CPU priority of the process (0..19, Linux), so that they yield the
    cores to the engine's compute; loads a caller waits for are not lowered.
    """

    chunk_tokens: int = 256
    dram_bytes: int | str | None = 1 << 30
    disk_dir: str | Path | None = None
    disk_bytes: int | str | None = None
    remote: str | None = None
    remote_token: str | None = field(default=None, repr=False)
    io_workers: int = 2
    dram_shm: str | Path | None = None
    disk_admit_after: int = 1
    remote_ca: str | Path | None = None
    pin_fraction: float = 0.5
    io_nice: int = 19

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int):
            raise ConfigError(f"chunk_tokens: expected an int, got {self.chunk_tokens!r}")
        if not 0 < self.chunk_tokens <= MAX_CHUNK_TOKENS:
            raise ConfigError(
                f"chunk_tokens: must be in 1..{MAX_CHUNK_TOKENS}, got {self.chunk_tokens}"
            )
        if not isinstance(self.io_workers, int) or not 1 <= self.io_workers <= 64:
            raise ConfigError(f"io_workers: must be in 1..64, got {self.io_workers!r}")
        nice = self.io_nice
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ConfigError(f"io_nice: must be an int in 0..19, got {nice!r}")
        admit = self.disk_admit_after
        if isinstance(admit, bool) or not isinstance(admit, int) or admit < 1:
            raise ConfigError(
                f"disk_admit_after: must be an int >= 1 (1: every save goes to disk, 2: only "
                f"chunks used twice), got {admit!r}"
            )
        ram = _physical_memory_bytes()
        if self.dram_bytes is not None:
            dram = parse_size(self.dram_bytes, "dram_bytes")
            if dram < MIN_DRAM_BYTES:
                raise ConfigError(
                    f"dram_bytes: {dram} is too small; give at least {MIN_DRAM_BYTES} bytes "
                    "(one page), or None for no DRAM tier"
                )
            if dram > ram:
                raise ConfigError(
                    f"dram_bytes: {dram} bytes is more than this machine's {ram} bytes of memory"
                )
            object.__setattr__(self, "dram_bytes", dram)
        self._check_disk()
        self._check_shm()
        self._check_pin_fraction()
        if self.remote is not None:
            parse_remote(self.remote)
        self._check_ca()

    def _check_disk(self) -> None:
        if self.disk_dir is None:
            if self.disk_bytes is not None:
                raise ConfigError("disk_bytes is set but disk_dir is not; set both or neither")
            return
        if self.disk_bytes is None:
            raise ConfigError("disk_dir is set but disk_bytes is not; give a size like 100GiB")
        path = Path(self.disk_dir).expanduser()
        _check_dir(path)
        disk = parse_size(self.disk_bytes, "disk_bytes")
        total = os.statvfs(path).f_blocks * os.statvfs(path).f_frsize
        if disk > total:
            raise ConfigError(
                f"disk_bytes: {disk} bytes is more than the {total} bytes of the file system "
                f"holding {path}"
            )
        object.__setattr__(self, "disk_dir", path)
        object.__setattr__(self, "disk_bytes", disk)

    def _check_shm(self) -> None:
        if self.dram_shm is None:
            return
        if self.dram_bytes is None:
            raise ConfigError("dram_shm is set but dram_bytes is not; give a DRAM size or unset it")
        path = Path(self.dram_shm).expanduser()
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"dram_shm: {path} is not a writable directory; give a memory file system "
                "you can write, e.g. /dev/shm"
            )
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if int(self.dram_bytes) > free:
            raise ConfigError(
                f"dram_shm: dram_bytes ({self.dram_bytes}) is more than the {free} bytes free "
                f"in {path}; lower dram_bytes or grow that file system (docker run --shm-size)"
            )
        object.__setattr__(self, "dram_shm", path)

    def _check_ca(self) -> None:
        if self.remote_ca is None:
            return
        scheme = None if self.remote is None else parse_remote(self.remote).scheme
        if scheme not in (None, "kvtiers"):
            raise ConfigError(
                f"remote_ca is set but remote is {self.remote!r}: the CA is for kvtiers:// "
                "(a kvtier server with TLS); use remote='kvtiers://host:port' or unset it"
            )
        path = Path(self.remote_ca).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(
                f"remote_ca: {path} is not a readable file; give the PEM file of the CA that "
                "signed the server's certificate (KVTIER_REMOTE_CA)"
            )
        object.__setattr__(self, "remote_ca", path)

    def _check_pin_fraction(self) -> None:
        value: object = 0.0 if self.pin_fraction is None else self.pin_fraction  # env "off"
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = -1.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(
                f"pin_fraction: expected a number from 0 to 1 (the share of each tier pinned "
                f"chunks may take), got {self.pin_fraction!r}"
            )
        object.__setattr__(self, "pin_fraction", float(value))

    @property
    def remote_url(self) -> RemoteURL | None:
        return None if self.remote is None else parse_remote(self.remote)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> StoreConfig:
        """A config from KVTIER_* variables (KVTIER_DRAM=off switches a tier off)."""
        env = os.environ if env is None else env
        text = {name: env[var] for name, var in _ENV_FIELDS.items() if var in env}
        return cls.from_text(text, **overrides)

    @classmethod
    def from_text(cls, text: Mapping[str, str], **overrides: object) -> StoreConfig:
        """A config from fields given as text, as KVTIER_* variables and the command-line
        options that default to them give them: "", "off" or "none" switches a field off (a
        tier; pinning; disk_admit_after: every save goes to disk). `overrides` that are not
        None are taken as they are. ConfigError names the variable or field."""
        values = {name: _from_text(name, raw) for name, raw in text.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)  # type: ignore[arg-type]


_ENV_FIELDS = {
    "chunk_tokens": "KVTIER_CHUNK_TOKENS",
    "dram_bytes": "KVTIER_DRAM",
    "disk_dir": "KVTIER_DISK_DIR",
    "disk_bytes": "KVTIER_DISK",
    "remote": "KVTIER_REMOTE",
    "remote_token": "KVTIER_REMOTE_TOKEN",
    "io_workers": "KVTIER_IO_WORKERS",
    "dram_shm": "KVTIER_DRAM_SHM",
    "disk_admit_after": "KVTIER_DISK_ADMIT_AFTER",
    "remote_ca": "KVTIER_REMOTE_CA",
    "pin_fraction": "KVTIER_PIN_FRACTION",
    "io_nice": "KVTIER_IO_NICE",
}


def env_default(var: str, default: str | None = None) -> str | None:
    """The value of a KVTIER_* variable, for CLI option defaults."""
    return os.environ.get(var, default)


def _from_text(name: str, raw: str) -> object:
    """One field's value from its text (see `StoreConfig.from_text`)."""
    var = _ENV_FIELDS[name]
    off = raw.lower() in ("", "off", "none")
    if name == "disk_admit_after":  # off: no admission, every save goes to disk
        return 1 if off else _int_env(var, raw)
    if name in ("chunk_tokens", "io_workers", "io_nice"):
        return _int_env(var, raw)
    return None if off else raw


def _int_env(var: str, raw: object) -> int:
    try:
        return int(str(raw))
    except ValueError as exc:
        raise ConfigError(f"{var}: expected an integer, got {raw!r}") from exc


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_columns(path: str | Path, what: str) -> Iterator[tuple[str, list[str]]]:
    """The lines of a whitespace-separated file (`#` starts a comment, blank lines skipped),
    each as (where, columns): `where` is "WHAT PATH:LINE" for error messages. ConfigError when
    the file cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror}") from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield f"{what} {path}:{number}", line.split()
