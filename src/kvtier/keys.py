"""Chunk keys: prefix-chained blake2b-128 digests.

root  = H(model_id, layout fingerprint, chunk_tokens, salt)
key_i = H(key_{i-1} or root, tokens of chunk i as little-endian int32)

The same tokens under the same model give the same keys in every process and on every node;
another salt gives disjoint keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Union

import numpy as np

KEY_BYTES = 16
Key = bytes
TokensLike = Union[Sequence[int], "np.ndarray[tuple[int], np.dtype[np.integer]]"]
_INT32 = np.iinfo(np.int32)


def root_key(model_id: str, fingerprint: str, chunk_tokens: int, salt: str | None) -> Key:
    """The digest every key chain of one (model, layout, chunk size, salt) starts from."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvtier-root")
    for part in (model_id, fingerprint, str(chunk_tokens), "" if salt is None else "s:" + salt):
        data = part.encode()
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
