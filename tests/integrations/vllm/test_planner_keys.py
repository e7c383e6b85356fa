"""The scheduler side's keys and bypass, on its own (no vLLM scheduler): the salt and LoRA
adapter are in every key, and requests whose token ids do not fix their KV are left alone,
even when a streaming session adds an image to a request kvtier already tracks."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kvtier import Store, StoreConfig
from kvtier.integrations.vllm.plan import Geometry
from kvtier.integrations.vllm.scheduler import ChunkPlanner

CHUNK, BLOCK = 64, 32


@pytest.fixture
def planner() -> Iterator[ChunkPlanner]:
    store = Store(StoreConfig(chunk_tokens=CHUNK, dram_bytes=8 << 20))
    geometry = Geometry(CHUNK, BLOCK)
    yield ChunkPlanner(store, geometry, "m", "fp", 1, lambda req_id: list(range(64)))
    store.close()


def _request(req_id: str, tokens: list[int], **extra: Any) -> SimpleNamespace:
    fields = {"cache_salt": None, "lora_request": None, "mm_features": None,
              "prompt_embeds": None, **extra}  # fmt: skip
    return SimpleNamespace(
        request_id=req_id, all_token_ids=tokens, num_tokens=len(tokens), **fields
    )


def _saved_keys(planner: ChunkPlanner, request: SimpleNamespace) -> list[bytes]:
    """Keys of the chunks a request saves once its whole prompt is computed."""
    planner.matched(request, 0)
    planner.allocated(request, 0)
    step = planner.plan([(request.request_id, request.num_tokens)], [])
    return [c.key for job in step.saves for c in job.chunks]


TOKENS = list(range(200))


def test_salt_and_adapter_are_in_every_key(planner: ChunkPlanner) -> None:
    """Another cache_salt or LoRA adapter gives every chunk another key; the same, the same."""
    plain = _saved_keys(planner, _request("a", TOKENS))
    salted = _saved_keys(planner, _request("b", TOKENS, cache_salt="tenant"))
    lora = SimpleNamespace(lora_name="ad", lora_path="/p")
    adapted = _saved_keys(planner, _request("c", TOKENS, lora_request=lora))
    assert len(plain) == len(salted) == len(adapted) == 3
    assert len(set(plain) | set(salted) | set(adapted)) == 9
    assert _saved_keys(planner, _request("d", TOKENS, cache_salt="tenant")) == salted


@pytest.mark.parametrize(
    "extra", [{"mm_features": [object()]}, {"prompt_embeds": object()}], ids=["mm", "embeds"]
)
def test_multimodal_and_embedding_requests_bypass_kvtier(
    planner: ChunkPlanner, extra: dict[str, Any]
) -> None:
    """A request with images or prompt embeddings is neither offered chunks nor saved."""
    request = _request("x", TOKENS, **extra)
    assert planner.matched(request, 0) == (0, False)
    assert _saved_keys(planner, request) == []
    assert planner.tally.drain()["bypassed"] >= 1


def test_a_tracked_request_that_gains_an_image_stops_saving(planner: ChunkPlanner) -> None:
    """A streaming session may add multimodal input to a live request: from then on kvtier
    neither saves its chunks nor offers it any."""
    request = _request("s", TOKENS)
    planner.matched(request, 0)
    planner.allocated(request, 0)
    first = planner.plan([("s", 64)], [])
    assert [len(job.chunks) for job in first.saves] == [1]
    request.mm_features = [object()]
    later = planner.plan([("s", 200)], [])
    assert later.saves == []
    assert planner.matched(request, 0) == (0, False)
    assert "bypassed" in planner.tally.drain()
