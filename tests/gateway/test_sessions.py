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
    assert len([k for k in keys if k.startswith(b"kvtier:resp:")]) == 1
    assert all(k.startswith((b"kvtier:resp:", b"kvtier:msg:")) and b"x:" not in k for k in keys)


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


def _conversation(turns: int, turn_bytes: int, tenant: str = "acme") -> list[StoredResponse]:
    """The responses of one conversation, each holding every turn so far."""
    history: tuple[dict[str, str], ...] = ()
    out = []
    for t in range(turns):
        user = {"role": "user", "content": f"question {t} " + "q" * turn_bytes}
        answer = {"role": "assistant", "content": f"answer {t} " + "a" * turn_bytes}
        history = (*history, user, answer)
        out.append(response(tenant, answer["content"], history=history))
    return out


def test_redis_keeps_each_message_once(redis_server: RedisProcess) -> None:
    """A 40-turn conversation's entries hold each message once: its bytes in Redis grow
    with its turns, not their square, and every turn reads back whole."""
    conversation = _conversation(40, 2000)
    r = redis.Redis(port=redis_server.port)
    r.flushall()

    async def check() -> list[StoredResponse | None]:
        store = RedisResponseStore(redis_server.url)
        for turn in conversation:
            await store.put(turn, ttl_s=60)
        found = [await store.get(turn.tenant, turn.id) for turn in conversation]
        await store.close()
        return found

    assert run(check()) == conversation
    stored = sum(int(r.strlen(k)) for k in r.keys("*"))
    messages = sum(len(m["content"]) for m in conversation[-1].history)
    whole = sum(len(m["content"]) for turn in conversation for m in turn.history)
    assert stored < 2 * messages < 0.1 * whole


def test_a_message_lives_as_long_as_the_longest_lived_response_holding_it(
    redis_server: RedisProcess,
) -> None:
    """A message held by a 60 s response and by a 1 s one outlives the 1 s one, whichever
    was put first; a response one of whose messages is gone reads as None."""

    async def check() -> tuple[bool, bool, StoredResponse | None]:
        store = RedisResponseStore(redis_server.url)
        first, second = _conversation(2, 10)
        short_before = response(history=first.history)
        await store.put(short_before, ttl_s=1)
        await store.put(first, ttl_s=60)
        await store.put(second, ttl_s=60)
        await store.put(response(history=second.history), ttl_s=1)  # never shortens them
        await asyncio.sleep(1.3)
        kept = await store.get(first.tenant, first.id) == first
        kept_second = await store.get(second.tenant, second.id) == second
        gone = await store.get(short_before.tenant, short_before.id)
        r = redis.Redis(port=redis_server.port)
        r.delete(*r.keys("kvtier:msg:*")[:1])
        broken = await store.get(second.tenant, second.id)
        await store.close()
        return kept and kept_second, gone is None, broken

    kept, gone, broken = run(check())
    assert kept and gone and broken is None


def test_entries_of_older_gateways_still_read(redis_server: RedisProcess) -> None:
    """A response stored whole (as gateways before the message ids did) reads back."""
    r = response()
    store = RedisResponseStore(redis_server.url)
    redis.Redis(port=redis_server.port).set(store.key(r.tenant, r.id), r.to_json(), px=60_000)

    async def get() -> StoredResponse | None:
        found = await store.get(r.tenant, r.id)
        await store.close()
        return found

    assert run(get()) == r


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
