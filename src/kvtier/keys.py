"""Chunk keys: prefix-chained blake2b-128 digests.

root  = H(model_id, layout fingerprint, chunk_tokens, salt)
key_i = H(key_{i-1} or root, tokens of chunk i as little-endian int32)

The same tokens under the same model give the same keys in every process and on every node;
another salt gives disjoint keys. A salt is a str or bytes: a str is hashed as its UTF-8
bytes, so salt `s` and salt `s.encode()` give the same keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Union

import numpy as np

from kvtier.errors import ConfigError

KEY_BYTES = 16
Key = bytes
Salt = str | bytes
TokensLike = Union[Sequence[int], "np.ndarray[tuple[int], np.dtype[np.integer]]"]
_INT32 = np.iinfo(np.int32)


def salt_bytes(salt: Salt | None) -> bytes | None:
    """A salt as the bytes its keys are made from: a str's UTF-8 encoding, bytes as they are.
    Raises ConfigError for any other type."""
    if salt is None or isinstance(salt, bytes):
        return salt
    if not isinstance(salt, str):
        raise ConfigError(f"salt: expected str, bytes or None, got {type(salt).__name__}")
    try:
        return salt.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"salt: {exc}; pass bytes, or a str that encodes as UTF-8") from exc


def root_key(model_id: str, fingerprint: str, chunk_tokens: int, salt: Salt | None) -> Key:
    """The digest every key chain of one (model, layout, chunk size, salt) starts from."""
    salted = salt_bytes(salt)
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvtier-root")
    parts = (model_id.encode(), fingerprint.encode(), str(chunk_tokens).encode())
    for data in (*parts, b"" if salted is None else b"s:" + salted):
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def token_bytes(tokens: TokensLike) -> bytes:
    """Tokens as little-endian int32 bytes; raises ValueError for non-integer or out-of-range."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"tokens: expected integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _INT32.max):
        raise ValueError("tokens: ids must be in 0..2**31-1")
    return arr.astype("<i4", copy=False).tobytes()


def chain_keys(root: Key, tokens: TokensLike, chunk_tokens: int) -> list[Key]:
    """Keys of every full chunk of `tokens`, in order."""
    data = token_bytes(tokens)
    step = 4 * chunk_tokens
    keys: list[Key] = []
    prev = root
    blake = hashlib.blake2b
    for start in range(0, len(data) - step + 1, step):
        prev = blake(prev + data[start : start + step], digest_size=KEY_BYTES).digest()
        keys.append(prev)
    return keys
