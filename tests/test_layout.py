"""KVLayout sizes and fingerprints; arrays and torch tensors in and out of the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import CHUNK, LAYOUT, make_kv

import kvtier


def test_sizes_and_shape() -> None:
    """Bytes per token and chunk follow (L, 2, T, H, D) and the element size."""
    layout = kvtier.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    assert layout.bytes_per_token == 128 << 10  # Llama-3-8B: 128 KiB per token
    assert layout.chunk_bytes(256) == 32 << 20
    assert layout.shape(5) == (32, 2, 5, 8, 128)
    assert kvtier.KVLayout(1, 1, 1, "torch.float32").dtype == "float32"


def test_fingerprint_names_the_layout() -> None:
    """Equal layouts share a fingerprint; any changed field changes it."""
    base = kvtier.KVLayout(4, 2, 64, "float16")
    assert base.fingerprint == kvtier.KVLayout(4, 2, 64, "float16").fingerprint
    others = [
        kvtier.KVLayout(5, 2, 64, "float16"),
        kvtier.KVLayout(4, 1, 64, "float16"),
        kvtier.KVLayout(4, 2, 32, "float16"),
        kvtier.KVLayout(4, 2, 64, "bfloat16"),
    ]
    assert len({base.fingerprint, *(o.fingerprint for o in others)}) == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_layers": 0}, "num_layers: expected a positive int"),
        ({"num_kv_heads": -1}, "num_kv_heads: expected a positive int"),
        ({"head_dim": 2.0}, "head_dim: expected a positive int"),
        ({"head_dim": True}, "head_dim: expected a positive int"),
        ({"dtype": "float13"}, "dtype: 'float13' is not one of"),
    ],
)
def test_bad_layout_is_a_clear_error(fields: dict[str, object], message: str) -> None:
    """Invalid layout fields raise ConfigError naming the field."""
    values: dict[str, object] = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    values.update(fields)
    with pytest.raises(kvtier.ConfigError, match=message):
        kvtier.KVLayout(**values)  # type: ignore[arg-type]


def test_bad_kv_is_a_clear_error(store: kvtier.Store) -> None:
    """Wrong shape, dtype, length or type of kv raises a ValueError saying what was expected."""
    cache = store.bind("m", LAYOUT)
    tokens = list(range(2 * CHUNK))
    kv = make_kv(len(tokens))
    with pytest.raises(ValueError, match=r"expected shape .* = \(2, 2, 8, 2, 8\), got"):
        cache.save(tokens, kv[:, :, :, :1])
    with pytest.raises(ValueError, match=r"expected shape .*, got \(2, 2, 7, 2, 8\)"):
        cache.save(tokens, kv[:, :, :7])  # kv shorter than tokens
    with pytest.raises(ValueError, match="dtype float32 does not match the layout's float16"):
        cache.save(tokens, kv.astype(np.float32))
    with pytest.raises(ValueError, match="expected a NumPy array or torch tensor, got list"):
        cache.save(tokens, kv.tolist())
    with pytest.raises(ValueError, match="tokens: expected integers"):
        cache.save([0.5] * len(tokens), kv)
    with pytest.raises(ValueError, match="tokens: ids must be in"):
        cache.lookup([-1] * CHUNK)
    out = np.empty(kv.shape, np.float32)
    cache.save(tokens, kv)
    with pytest.raises(ValueError, match="out: dtype float32"):
        cache.load(tokens, out=out)
    with pytest.raises(ValueError, match="out: expected shape"):
        cache.load(tokens, out=np.empty_like(kv[:, :, :CHUNK]))
    assert cache.lookup(tokens) == 2 * CHUNK


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_round_trip(store: kvtier.Store, dtype: str) -> None:
    """torch tensors save and load byte-exact; without out, bfloat16 loads as a torch tensor."""
    layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype)
    cache = store.bind("m", layout)
    tokens = list(range(3 * CHUNK))
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(layout.shape(len(tokens)), generator=gen).to(getattr(torch, dtype))
    cache.save(tokens, kv)
    got = cache.load(tokens)
    if dtype == "bfloat16":
        assert isinstance(got, torch.Tensor)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, kv)
    else:
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, kv.numpy())
    out = torch.zeros(layout.shape(len(tokens)), dtype=getattr(torch, dtype))
    assert cache.load(tokens, out=out) is out
    assert torch.equal(out, kv)


def test_torch_non_contiguous_in_and_out(store: kvtier.Store) -> None:
    """Non-contiguous bfloat16 tensors are saved and filled in place byte-exact."""
    layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    cache = store.bind("m", layout)
    tokens = list(range(2 * CHUNK))
    L, _, T, H, D = layout.shape(len(tokens))
    kv = torch.randn(L, 2, H, T, D).to(torch.bfloat16).transpose(2, 3)  # (L, 2, T, H, D)
    assert not kv.is_contiguous()
    cache.save(tokens, kv)
    out = torch.zeros(L, 2, T, H, 2 * D, dtype=torch.bfloat16)[..., ::2]
    cache.load(tokens, out=out)
    assert torch.equal(out, kv)


def test_raw_uint16_for_bfloat16(store: kvtier.Store) -> None:
    """A bfloat16 layout accepts its raw uint16 storage as a NumPy array, in and out."""
    layout = kvtier.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    cache = store.bind("m", layout)
    tokens = list(range(CHUNK))
    kv = np.random.default_rng(3).integers(0, 1 << 16, layout.shape(CHUNK), dtype=np.uint16)
    cache.save(tokens, kv)
    out = np.zeros_like(kv)
    cache.load(tokens, out=out)
    np.testing.assert_array_equal(out, kv)
    assert torch.equal(cache.load(tokens).view(torch.int16), torch.from_numpy(kv.view(np.int16)))


def test_big_endian_arrays_are_refused() -> None:
    """A non-native byte order is refused rather than reinterpreted into wrong values."""
    layout = kvtier.KVLayout(1, 1, 4, "float16")
    kv = np.arange(8, dtype=">f2").reshape(layout.shape(1))
    with pytest.raises(ValueError, match="native-endian"):
        layout.as_storage(kv, 1)
