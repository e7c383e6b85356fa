"""Chunk keys: prefix-chained, deterministic across processes, disjoint per salt and layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import CHUNK, LAYOUT, make_kv

import kvtier
from kvtier.keys import KEY_BYTES, chain_keys, root_key, token_bytes

REPO = Path(__file__).resolve().parents[1]


def test_keys_chain_over_prefixes() -> None:
    """Keys of a prefix are the leading keys of the whole; one changed token changes the rest."""
    root = root_key("m", LAYOUT.fingerprint, CHUNK, None)
    tokens = list(range(5 * CHUNK + 1))
    keys = chain_keys(root, tokens, CHUNK)
    assert len(keys) == 5
    assert all(len(k) == KEY_BYTES for k in keys)
    assert chain_keys(root, tokens[: 3 * CHUNK], CHUNK) == keys[:3]
    changed = list(tokens)
    changed[2 * CHUNK] += 1
    other = chain_keys(root, changed, CHUNK)
    assert other[:2] == keys[:2]
    assert all(a != b for a, b in zip(other[2:], keys[2:], strict=True))


def test_list_and_array_tokens_give_same_keys() -> None:
    """Python ints and NumPy int32/int64 arrays of the same ids give the same keys."""
    root = root_key("m", LAYOUT.fingerprint, CHUNK, "t")
    tokens = list(range(100, 100 + 3 * CHUNK))
    expected = chain_keys(root, tokens, CHUNK)
    for dtype in (np.int32, np.int64, np.uint32):
        assert chain_keys(root, np.array(tokens, dtype=dtype), CHUNK) == expected


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1.0, 2.0], "expected integers"),
        ([1, -2], "0..2"),
        ([1, 2**31], "0..2"),
        ([[1, 2]], "1-D"),
        ([True, False], "expected integers"),
    ],
)
def test_bad_tokens_are_rejected(tokens: object, message: str) -> None:
    """Non-integer, negative, too large or nested token ids raise a clear ValueError."""
    with pytest.raises(ValueError, match=message):
        token_bytes(tokens)  # type: ignore[arg-type]


def test_salts_and_layouts_give_disjoint_keys(store: kvtier.Store) -> None:
    """Same tokens under another salt, model or layout share no chunk and find nothing."""
    tokens = list(range(3 * CHUNK))
    tenant_a = store.bind("m", LAYOUT, salt="a")
    tenant_a.save(tokens, make_kv(len(tokens)))
    other_layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    others = [
        store.bind("m", LAYOUT, salt="b"),
        store.bind("m", LAYOUT),
        store.bind("m2", LAYOUT, salt="a"),
        store.bind("m", other_layout, salt="a"),
    ]
    for cache in others:
        assert cache.lookup(tokens) == 0
        assert not set(cache.keys(tokens)) & set(tenant_a.keys(tokens))
    assert tenant_a.lookup(tokens) == 3 * CHUNK


def test_keys_equal_in_another_process() -> None:
    """The same tokens and model give identical keys in a fresh interpreter."""
    script = (
        "import kvtier;"
        "layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype='float16');"
        "store = kvtier.Store(kvtier.StoreConfig(chunk_tokens=4, dram_bytes=1 << 16));"
        "cache = store.bind('m', layout, salt='s');"
        "print(','.join(k.hex() for k in cache.keys(list(range(13)))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    with kvtier.Store(kvtier.StoreConfig(chunk_tokens=CHUNK, dram_bytes=1 << 16)) as store:
        here = store.bind("m", LAYOUT, salt="s").keys(list(range(13)))
    assert out.stdout.strip().split(",") == [k.hex() for k in here]
    assert len(here) == 3


def test_str_salt_and_its_utf8_bytes_give_the_same_keys(store: kvtier.Store) -> None:
    """Salt s and salt s.encode() give identical keys, the keys a str salt always had: what
    one saves under either, the other finds."""
    salt = "tenant-é"
    before = "738bab694edfab308d13dca2801fd502"  # root_key of this str salt before bytes salts
    assert root_key("m", "fp", 4, salt).hex() == before
    assert root_key("m", "fp", 4, salt.encode()).hex() == before
    assert root_key("m", "fp", 4, None).hex() == "995f543da4f73d481b9072e318b989f6"
    tokens = list(range(3 * CHUNK))
    store.bind("m", LAYOUT, salt=salt.encode()).save(tokens, make_kv(len(tokens)))
    as_str = store.bind("m", LAYOUT, salt=salt)
    assert as_str.lookup(tokens) == 3 * CHUNK
    assert as_str.keys(tokens) == store.bind("m", LAYOUT, salt=salt.encode()).keys(tokens)


def test_bytes_salts_give_disjoint_keys(store: kvtier.Store) -> None:
    """Different bytes salts, and an empty salt against no salt, share no key."""
    tokens = list(range(2 * CHUNK))
    salts: list[str | bytes | None] = [b"a", b"b", b"\xff\x00", b"", None]
    keys = [set(store.bind("m", LAYOUT, salt=s).keys(tokens)) for s in salts]
    for i, mine in enumerate(keys):
        assert all(not mine & other for other in keys[i + 1 :])


@pytest.mark.parametrize(
    ("salt", "message"),
    [
        (42, "expected str, bytes or None, got int"),
        (bytearray(b"a"), "expected str, bytes or None, got bytearray"),
        ("\ud800", "pass bytes, or a str that encodes as UTF-8"),
    ],
)
def test_bad_salt_is_a_clear_config_error(store: kvtier.Store, salt: object, message: str) -> None:
    """A salt that is neither str nor bytes (or a str UTF-8 cannot encode) raises ConfigError
    saying what to pass, from bind and from root_key."""
    with pytest.raises(kvtier.ConfigError, match=message):
        store.bind("m", LAYOUT, salt=salt)  # type: ignore[arg-type]
    with pytest.raises(kvtier.ConfigError, match=message):
        root_key("m", "fp", 4, salt)  # type: ignore[arg-type]
