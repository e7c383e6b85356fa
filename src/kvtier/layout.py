"""KVLayout and the conversions between arrays/tensors and chunk bytes.

A chunk is laid out layer-major, `(num_layers, 2, chunk_tokens, num_kv_heads, head_dim)`,
K then V, so one layer can be loaded on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.errors import ConfigError
from kvtier.tiers.base import ChunkViews

# dtype name -> NumPy dtype holding the same bytes (bfloat16 has no NumPy dtype: raw uint16).
_STORAGE: dict[str, np.dtype[Any]] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float8_e4m3fn": np.dtype("u1"),
    "float8_e5m2": np.dtype("u1"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
}
_NUMPY_NATIVE = {"float64", "float32", "float16", "int8", "uint8", "int16", "int32"}

Array = np.ndarray[Any, np.dtype[Any]]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one model's KV cache: layers, KV heads, head size, element type."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 16:
                raise ConfigError(f"KVLayout.{name}: expected a positive int, got {value!r}")
        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in _STORAGE:
            raise ConfigError(f"KVLayout.dtype: {self.dtype!r} is not one of {sorted(_STORAGE)}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def storage_dtype(self) -> np.dtype[Any]:
        """The NumPy dtype that holds this layout's element bytes."""
        return _STORAGE[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.storage_dtype.itemsize

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.bytes_per_token * chunk_tokens

    def shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Array shape of `tokens` tokens of KV: (L, 2, T, H, D)."""
        return (self.num_layers, 2, tokens, self.num_kv_heads, self.head_dim)

    @property
    def fingerprint(self) -> str:
        """A short digest naming this layout; part of every key."""
        text = f"L{self.num_layers}/H{self.num_kv_heads}/D{self.head_dim}/{self.dtype}/lm-kv"
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def as_storage(self, kv: object, tokens: int, what: str = "kv") -> Array:
        """A NumPy view (no copy on CPU) of `kv` in storage dtype; checks shape and dtype."""
        arr = _to_numpy(kv, self.dtype, what)
        expected = self.shape(tokens)
        if arr.shape != expected:
            raise ValueError(
                f"{what}: expected shape (num_layers, 2, tokens, num_kv_heads, head_dim) = "
                f"{expected}, got {tuple(arr.shape)}"
            )
        return arr

    def empty(self, tokens: int) -> Any:
        """A new array for `tokens` tokens: NumPy where NumPy has the dtype, else torch."""
        if self.dtype in _NUMPY_NATIVE:
            return np.empty(self.shape(tokens), dtype=self.storage_dtype)
        try:
            import torch
        except ImportError as exc:
            raise ConfigError(
                f"loading {self.dtype} without out= needs torch (NumPy has no {self.dtype}); "
                "install torch or pass out= a uint16/uint8 NumPy array"
            ) from exc
        return torch.empty(self.shape(tokens), dtype=getattr(torch, self.dtype))


def _to_numpy(kv: object, dtype: str, what: str) -> Array:
    storage = _STORAGE[dtype]
    if isinstance(kv, np.ndarray):
        if not kv.dtype.isnative:
            raise ValueError(f"{what}: byte order {kv.dtype.str}; pass a native-endian array")
        if kv.dtype.name != dtype and not (dtype not in _NUMPY_NATIVE and kv.dtype == storage):
            raise ValueError(f"{what}: dtype {kv.dtype} does not match the layout's {dtype}")
        return kv.view(storage) if kv.dtype != storage else kv
    if type(kv).__module__.startswith("torch"):
        return _torch_to_numpy(kv, dtype, storage, what)
    raise ValueError(f"{what}: expected a NumPy array or torch tensor, got {type(kv).__name__}")


def _torch_to_numpy(kv: Any, dtype: str, storage: np.dtype[Any], what: str) -> Array:
    import torch

    if str(kv.dtype).removeprefix("torch.") != dtype:
        raise ValueError(f"{what}: dtype {kv.dtype} does not match the layout's {dtype}")
    t = kv.detach()
    if t.device.type != "cpu":
        raise ValueError(f"{what}: tensor is on {t.device}; pass a CPU tensor (GPU tier is later)")
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    arr: Array = t.view(raw).numpy()
    return arr.view(storage)


def rows_contiguous(arr: Array) -> bool:
    """Each (layer, K/V) row of `arr` (L, 2, T, H, D) is one contiguous run of bytes, and
    rows are evenly spaced (so `chunk_views` needs no copy)."""
    layers, _, _, heads, dim = arr.shape
    size = arr.itemsize
    s = arr.strides
    rows_even = layers == 1 or s[0] == 2 * s[1]
    return (
        s[4] == size
        and (heads == 1 or s[3] == dim * size)
        and s[2] == heads * dim * size
        and rows_even
    )


def chunk_views(arr: Array, start: int, stop: int) -> ChunkViews:
    """Tokens [start, stop) of a row-contiguous (L, 2, T, H, D) array as chunk rows, one per
    (layer, K/V), in chunk byte order (layer-major, K then V). No copy."""
    layers, _, _, heads, dim = arr.shape
    part = arr[:, :, start:stop]  # (L, 2, C, H, D)
    rows = np.reshape(part, (layers * 2, (stop - start) * heads * dim), copy=False)
    return ChunkViews(rows.view(np.uint8))
