"""StoreConfig and the parsing of sizes, URLs and KVTIER_* variables; bad input is explained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvtier
from kvtier.config import parse_remote, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 << 30),
        ("500G", 500 * 10**9),
        ("64MiB", 64 << 20),
        ("64mib", 64 << 20),
        ("4096", 4096),
        (" 2 KiB ", 2048),
        ("1.5GiB", 3 << 29),
        ("10kb", 10_000),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    """Sizes accept binary and decimal units, any case, and plain bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8 GiBs", "1e9", "-5", "eight", "8 PiB", "5,000"])
def test_parse_size_rejects_garbage(text: str) -> None:
    """Unparsable size strings name the bad value and show good examples."""
    with pytest.raises(kvtier.ConfigError, match=r"cannot parse .*8GiB"):
        parse_size(text, "dram_bytes")


@pytest.mark.parametrize("value", [0, -1, "0", "0.0001"])
def test_parse_size_rejects_non_positive(value: int | str) -> None:
    """Zero and negative sizes are refused, naming the option."""
    with pytest.raises(kvtier.ConfigError, match="dram_bytes: must be positive"):
        parse_size(value, "dram_bytes")


def test_bool_is_not_a_size() -> None:
    """True is not silently read as one byte."""
    with pytest.raises(kvtier.ConfigError, match="expected a size"):
        parse_size(True)


def test_sizes_are_normalised(tmp_path: Path) -> None:
    """String sizes become ints; disk_dir becomes a Path that exists."""
    config = kvtier.StoreConfig(dram_bytes="1MiB", disk_dir=str(tmp_path / "d"), disk_bytes="2M")
    assert config.dram_bytes == 1 << 20
    assert config.disk_bytes == 2 * 10**6
    assert config.disk_dir == tmp_path / "d"
    assert (tmp_path / "d").is_dir()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dram_bytes": 0}, "dram_bytes: must be positive"),
        ({"dram_bytes": -(1 << 20)}, "dram_bytes: must be positive"),
        ({"dram_bytes": "lots"}, "dram_bytes: cannot parse"),
        ({"dram_bytes": 1 << 60}, "more than this machine's"),
        ({"chunk_tokens": 0}, "chunk_tokens: must be in"),
        ({"chunk_tokens": 1 << 20}, "chunk_tokens: must be in"),
        ({"chunk_tokens": 2.5}, "chunk_tokens: expected an int"),
        ({"io_workers": 0}, "io_workers: must be in"),
        ({"io_nice": 20}, "io_nice: must be an int in 0..19"),
        ({"io_nice": -1}, "io_nice: must be an int in 0..19"),
        ({"disk_bytes": "1GiB"}, "disk_bytes is set but disk_dir is not"),
        ({"remote": "http://x"}, "unknown scheme"),
        ({"remote": "kvtier://host"}, "bad host:port"),
        ({"remote": "kvtier://h:99999"}, "bad host:port"),
        ({"remote": "kvtier://h:7400,:7401"}, "bad host:port"),
    ],
)
def test_bad_config_is_a_clear_error(fields: dict[str, object], message: str) -> None:
    """Each invalid setting raises a ConfigError (a ValueError) saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        kvtier.StoreConfig(**fields)  # type: ignore[arg-type]


def test_disk_dir_errors(tmp_path: Path) -> None:
    """disk_dir without disk_bytes, under a regular file, or bigger than its file system."""
    with pytest.raises(kvtier.ConfigError, match="disk_dir is set but disk_bytes is not"):
        kvtier.StoreConfig(disk_dir=tmp_path)
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(kvtier.ConfigError, match="disk_dir: cannot create"):
        kvtier.StoreConfig(disk_dir=plain / "sub", disk_bytes="1MiB")
    st = os.statvfs(tmp_path)
    too_big = st.f_blocks * st.f_frsize + 1
    with pytest.raises(kvtier.ConfigError, match=r"more than the .* file system"):
        kvtier.StoreConfig(disk_dir=tmp_path, disk_bytes=too_big)


def test_remote_urls_parse() -> None:
    """Good remote URLs give their endpoints."""
    url = parse_remote("kvtier://h1:7400,[::1]:7401")
    assert url.scheme == "kvtier"
    assert [(e.host, e.port) for e in url.endpoints] == [("h1", 7400), ("::1", 7401)]
    assert parse_remote("redis://:pw@r:6379/0").endpoints[0].port == 6379


def test_from_env(tmp_path: Path) -> None:
    """KVTIER_* variables set every field; off switches a tier off; overrides win."""
    env = {
        "KVTIER_CHUNK_TOKENS": "64",
        "KVTIER_DRAM": "2MiB",
        "KVTIER_DISK_DIR": str(tmp_path),
        "KVTIER_DISK": "1MiB",
        "KVTIER_REMOTE": "kvtier://127.0.0.1:7400",
        "KVTIER_IO_WORKERS": "3",
        "KVTIER_IO_NICE": "0",
    }
    config = kvtier.StoreConfig.from_env(env)
    assert (config.chunk_tokens, config.dram_bytes, config.disk_bytes) == (64, 2 << 20, 1 << 20)
    assert config.disk_dir == tmp_path
    assert config.remote == "kvtier://127.0.0.1:7400"
    assert config.io_workers == 3
    assert config.io_nice == 0
    assert kvtier.StoreConfig.from_env({"KVTIER_DRAM": "off"}).dram_bytes is None
    assert kvtier.StoreConfig.from_env(env, chunk_tokens=16).chunk_tokens == 16
    assert kvtier.StoreConfig.from_env({}) == kvtier.StoreConfig()


def test_from_env_errors() -> None:
    """Bad environment values are explained, naming the variable or field."""
    with pytest.raises(kvtier.ConfigError, match="KVTIER_CHUNK_TOKENS: expected an integer"):
        kvtier.StoreConfig.from_env({"KVTIER_CHUNK_TOKENS": "many"})
    with pytest.raises(kvtier.ConfigError, match="dram_bytes: cannot parse"):
        kvtier.StoreConfig.from_env({"KVTIER_DRAM": "big"})


def test_remote_token_is_not_in_repr() -> None:
    """The remote auth token never appears in a config's repr."""
    config = kvtier.StoreConfig(remote="kvtier://127.0.0.1:7400", remote_token="s3cret")
    assert "s3cret" not in repr(config)


