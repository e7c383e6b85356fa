"""Block <-> chunk page copies over the KV caches vLLM's own allocator builds on CPU."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from kvtier.errors import ConfigError
from kvtier.integrations.vllm.pages import PagedKV

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn", "model.layers.2.a"]
NUM_BLOCKS = 12
CONTIGUOUS = ["LBHNC", "LBNHC", "BLHNC", "BLNHC"]


def _caches(layout: KVCacheLayout, block_size: int) -> tuple[dict[str, torch.Tensor], int]:
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=2, head_size=32, dtype=torch.float16
    )
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, len(LAYERS), layout)
    size = spec.page_size_bytes * NUM_BLOCKS * len(LAYERS)
    tensor = KVCacheTensor(size, list(LAYERS), layer_stride, block_stride)
    config = KVCacheConfig(NUM_BLOCKS, [tensor], [KVCacheGroupSpec(list(LAYERS), spec)])
    caches = allocate_kv_cache(config, torch.device("cpu"), layout)
    return caches, spec.page_size_bytes


def _paged(caches: dict[str, torch.Tensor], page_bytes: int) -> PagedKV:
    return PagedKV([(name, caches[name]) for name in LAYERS], page_bytes)


def _page(caches: dict[str, torch.Tensor], layer: str, block: int) -> torch.Tensor:
    """The page's bytes in memory order (the dimensions sorted by stride)."""
    page = caches[layer][block]  # (H, N, C), strided in the layout's order
    order = sorted(range(page.dim()), key=lambda d: -page.stride(d))
    return page.permute(order).contiguous().view(torch.uint8).flatten()


@pytest.mark.parametrize("layout", CONTIGUOUS)
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_round_trip_touches_only_its_blocks(layout: str, block_size: int, blocks: int) -> None:
    """A chunk's pages gathered, zeroed, and scattered back are byte-identical, and every
    other block is left as it was."""
    caches, page_bytes = _caches(KVCacheLayout[layout], block_size)
    torch.manual_seed(blocks)
    for t in caches.values():
        t.copy_(torch.randn(t.shape, dtype=torch.float32).to(t.dtype))
    before = {name: t.clone() for name, t in caches.items()}
    paged = _paged(caches, page_bytes)
    ids = [7, 2, 9, 4][:blocks]
    idx = paged.index(ids)
    out = torch.empty((len(LAYERS), blocks, page_bytes), dtype=torch.uint8)
    paged.gather(idx, out)
    for layer_i, name in enumerate(LAYERS):
        for j, block in enumerate(ids):
            assert torch.equal(out[layer_i, j], _page(caches, name, block))
            caches[name][block].zero_()
    paged.scatter(idx, out)
    for name in LAYERS:
        assert torch.equal(caches[name], before[name])


@pytest.mark.parametrize("layout", CONTIGUOUS)
def test_scatter_writes_the_right_pages(layout: str) -> None:
    """Pages scattered into blocks land in exactly those blocks, for every layer."""
    caches, page_bytes = _caches(KVCacheLayout[layout], 32)
    for t in caches.values():
        t.zero_()
    paged = _paged(caches, page_bytes)
    src = torch.randint(0, 255, (len(LAYERS), 2, page_bytes), dtype=torch.uint8)
    paged.scatter(paged.index([5, 1]), src)
    for layer_i, name in enumerate(LAYERS):
        for block in range(NUM_BLOCKS):
            page = _page(caches, name, block)
            if block in (5, 1):
                assert torch.equal(page, src[layer_i, [5, 1].index(block)])
            else:
                assert not page.any()


@pytest.mark.parametrize("layout", ["LHBNC", "BHLNC"])
def test_fragmented_pages_are_refused(layout: str) -> None:
    """A layout whose (layer, block) page is not one run of bytes is refused clearly."""
    caches, page_bytes = _caches(KVCacheLayout[layout], 32)
    with pytest.raises(ConfigError, match="not contiguous"):
        _paged(caches, page_bytes)


def test_padded_pages_are_refused() -> None:
    """A page size that disagrees with the spec (padding) is refused, not misread."""
    caches, page_bytes = _caches(KVCacheLayout.LBHNC, 32)
    with pytest.raises(ConfigError, match="padded"):
        _paged(caches, page_bytes + 64)
