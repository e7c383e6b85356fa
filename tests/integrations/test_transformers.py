"""CachedModel: greedy outputs and logits with stored KV match the model without kvtier."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import kvtier
from kvtier.demo import timed_generate
from kvtier.integrations.transformers import CachedModel, UnsupportedModel

CHUNK = 16
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "dtype": "float32",
}
GREEDY = {"do_sample": False, "pad_token_id": 0}


def tiny(kind: str) -> Any:
    """A tiny random-weight model built from a config (no downloads)."""
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> Any:
    return tiny(request.param)


def open_store(tmp_path: Path, dram: bool = True, cls: type[kvtier.Store] = kvtier.Store) -> Any:
    return cls(
        kvtier.StoreConfig(
            chunk_tokens=CHUNK,
            dram_bytes=8 << 20 if dram else None,
            disk_dir=tmp_path / "disk",
            disk_bytes=64 << 20,
        )
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[kvtier.Store]:
    s = open_store(tmp_path)
    yield s
    s.close()


def user_turn(turn: int, tokens: int = 21) -> torch.Tensor:
    """Deterministic synthetic user tokens, (1, tokens)."""
    rng = np.random.default_rng(turn)
    return torch.from_numpy(rng.integers(1, 256, size=(1, tokens)))


def talk(cm: CachedModel, model: Any, turns: int, conv: torch.Tensor | None = None) -> torch.Tensor:
    """Run `turns` turns with and without kvtier; asserts equal greedy outputs each turn."""
    for turn in range(turns):
        prompt = user_turn(turn) if conv is None else torch.cat([conv, user_turn(turn)], 1)
        want = model.generate(prompt, max_new_tokens=6, **GREEDY)
        got = cm.generate(prompt, max_new_tokens=6, **GREEDY)
        assert torch.equal(got, want), f"turn {turn}: outputs differ"
        cm.flush()
        conv = got
    assert conv is not None
    return conv


@pytest.mark.parametrize("dram", [True, False])
def test_multi_turn_greedy_identical(model: Any, tmp_path: Path, dram: bool) -> None:
    """Greedy outputs with kvtier equal the model's own over a multi-turn conversation."""
    with open_store(tmp_path, dram=dram) as store:
        cm = CachedModel(model, store)
        talk(cm, model, 4)
        last = cm.last_request
        assert last is not None and last.hit_tokens >= 4 * CHUNK
        assert last.hit_tier == ("dram" if dram else "disk")
        assert cm.save_errors == 0
        cm.close()


def first_logits(out: Any) -> torch.Tensor:
    return out.logits[0][0]


def test_logits_bit_identical_to_resident_prefix(model: Any, store: kvtier.Store) -> None:
    """Logits after loading equal those with the prefix resident in a DynamicCache, bit for
    bit, and are within 1e-4 of full recomputation."""
    turn1 = user_turn(0, 40)
    prompt = torch.cat([turn1, user_turn(1, 10)], 1)
    resident = DynamicCache(config=model.config)
    model.generate(turn1, past_key_values=resident, max_new_tokens=1, **GREEDY)
    resident.crop(-(resident.get_seq_length() - 2 * CHUNK))
    cm = CachedModel(model, store)
    cm.generate(turn1, max_new_tokens=1, **GREEDY)
    cm.flush()
    opts: dict[str, Any] = {"max_new_tokens": 1, "output_logits": True}
    opts.update(return_dict_in_generate=True, **GREEDY)
    got = first_logits(cm.generate(prompt, **opts))
    assert cm.last_request is not None and cm.last_request.hit_tokens == 2 * CHUNK
    want = first_logits(model.generate(prompt, past_key_values=resident, **opts))
    full = first_logits(model.generate(prompt, **opts))
    assert torch.equal(got, want)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-4)


