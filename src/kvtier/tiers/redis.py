"""Redis tier: Redis, Valkey or Tair as the shared tier (`remote="redis://h:6379/0"`).

Standalone servers use `redis.Redis`; a URL listing several nodes, or a node with cluster mode
on, uses `redis.cluster.RedisCluster`. Each value is a 32-byte header (magic, payload size,
xxh3-64 of key and payload) followed by the payload, so a corrupt or foreign value is detected,
counted and deleted. Errors are misses. The client is built lazily, always with the token as
password and with `TIMEOUT_S` socket timeouts (per send/recv, so a large value keeps moving);
while Redis is unreachable it is retried after a backoff (1 s doubling to 30 s, reset by the
next reply). Only a rejected password at construction time raises (`AuthError`).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvtier.config import RemoteURL
from kvtier.errors import AuthError
from kvtier.keys import Key
from kvtier.tiers.base import Counters, TierStats, Views, copy_views, total_bytes
from kvtier.tiers.disk import checksum

log = logging.getLogger("kvtier.redis")
MAGIC = b"KVTRDS01"
HEADER = struct.Struct("<8sQQQ")  # magic, payload bytes, checksum, reserved
PREFIX = b"kvtier:"
TIMEOUT_S = 1.0
MAX_VALUE_BYTES = 512 << 20  # Redis's (and Valkey's) largest string value
BACKOFF_S = (1.0, 30.0)  # first wait after a failure, doubling up to the second
_ERRORS = (redis.RedisError, RedisClusterException, OSError)


def _connect(url: RemoteURL, token: str | None) -> Any:
    """A connected client (pinged); raises one of `_ERRORS` when Redis cannot be used."""
    options: dict[str, Any] = {
        "password": token or None,  # a password in a single-node URL wins over the token
        "socket_timeout": TIMEOUT_S,
        "socket_connect_timeout": TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),  # the tier's own backoff decides when to retry
    }
    if len(url.endpoints) > 1:
        nodes = [ClusterNode(ep.host, ep.port) for ep in url.endpoints]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, ssl=url.scheme == "rediss", **options)
    single = redis.Redis.from_url(url.url, **options)
    try:
        cluster = single.info("cluster").get("cluster_enabled") == 1
    except redis.ResponseError as exc:
        if _rejected(exc):
            single.close()
            raise
        cluster = False  # INFO cluster not supported (e.g. a proxy): a standalone server
    except _ERRORS:
        single.close()
        raise
    if not cluster:
        single.ping()
        return single
    single.close()
    return RedisCluster.from_url(url.url, **options)


def _rejected(exc: BaseException) -> bool:
    """Whether a Redis error means the password (token) is wrong or missing."""
    text = str(exc)
    return isinstance(exc, redis.AuthenticationError) or any(
        word in text
        for word in ("NOAUTH", "WRONGPASS", "invalid password", "invalid username", "authenticated")
    )


class RedisTier:
    """The shared tier on Redis; thread-safe; never raises on I/O after construction."""

    name = "remote"
    max_chunk_bytes = MAX_VALUE_BYTES - HEADER.size

    def __init__(self, url: RemoteURL, token: str | None) -> None:
        self.url = url
        self._token = token
        self._where = ",".join(f"{h}:{p}" for h, p in url.endpoints)
        self._lock = threading.Lock()
        self._count = Counters()
        self._db: Any = None
        self._closed = False
        self._retry_at = 0.0
        self._backoff_s = BACKOFF_S[0]
        try:
            self._db = _connect(url, token)
        except _ERRORS as exc:
            if _rejected(exc):
                raise AuthError(
                    f"password rejected by redis {self._where}: set KVTIER_REMOTE_TOKEN (or the "
                    "URL's password) to the server's requirepass"
                ) from exc
            log.warning(
                "kvtier redis tier: %s unusable (%s); misses until it is up", self._where, exc
            )
            self._failed()

    # -- the Tier interface ---------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        db = self._client() if keys else None
        if db is None:
            return 0
        try:
            pipe = db.pipeline(transaction=False)
            for key in keys:
                pipe.exists(PREFIX + key)
            present = pipe.execute()
        except _ERRORS:
            self._failed()
            return 0
        self._answered()
        n = 0
        while n < len(keys) and present[n]:
            n += 1
        return n

    def get_into(self, key: Key, dst: Views) -> bool:
        value = self._call("get", PREFIX + key)
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
        header = HEADER.pack(MAGIC, total_bytes(src), checksum(key, src), 0)
        return bool(self._call("set", PREFIX + key, b"".join([header, *src])))

    def touch(self, keys: Sequence[Key]) -> None:
        """Redis keeps its own LRU (maxmemory-policy); nothing to send."""

    def stats(self) -> TierStats:
        capacity = used = chunks = 0
        info = self._call("info", "memory")
        if isinstance(info, dict) and "used_memory" in info:
            capacity, used = int(info.get("maxmemory", 0)), int(info["used_memory"])
            chunks = int(self._call("dbsize") or 0)
        with self._lock:
            return self._count.snapshot(self.name, capacity, used, chunks)

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            self._closed = True
        if db is not None:
            db.close()

    # -- internals -------------------------------------------------------------------------

    def _call(self, command: str, *args: Any) -> Any:
        """Run one command; None (counted, backing off) when Redis cannot answer."""
        db = self._client()
        if db is None:
            return None
        try:
            result = getattr(db, command)(*args)
        except _ERRORS:
            self._failed()
            return None
        self._answered()
        return result

    def _client(self) -> Any:
        """The client, built now if Redis was unusable before; None while backing off."""
        with self._lock:
            if self._closed or time.monotonic() < self._retry_at:
                return None
            if self._db is not None:
                return self._db
        try:
            db = _connect(self.url, self._token)
        except _ERRORS as exc:
            if _rejected(exc):
                log.warning("kvtier redis tier: %s rejects the token; misses", self._where)
            self._failed()
            return None
        with self._lock:
            if self._db is None and not self._closed:
                self._db, db = db, None
            current = self._db
        if db is not None:
            db.close()  # another thread built one first, or the tier was closed
        return current

    def _answered(self) -> None:
        with self._lock:
            self._backoff_s = BACKOFF_S[0]

    def _failed(self) -> None:
        with self._lock:
            self._count.errors += 1
            self._retry_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_S[1])

    def _counted(
        self, hits: int = 0, misses: int = 0, errors: int = 0, checksum_failures: int = 0
    ) -> None:
        with self._lock:
            self._count.hits += hits
            self._count.misses += misses
            self._count.errors += errors
            self._count.checksum_failures += checksum_failures
