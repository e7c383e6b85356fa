"""The gateway's block keys: a prefix chain over token ids, hashed a whole prompt at once."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.gateway.tokens import (
    block_keys,
    chain_keys,
    prompt_tokens,
    request_prompts,
    root_key,
    tokenize,
)

BT = 16


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 31, n, np.int64)


def test_keys_chain_from_any_parent_key() -> None:
    """Hashing the rest of a prompt from the key of its 10th block gives the same keys as
    hashing it whole: a KV event's blocks (parent by key) land on the prompt's keys."""
    tokens = _tokens(1000)
    keys = block_keys(tokens, BT, "s")
    assert len(keys) == 1000 // BT and len(set(keys)) == len(keys)
    assert all(isinstance(k, int) and 0 <= k < 1 << 64 for k in keys)
    assert chain_keys(keys[9], tokens[10 * BT :], BT) == keys[10:]
    assert chain_keys(root_key("s"), tokens.tolist(), BT) == keys  # a list of ids, as events
    assert chain_keys(keys[-1], tokens[len(keys) * BT :], BT) == []  # a partial tail: no key


def test_a_changed_token_changes_its_block_and_every_later_key() -> None:
    tokens = _tokens(64 * BT, 1)
    keys = block_keys(tokens, BT)
    for position in (0, 7 * BT + 3, 64 * BT - 1):
        changed = tokens.copy()
        changed[position] += 1
        other = block_keys(changed, BT)
        block = position // BT
        assert other[:block] == keys[:block]
        assert all(a != b for a, b in zip(other[block:], keys[block:], strict=True))


def test_swapped_tokens_salts_and_adapters_give_other_keys() -> None:
    tokens = _tokens(4 * BT, 2)
    keys = block_keys(tokens, BT)
    swapped = tokens.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert block_keys(swapped, BT)[0] != keys[0]
    assert not set(keys) & set(block_keys(tokens, BT, "tenant-b"))
    assert not set(keys) & set(block_keys(tokens, BT, lora="adapter"))
    assert not set(keys) & set(block_keys(tokens, 8))


def test_prompts_longer_than_any_before_still_chain() -> None:
    """The power tables grow on demand: a 200k-token prompt's keys equal its chained halves."""
    tokens = _tokens(200_000, 3)
    keys = block_keys(tokens, BT)
    half = len(keys) // 2
    assert chain_keys(keys[half - 1], tokens[half * BT :], BT) == keys[half:]


def test_a_completion_prompt_may_be_a_batch_of_texts_or_token_lists() -> None:
    """OpenAI's four `prompt` shapes; one prompt only where one is needed (the sim)."""
    assert [p.tolist() for p in request_prompts({"prompt": [5, 6]})] == [[5, 6]]
    texts = request_prompts({"prompt": ["abcd", "efghijkl"]})
    assert [p.tolist() for p in texts] == [tokenize("abcd").tolist(), tokenize("efghijkl").tolist()]
    ids = request_prompts({"prompt": [[1, 2], [3]]})
    assert [p.tolist() for p in ids] == [[1, 2], [3]]
    assert prompt_tokens({"prompt": ["abcd"]}).tolist() == tokenize("abcd").tolist()
    for bad in ({"prompt": []}, {"prompt": [[]]}, {"prompt": [True]}, {"prompt": ["a", 3]},
                {"prompt": [[1], "a", [2**40]]}, {"prompt": None}):  # fmt: skip
        with pytest.raises(ValueError, match=r"prompt|token ids"):
            request_prompts(bad)
    with pytest.raises(ValueError, match="batch"):
        prompt_tokens({"prompt": ["a", "b"]})
