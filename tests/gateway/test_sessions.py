"""Stored responses in memory and in a real redis-server: tenant scoping, expiry, restarts,
and concurrent continuations that lose no turn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis

from kvtier.bench.remote_io import RedisProcess
from kvtier.gateway.responses import parse_request, stored
from kvtier.gateway.sessions import (
    MemoryResponseStore,
    RedisResponseStore,
    ResponseStore,
    StoredResponse,
    new_response_id,
)

StoreFactory = Callable[[], ResponseStore]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def response(tenant: str = "acme", text: str = "hi there", **kw: Any) -> StoredResponse:
    history = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": text})
    fields: dict[str, Any] = {
        "id": new_response_id(),
        "tenant": tenant,
        "model": "m",
        "created_at": int(time.time()),
        "history": history,
        "output_text": text,
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
    }
    return StoredResponse(**{**fields, **kw})


@pytest.fixture(params=["memory", "redis"])
def new_store(request: pytest.FixtureRequest, tmp_path: Any) -> StoreFactory:
    if request.param == "memory":
        return MemoryResponseStore
    server: RedisProcess = request.getfixturevalue("redis_server")
    return lambda: RedisResponseStore(server.url)


def test_json_round_trip() -> None:
    """to_json / from_json give back an equal response, non-ASCII text included."""
    r = response(text='Grüße, 世界 \n"quoted"', instructions="be brief")
    assert StoredResponse.from_json(r.to_json()) == r
    assert StoredResponse.from_json(r.to_json().encode()) == r
    with pytest.raises(ValueError, match="not a stored response"):
        StoredResponse.from_json('{"id": "x"}')


def test_put_get_delete_and_tenant_scope(new_store: StoreFactory) -> None:
    """An id put by one tenant is found by it only; delete removes it once."""

    async def check() -> None:
        store = new_store()
        r = response(tenant="a")
        await store.put(r, ttl_s=60)
        assert await store.get("a", r.id) == r
        assert await store.get("b", r.id) is None
        assert await store.get("a", new_response_id()) is None
        assert await store.get("a", "../../etc") is None
        assert not await store.delete("b", r.id)
        assert await store.delete("a", r.id)
        assert not await store.delete("a", r.id)
        assert await store.get("a", r.id) is None
        await store.close()

    run(check())


def test_tenant_names_cannot_collide_in_keys(redis_server: RedisProcess) -> None:
    """Tenants whose names would collide in a naive `resp:{tenant}:{id}` key stay apart."""

    async def check() -> None:
        store = RedisResponseStore(redis_server.url)
        r = response(tenant="x:resp_")
        await store.put(r, ttl_s=60)
        assert await store.get("x", r.id) is None
        assert await store.get("x:resp_", r.id) == r
        await store.close()

    run(check())
    keys = redis.Redis(port=redis_server.port).keys("*")
    assert len(keys) == 1 and keys[0].startswith(b"kvtier:resp:")


def test_redis_entries_expire(redis_server: RedisProcess) -> None:
    """A 1 s TTL entry is there at once and gone within 3 s."""

    async def check() -> float:
        store = RedisResponseStore(redis_server.url)
        r = response()
        await store.put(r, ttl_s=1)
        start = time.monotonic()
        assert await store.get(r.tenant, r.id) == r
        while await store.get(r.tenant, r.id) is not None:
            assert time.monotonic() - start < 3, "entry outlived its TTL"
            await asyncio.sleep(0.05)
        await store.close()
        return time.monotonic() - start

    assert 0.5 < run(check()) < 3


def test_memory_entries_expire_and_stay_bounded() -> None:
    """In memory, entries vanish at their TTL and the oldest go beyond max_entries."""
    now = [1000.0]
    store = MemoryResponseStore(max_entries=3, clock=lambda: now[0])

    async def check() -> None:
        old, rest = response(), [response() for _ in range(4)]
        await store.put(old, ttl_s=1)
        assert await store.get(old.tenant, old.id) == old
        now[0] += 1.0
        assert await store.get(old.tenant, old.id) is None
        for r in rest:
            await store.put(r, ttl_s=10)
        assert len(store) == 3
        assert await store.get(rest[0].tenant, rest[0].id) is None
        assert [await store.get(r.tenant, r.id) for r in rest[1:]] == rest[1:]
        now[0] += 10
        await store.put(response(), ttl_s=10)
        assert len(store) == 1, "expired entries are dropped on put"

    run(check())


def test_a_new_redis_store_sees_what_the_old_one_put(redis_server: RedisProcess) -> None:
    """A gateway restart (a new store object on the same Redis) finds earlier responses."""
    r = response()

    async def put() -> None:
        store = RedisResponseStore(redis_server.url)
        await store.put(r, ttl_s=60)
        await store.close()

    async def get() -> StoredResponse | None:
        store = RedisResponseStore(redis_server.url)
        found = await store.get(r.tenant, r.id)
        await store.close()
        return found

    run(put())
    assert run(get()) == r


def test_concurrent_continuations_lose_no_turn(new_store: StoreFactory) -> None:
    """50 concurrent continuations of one response become 50 branches, each retrievable with
    the root's history plus its own turn."""

    async def check() -> None:
        store = new_store()
        root = response(tenant="t")
        await store.put(root, ttl_s=60)

        async def continue_with(i: int) -> str:
            req = parse_request({"model": "m", "input": f"q{i}", "previous_response_id": root.id})
            previous = await store.get("t", root.id)
            assert previous is not None
            await asyncio.sleep(0)  # let the other continuations interleave
            resp_id = new_response_id()
            await store.put(stored(resp_id, "t", req, previous, f"a{i}", {}, 0), ttl_s=60)
            return resp_id

        ids = await asyncio.gather(*(continue_with(i) for i in range(50)))
        assert len(set(ids)) == 50
        for i, resp_id in enumerate(ids):
            branch = await store.get("t", resp_id)
            assert branch is not None and branch.previous_response_id == root.id
            turn = ({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"})
            assert branch.history == root.history + turn
        assert await store.get("t", root.id) == root, "the continued response is unchanged"
        await store.close()

    run(check())


def test_bad_puts_are_refused(new_store: StoreFactory) -> None:
    """A non-positive TTL or a malformed id raises ValueError instead of storing."""

    async def check() -> None:
        store = new_store()
        with pytest.raises(ValueError, match="ttl_s"):
            await store.put(response(), ttl_s=0)
        with pytest.raises(ValueError, match="response id"):
            await store.put(response(id="resp_x"), ttl_s=5)
        await store.close()

    run(check())
