"""CachedModel never stores KV whose rows are not certainly the KV of its tokens, one to one:
generation modes that break that are refused, and a cache that does not match is not saved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.integrations.test_transformers import CHUNK, GREEDY, SIZES, open_store, user_turn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
)

import kvtier
from kvtier.integrations.hf_save import ChunkSaver
from kvtier.integrations.transformers import CachedModel, UnsupportedModel, kv_layout

MODEL_ID = "tiny-llama"  # one id for every copy of the weights: they share stored KV
NEW = 8


def tiny_llama(cls: type[LlamaForCausalLM] = LlamaForCausalLM, **config: Any) -> Any:
    """The tiny random-weight Llama of test_transformers (same seed, same weights)."""
    torch.manual_seed(0)
    return cls(LlamaConfig(**SIZES, **config)).eval()


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[kvtier.Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def next_turn_matches(model: Any, store: kvtier.Store, conv: torch.Tensor) -> int:
    """A plain greedy call on `conv` plus a user turn gives model.generate's tokens and (within
    float rounding) logits; returns its hit."""
    prompt = torch.cat([conv, user_turn(7)], 1)
    cm = CachedModel(model, store, model_id=MODEL_ID)
    opts = {"max_new_tokens": NEW, "return_dict_in_generate": True, "output_logits": True}
    got = cm.generate(prompt, **opts, **GREEDY)
    want = model.generate(prompt, **opts, **GREEDY)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
    assert torch.equal(got.sequences, want.sequences)
    assert cm.last_request is not None
    return cm.last_request.hit_tokens


def first_turn(cm: CachedModel, fallback: Any, **opts: Any) -> tuple[torch.Tensor, str | None]:
    """One call with `opts`; where CachedModel refuses it, the caller's model.generate serves
    it instead. Returns the sequence and the refusal message (None if it was served)."""
    prompt = user_turn(0, 40)
    try:
        out, refused = cm.generate(prompt, **opts), None
    except UnsupportedModel as exc:
        out, refused = fallback.generate(prompt, **opts), str(exc)
    cm.flush()
    return out, refused


def nocache_source(source: str) -> tuple[Any, dict[str, Any]]:
    """A model and call options under which `use_cache` is False, from `source`."""
    if source == "model.config":
        return tiny_llama(use_cache=False), {}
    if source == "passed generation_config":
        return tiny_llama(), {"generation_config": GenerationConfig(use_cache=False)}
    model = tiny_llama()
    if source == "kwarg":
        return model, {"use_cache": False}
    model.generation_config.use_cache = False
    return model, {}


@pytest.mark.parametrize(
    "source", ["kwarg", "model.config", "model.generation_config", "passed generation_config"]
)
def test_use_cache_false_stores_nothing_wrong(model: Any, tmp_path: Path, source: str) -> None:
    """After a use_cache=False request, the next greedy turn equals model.generate, also
    after reopening the store; the request is refused naming use_cache."""
    nocache, opts = nocache_source(source)
    with open_store(tmp_path) as store:
        cm = CachedModel(nocache, store, model_id=MODEL_ID)
        conv, refused = first_turn(cm, nocache, max_new_tokens=NEW, **GREEDY, **opts)
        next_turn_matches(model, store, conv)
    with open_store(tmp_path) as store:
        next_turn_matches(model, store, conv)
    assert refused is not None and "use_cache" in refused
    if source == "model.config":
        assert "model.generation_config.use_cache is False" in refused


def test_use_cache_true_overrides_checkpoint_default(model: Any, store: kvtier.Store) -> None:
    """use_cache=True on a checkpoint saved with use_cache=False is served, equal to
    model.generate(use_cache=True), and its KV is reused by the next turn."""
    nocache = tiny_llama(use_cache=False)
    cm = CachedModel(nocache, store, model_id=MODEL_ID)
    prompt = user_turn(0, 40)
    got = cm.generate(prompt, max_new_tokens=NEW, use_cache=True, **GREEDY)
    assert torch.equal(got, model.generate(prompt, max_new_tokens=NEW, **GREEDY))
    cm.flush()
    assert next_turn_matches(model, store, got) == (40 + NEW - 1) // CHUNK * CHUNK


def tiny_assistant() -> Any:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()


@pytest.mark.parametrize(
    ("option", "value"), [("assistant_model", "tiny"), ("prompt_lookup_num_tokens", 3)]
)
def test_assisted_decoding_stores_nothing_wrong(
    model: Any, store: kvtier.Store, option: str, value: Any
) -> None:
    """Assisted and prompt-lookup decoding over a stored prefix either equal model.generate or
    are refused naming the option; the next greedy turn equals model.generate either way."""
    cm = CachedModel(model, store, model_id=MODEL_ID)
    conv, _ = first_turn(cm, model, max_new_tokens=NEW, **GREEDY)
    prompt = torch.cat([conv, conv[:, 20:32]], 1)  # a repeat: prompt lookup finds candidates
    opts = {option: tiny_assistant() if value == "tiny" else value, **GREEDY}
    try:
        got = cm.generate(prompt, max_new_tokens=NEW, **opts)
        assert torch.equal(got, model.generate(prompt, max_new_tokens=NEW, **opts))
    except UnsupportedModel as exc:
        assert option in str(exc) and "assisted decoding" in str(exc)
        got = model.generate(prompt, max_new_tokens=NEW, **opts)
    cm.flush()
    next_turn_matches(model, store, got)


class RecomputingLlama(LlamaForCausalLM):
    """A real Llama whose generate recomputes the whole sequence at every step (what
    use_cache=False does), hidden from CachedModel's request checks."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return super().generate(*args, **{**kwargs, "use_cache": False})


