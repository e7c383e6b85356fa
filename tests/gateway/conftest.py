"""Gateway fixtures: a throw-away redis-server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.bench.remote_io import RedisProcess


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    try:
        proc = RedisProcess(tmp_path / "redis")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with proc:
        yield proc