def test_dram_smaller_than_a_page_is_refused() -> None:
    """dram_bytes below one page is a ConfigError naming the minimum."""
    with pytest.raises(kvtier.ConfigError, match="at least 4096"):
        kvtier.StoreConfig(dram_bytes=100)


def test_dram_shm(tmp_path: Path) -> None:
    """dram_shm takes a writable directory (also from KVTIER_DRAM_SHM) and becomes a Path;
    it needs a DRAM tier, an existing directory and room there for dram_bytes."""
    config = kvtier.StoreConfig(dram_bytes="1MiB", dram_shm=str(tmp_path))
    assert config.dram_shm == tmp_path
    from_env = kvtier.StoreConfig.from_env({"KVTIER_DRAM_SHM": str(tmp_path)})
    assert from_env.dram_shm == tmp_path
    assert kvtier.StoreConfig().dram_shm is None
    with pytest.raises(kvtier.ConfigError, match="dram_shm is set but dram_bytes is not"):
        kvtier.StoreConfig(dram_bytes=None, dram_shm=tmp_path)
    with pytest.raises(kvtier.ConfigError, match=r"dram_shm: .* is not a writable directory"):
        kvtier.StoreConfig(dram_shm=tmp_path / "missing")


def test_dram_shm_without_room_is_a_clear_error() -> None:
    """A DRAM tier larger than what /dev/shm (a tmpfs, at most this machine's memory) has
    free is refused at once, not a SIGBUS later."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    st = os.statvfs(shm)
    free = st.f_bavail * st.f_frsize
    if free + (1 << 20) > kvtier.config._physical_memory_bytes():
        pytest.skip("/dev/shm has as much room as this machine has memory")
    with pytest.raises(kvtier.ConfigError, match=r"dram_shm: dram_bytes .* more than the"):
        kvtier.StoreConfig(dram_bytes=free + (1 << 20), dram_shm=shm)


def test_pin_fraction() -> None:
    """pin_fraction is a share from 0 to 1, also from KVTIER_PIN_FRACTION (off: 0); anything
    else is a ConfigError naming the field and the range."""
    assert kvtier.StoreConfig().pin_fraction == 0.5
    assert kvtier.StoreConfig.from_env({"KVTIER_PIN_FRACTION": "0.25"}).pin_fraction == 0.25
    assert kvtier.StoreConfig.from_env({"KVTIER_PIN_FRACTION": "off"}).pin_fraction == 0.0
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(kvtier.ConfigError, match="pin_fraction: expected a number from 0 to 1"):
            kvtier.StoreConfig(pin_fraction=bad)  # type: ignore[arg-type]
