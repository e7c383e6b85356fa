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
BRANCH = "branch. " * 8  # 64 bytes: 16 of the gateway's tokens
BRANCH_TOKENS = 16


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
    each continuable and each carrying the shared history and its own turn."""
    with replica(setup) as a, replica(setup) as b:
        root = client(a, "key-alice-123").responses.create(model="sim", input="root")

        ids: dict[int, str] = {}

        def branch(i: int) -> None:
            gw = (a, b)[i % 2]
            r = client(gw, "key-alice-123").responses.create(
                model="sim", input=BRANCH * (i + 1), previous_response_id=root.id,
                max_output_tokens=2,
            )  # fmt: skip
            ids[i] = r.id

        threads = [threading.Thread(target=branch, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(ids) == list(range(20)) and len(set(ids.values())) == 20
        sizes = []
        for i in range(20):
            more = client(b, "key-alice-123").responses.create(
                model="sim", input="and then", previous_response_id=ids[i], max_output_tokens=2
            )
            sizes.append(more.usage.input_tokens)  # type: ignore[union-attr]
        # Each continuation carries the root and its own branch's turn, no other branch's:
        # branch i's input is i + 1 times BRANCH_TOKENS long.
        assert [n - sizes[0] for n in sizes] == [BRANCH_TOKENS * i for i in range(20)], sizes
        assert sizes[0] > root.usage.input_tokens + BRANCH_TOKENS  # type: ignore[union-attr]


def test_a_continuation_follows_its_own_turn_not_the_users_latest(
    setup: tuple[list[str], Path, str],
) -> None:
    """With `user` set, a continuation still goes where the turn it continues went, though
    the same user's other conversations have moved their binding since (another replica,
    no KV events: only the affinities in Redis can tell)."""
    with replica(setup) as a, replica(setup) as b:
        alice_a, alice_b = client(a, "key-alice-123"), client(b, "key-alice-123")
        cached = []
        for k in range(3):
            first = alice_a.responses.create(
                model="sim", instructions=f"{k} {SYSTEM}", input="hello", user="u",
                max_output_tokens=2,
            )  # fmt: skip
            for other in range(3):  # the same user's other conversations, other prefixes
                alice_a.responses.create(
                    model="sim", instructions=f"other {k} {other} {SYSTEM}", input="hi",
                    user="u", max_output_tokens=2,
                )  # fmt: skip
            for other in range(k + 1):  # B's own traffic: its ties fall elsewhere each time
                alice_b.responses.create(
                    model="sim", input=f"b {k} {other} {SYSTEM}", max_output_tokens=2
                )
            second = alice_b.responses.create(
                model="sim", instructions=f"{k} {SYSTEM}", input="and then", user="u",
                previous_response_id=first.id, max_output_tokens=2,
            )  # fmt: skip
            cached.append(second.usage.input_tokens_details.cached_tokens)  # type: ignore[union-attr]
        assert all(n > 200 for n in cached), cached
