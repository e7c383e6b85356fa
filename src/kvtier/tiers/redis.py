"""Redis tier: Redis, Valkey or Tair as the shared tier (`remote="redis://h:6379/0"`).

Standalone servers use `redis.Redis`; a URL listing several nodes, or a node with cluster mode
on, uses `redis.cluster.RedisCluster`. Each value is a 32-byte header (magic, payload size,
xxh3-64 of key and payload) followed by the payload, so a corrupt or foreign value is detected,
counted and deleted. Errors are misses; an unreachable server is retried after a backoff.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from kvtier.config import RemoteURL
from kvtier.errors import AuthError
from kvtier.keys import Key
from kvtier.tiers.base import Counters, TierStats, Views, copy_views, total_bytes
from kvtier.tiers.disk import checksum

log = logging.getLogger("kvtier.redis")
MAGIC = b"KVTRDS01"
HEADER = struct.Struct("<8sQQQ")  # magic, payload bytes, checksum, reserved
PREFIX = b"kvtier:"
BACKOFF_S = 1.0


def _client(url: RemoteURL, token: str | None) -> Any:
    password = token or None
    if len(url.endpoints) > 1:
        nodes = [ClusterNode(ep.host, ep.port) for ep in url.endpoints]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, password=password, socket_timeout=5.0)
    single = redis.Redis.from_url(
        url.url, password=password, socket_timeout=5.0, socket_connect_timeout=2.0
    )  # a password in the URL wins over the token
    try:
        cluster = single.info("cluster").get("cluster_enabled") == 1
    except redis.AuthenticationError:
        raise
    except redis.RedisError:
        return single
    if not cluster:
        return single
    single.close()
    return RedisCluster.from_url(url.url, password=password, socket_timeout=5.0)


class RedisTier:
    """The shared tier on Redis; thread-safe; never raises on I/O after construction."""

    name = "remote"

    def __init__(self, url: RemoteURL, token: str | None) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._count = Counters()
        self._retry_at = 0.0
        where = ",".join(f"{h}:{p}" for h, p in url.endpoints)
        try:
            self._db = _client(url, token)
            self._db.ping()
        except redis.AuthenticationError as exc:
            raise AuthError(
                f"token rejected by redis {where}; check KVTIER_REMOTE_TOKEN or the URL's password"
            ) from exc
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise AuthError(f"redis {where} needs a password; set KVTIER_REMOTE_TOKEN") from exc
            raise
        except (redis.RedisError, OSError) as exc:
            log.warning("kvtier redis tier: %s unreachable (%s); misses until it is up", where, exc)
            self._db = redis.Redis.from_url(url.url) if len(url.endpoints) == 1 else None
            self._down()

    # -- the Tier interface ---------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        if not keys or not self._up():
            return 0
        try:
            pipe = self._db.pipeline(transaction=False)
            for key in keys:
                pipe.exists(PREFIX + key)
            present = pipe.execute()
        except (redis.RedisError, OSError):
            self._failed()
            return 0
        n = 0
        while n < len(keys) and present[n]:
            n += 1
        return n

    def get_into(self, key: Key, dst: Views) -> bool:
        value = self._call("get", PREFIX + key) if self._up() else None
        if not value:
            self._counted(misses=1)
            return False
        view = memoryview(value)
        magic, nbytes, digest, _ = HEADER.unpack(
            bytes(view[: HEADER.size]).ljust(HEADER.size, b"\0")
        )
        payload = view[HEADER.size :]
        if nbytes != total_bytes(dst):
            self._counted(misses=1)  # asked for another size: a miss, the value is fine
            return False
        if magic != MAGIC or nbytes != payload.nbytes or checksum(key, [payload]) != digest:
            self._counted(misses=1, checksum_failures=1)
            self._call("delete", PREFIX + key)
            return False
        copy_views([payload], dst)
        self._counted(hits=1)
        return True

    def put(self, key: Key, src: Views) -> bool:
        if not self._up():
            return False
        header = HEADER.pack(MAGIC, total_bytes(src), checksum(key, src), 0)
        return bool(self._call("set", PREFIX + key, b"".join([header, *src])))

    def touch(self, keys: Sequence[Key]) -> None:
        """Redis keeps its own LRU (maxmemory-policy); nothing to send."""

    def stats(self) -> TierStats:
        capacity = used = chunks = 0
        info = self._call("info", "memory") if self._up() else None
        if isinstance(info, dict) and "used_memory" in info:
            capacity, used = int(info.get("maxmemory", 0)), int(info["used_memory"])
            chunks = int(self._call("dbsize") or 0)
        with self._lock:
            c = self._count
            return TierStats(
                self.name,
                capacity,
                used,
                chunks,
                c.hits,
                c.misses,
                c.evictions,
                c.errors,
                c.checksum_failures,
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    # -- internals -------------------------------------------------------------------------

    def _call(self, command: str, *args: Any) -> Any:
        try:
            return getattr(self._db, command)(*args)
        except (redis.RedisError, OSError):
            self._failed()
            return None

    def _up(self) -> bool:
        with self._lock:
            return self._db is not None and time.monotonic() >= self._retry_at

    def _failed(self) -> None:
        self._counted(errors=1)
        self._down()

    def _down(self) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + BACKOFF_S

    def _counted(
        self, hits: int = 0, misses: int = 0, errors: int = 0, checksum_failures: int = 0
    ) -> None:
        with self._lock:
            self._count.hits += hits
            self._count.misses += misses
            self._count.errors += errors
            self._count.checksum_failures += checksum_failures