def test_cache_with_extra_rows_is_not_saved(model: Any, store: kvtier.Store) -> None:
    """A generation path that leaves more cache rows than processed tokens saves nothing and
    is counted in unsafe_saves_skipped; the next turn recomputes and is correct."""
    odd = tiny_llama(RecomputingLlama)
    cm = CachedModel(odd, store, model_id=MODEL_ID)
    conv, refused = first_turn(cm, odd, max_new_tokens=NEW, **GREEDY)
    assert refused is None
    assert next_turn_matches(model, store, conv) == 0
    assert cm.unsafe_saves_skipped == 1 and cm.save_errors == 0


def kv_rows(rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of the tiny Llama's shape, (1, H, rows, D) each."""
    shape = (1, 2, rows, 16)
    return [(torch.randn(shape), torch.randn(shape)) for _ in range(2)]


@pytest.mark.parametrize(
    ("case", "rows", "first"),
    [("extra row", 49, 0), ("missing row", 47, 0), ("prompt rewritten", 48, 1)],
)
def test_guard_skips_and_counts(
    model: Any, store: kvtier.Store, case: str, rows: int, first: int
) -> None:
    """ChunkSaver saves only a cache of exactly len(sequence) - 1 rows per layer whose sequence
    starts with the prompt; anything else stores nothing and is counted."""
    cache = store.bind(MODEL_ID, kv_layout(model))
    saver = ChunkSaver(cache, torch.float32)
    sequence = np.arange(1, 50, dtype=np.int64)  # 49 tokens: 48 rows hold the KV of 3 chunks
    prompt = sequence[:40].copy()
    prompt[0] += first
    assert not saver.submit(prompt, sequence, kv_rows(rows), 0), case
    saver.flush()
    assert cache.lookup(sequence) == 0 and saver.unsafe_skipped == 1
    assert saver.submit(sequence[:40], sequence, kv_rows(48), 0)
    saver.flush()
    assert cache.lookup(sequence) == 48 and saver.unsafe_skipped == 1 and saver.errors == 0
    saver.close()


class StopAtLength(StoppingCriteria):
    """A caller's own stopping criterion: stop once the sequence has `length` tokens."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("num_beams", {"num_beams": 2}),
    ("beam search", {"generation_config": GenerationConfig(num_beams=2, max_new_tokens=NEW)}),
    ("num_return_sequences", {"num_return_sequences": 2, "do_sample": True}),
    ("cache_implementation", {"cache_implementation": "static"}),
    ("past_key_values", {"past_key_values": DynamicCache()}),
    ("position_ids", {"position_ids": torch.arange(40)[None] + 5}),
    ("synced_gpus", {"synced_gpus": True}),
    ("negative_prompt_ids", {"negative_prompt_ids": user_turn(1, 8), "guidance_scale": 1.5}),
    ("custom_generate", {"custom_generate": lambda **_: None}),
    ("token_healing", {"token_healing": True}),
    ("dola", {"dola_layers": "high"}),
]


@pytest.mark.parametrize(("name", "opts"), REFUSED, ids=[name for name, _ in REFUSED])
def test_unknown_modes_refused(
    model: Any, store: kvtier.Store, name: str, opts: dict[str, Any]
) -> None:
    """Every option outside the served allow-list is refused, naming it, and stores nothing."""
    cm = CachedModel(model, store, model_id=MODEL_ID)
    prompt = user_turn(0, 40)
    with pytest.raises(UnsupportedModel, match=name):
        cm.generate(prompt, max_new_tokens=NEW, pad_token_id=0, **opts)
    cm.flush()
    assert cm.cache.lookup(prompt[0].numpy()) == 0


def test_served_options_equal_model_generate(model: Any, store: kvtier.Store) -> None:
    """Options inside the allow-list (stopping criteria, scores, hidden states, sampling) give
    model.generate's output over a stored prefix."""
    cm = CachedModel(model, store, model_id=MODEL_ID)
    conv, _ = first_turn(cm, model, max_new_tokens=NEW, **GREEDY)
    prompt = torch.cat([conv, user_turn(5)], 1)
    opts: dict[str, Any] = {"return_dict_in_generate": True, "output_scores": True}
    opts.update(output_hidden_states=True, max_new_tokens=NEW, **GREEDY)
    stop = StoppingCriteriaList([StopAtLength(prompt.shape[1] + 3)])
    got = cm.generate(prompt, stopping_criteria=stop, **opts)
    assert cm.last_request is not None and cm.last_request.hit_tokens == 2 * CHUNK
    want = model.generate(prompt, stopping_criteria=stop, **opts)
    assert got.sequences.shape[1] == prompt.shape[1] + 3
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-4)
    sample = {"do_sample": True, "top_k": 20, "max_new_tokens": NEW, "pad_token_id": 0}
    torch.manual_seed(3)
    got = cm.generate(prompt, **sample)
    torch.manual_seed(3)
    assert torch.equal(got, model.generate(prompt, **sample))
    assert cm.unsafe_saves_skipped == 0
