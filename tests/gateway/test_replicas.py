"""Several gateway replicas over one Redis: sessions and affinities survive a replica's
death and a restart; a tenant never sees another's responses."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tests.gateway.procs import GatewayProcess, SimProcess

from kvtier.bench.remote_io import RedisProcess

TIMEOUT_S = 20.0
SYSTEM = "You are a careful assistant. " * 30  # ~200 tokens


def client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def sims() -> Iterator[SimProcess]:
    with SimProcess("--decode-ms-per-token", "1", count=3) as proc:
        yield proc


@pytest.fixture
def setup(
    sims: SimProcess, redis_server: RedisProcess, tmp_path: Path
) -> Iterator[tuple[list[str], Path, str]]:
    auth = tmp_path / "keys"
    auth.write_text("alice key-alice-123\nbob key-bob-4567\n")
    yield sims.urls, auth, redis_server.url


def replica(setup: tuple[list[str], Path, str]) -> GatewayProcess:
    urls, auth, redis_url = setup
    # round-robin: without Redis affinities the replicas would scatter a conversation
    return GatewayProcess(urls, "--auth-file", str(auth), "--redis", redis_url)


def test_a_conversation_continues_on_any_replica_and_after_a_kill(
    setup: tuple[list[str], Path, str],
) -> None:
    """Turns alternate between replicas; one is kill -9'ed and a new one started; every turn
    finds its predecessor, keeps reusing the prefix, and carries the whole history."""
    a, b = replica(setup), replica(setup)
    try:
        first = client(a, "key-alice-123").responses.create(
            model="sim", instructions=SYSTEM, input="turn 0", max_output_tokens=8
        )
        previous, cached = first, []
        for turn, gw in enumerate([b, a, b], start=1):
            previous = client(gw, "key-alice-123").responses.create(
                model="sim", instructions=SYSTEM, input=f"turn {turn}",
                previous_response_id=previous.id, max_output_tokens=8,
            )  # fmt: skip
            cached.append(previous.usage.input_tokens_details.cached_tokens)  # type: ignore[union-attr]
        a.kill()
        with replica(setup) as c:
            last = client(c, "key-alice-123").responses.create(
                model="sim", instructions=SYSTEM, input="after the kill",
                previous_response_id=previous.id, max_output_tokens=8,
            )  # fmt: skip
            cached.append(last.usage.input_tokens_details.cached_tokens)  # type: ignore[union-attr]
        assert all(n > 200 for n in cached), cached
        assert last.usage.input_tokens > first.usage.input_tokens + 5 * 8  # type: ignore[union-attr]
    finally:
        a.stop()
        b.stop()


def test_another_tenants_response_id_is_404(setup: tuple[list[str], Path, str]) -> None:
    """Bob cannot continue (or learn of) Alice's response."""
    with replica(setup) as gw:
        mine = client(gw, "key-alice-123").responses.create(model="sim", input="private")
        with pytest.raises(openai.NotFoundError):
            client(gw, "key-bob-4567").responses.create(
                model="sim", input="peek", previous_response_id=mine.id
            )


def test_concurrent_continuations_lose_no_turn(setup: tuple[list[str], Path, str]) -> None:
    """Twenty continuations of one response at once, over two replicas: twenty branches,
    each continuable and each carrying the shared history."""
    with replica(setup) as a, replica(setup) as b:
        root = client(a, "key-alice-123").responses.create(model="sim", input="root")
        ids: list[str] = []

        def branch(i: int) -> None:
            gw = (a, b)[i % 2]
            r = client(gw, "key-alice-123").responses.create(
                model="sim", input=f"branch {i}", previous_response_id=root.id
            )
            ids.append(r.id)

        threads = [threading.Thread(target=branch, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 20
        for rid in ids:
            more = client(b, "key-alice-123").responses.create(
                model="sim", input="and then", previous_response_id=rid, max_output_tokens=2
            )
            assert more.usage.input_tokens > root.usage.input_tokens  # type: ignore[union-attr]