def test_no_deprecated_transformers_api(model: Any, store: kvtier.Store) -> None:
    """A miss, a save and a hit through CachedModel, and the demo's generate into a resident
    DynamicCache, use only current transformers APIs: no FutureWarning or DeprecationWarning."""
    prompt = user_turn(0, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        cm = CachedModel(model, store)
        cm.generate(prompt, max_new_tokens=2, **GREEDY)
        cm.flush()
        cm.generate(prompt, max_new_tokens=2, **GREEDY)
        timed_generate(model, prompt, 2, DynamicCache(config=model.config))
    assert cm.last_request is not None and cm.last_request.hit_tokens == 2 * CHUNK


def test_restart_hits_disk(model: Any, tmp_path: Path) -> None:
    """After a restart (new Store on the same disk dir) the next turn hits from disk."""
    with open_store(tmp_path) as store:
        conv = talk(CachedModel(model, store), model, 2)
    with open_store(tmp_path) as store:
        cm = CachedModel(model, store)
        talk(cm, model, 1, conv)
        assert cm.last_request is not None and cm.last_request.hit_tier == "disk"
        assert cm.last_request.hit_tokens == conv.shape[1] // CHUNK * CHUNK


def test_other_salt_never_hits(model: Any, store: kvtier.Store) -> None:
    """A different salt gives disjoint keys: nothing saved under one salt hits under another."""
    conv = talk(CachedModel(model, store, salt="tenant-a"), model, 2)
    other = CachedModel(model, store, salt="tenant-b")
    talk(other, model, 1, conv)
    assert other.last_request is not None and other.last_request.hit_tokens == 0


class VanishingStore(kvtier.Store):
    """A real store whose second located chunk is deleted from disk right after lookup."""

    def locate(self, keys: Any) -> Any:
        found = super().locate(keys)
        if found.chunks > 1:
            disk = Path(self.config.disk_dir or "")
            for path in disk.glob(f"kvtier-v1/*/{keys[1].hex()}*"):
                path.unlink()
        return found


@pytest.mark.parametrize("dram", [True, False])
def test_chunk_gone_after_lookup_recomputes(model: Any, tmp_path: Path, dram: bool) -> None:
    """A chunk deleted between lookup and load shortens the hit; the output stays correct."""
    with open_store(tmp_path, dram=False) as store:
        conv = talk(CachedModel(model, store), model, 2)
    with open_store(tmp_path, dram=dram, cls=VanishingStore) as store:
        cm = CachedModel(model, store)
        talk(cm, model, 1, conv)
        assert cm.last_request is not None and cm.last_request.hit_tokens == CHUNK


def test_refuses_sliding_window() -> None:
    """A model whose layers use a sliding window is refused with a clear error."""
    config = MistralConfig(**SIZES, sliding_window=32)
    store = kvtier.Store(kvtier.StoreConfig(chunk_tokens=CHUNK, dram_bytes=1 << 20))
    with store, pytest.raises(UnsupportedModel, match="sliding window"):
        CachedModel(MistralForCausalLM(config), store)


def test_refuses_encoder_decoder() -> None:
    """An encoder-decoder model is refused with a clear error."""
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    store = kvtier.Store(kvtier.StoreConfig(chunk_tokens=CHUNK, dram_bytes=1 << 20))
    with store, pytest.raises(UnsupportedModel, match="encoder-decoder"):
        CachedModel(T5ForConditionalGeneration(config), store)


def test_refuses_batch(model: Any, store: kvtier.Store) -> None:
    """A batch of more than one sequence is refused, not served wrong."""
    with pytest.raises(ValueError, match="batch size 2"):
        CachedModel(model, store).generate(torch.ones(2, 8, dtype=torch.long), max_new_tokens=1)


def test_ttl_applies_to_what_generate_saves(tmp_path: Path) -> None:
    """With `ttl_s`, the KV that generate() saves in the background expires like a
    BoundCache save: a hit before its time, a miss (recomputed) after it."""
    model = tiny("llama")
    with open_store(tmp_path) as store:
        cm = CachedModel(model, store, model_id="m", ttl_s=0.3)
        prompt = user_turn(0, 40)
        cm.generate(prompt, max_new_tokens=2, **GREEDY)
        cm.flush()
        assert cm.cache.lookup(prompt[0].tolist()) == 32
        time.sleep(0.5)
        cm.generate(prompt, max_new_tokens=2, **GREEDY)
        assert cm.last_request is not None and cm.last_request.hit_tokens == 0
        assert store.stats().tier("dram").expired > 0
        cm.close()
