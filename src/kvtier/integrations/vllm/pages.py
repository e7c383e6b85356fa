"""vLLM's paged KV cache as opaque pages: one `(layers, blocks, page_bytes)` byte view.

vLLM hands each layer's cache over as a strided view of one backing allocation; its byte
order inside a block differs by backend (the CPU backend keeps all K of a page before all V),
so kvtier never interprets a page: a chunk is the pages of its blocks for every layer, copied
whole. A (layer, block) page must be one contiguous run of bytes (true of every layout with
the block dimension outside the head/token/content dimensions); other layouts are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from math import prod

import torch

from kvtier.errors import ConfigError


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` as a flat uint8 tensor."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        storage, 0, (storage.nbytes(),), (1,)
    )


def _page_geometry(name: str, t: torch.Tensor) -> tuple[int, int, int]:
    """(byte offset of block 0, block stride in bytes, page bytes) of one layer's view."""
    size = t.element_size()
    inner = sorted(zip(t.stride()[1:], t.shape[1:], strict=True))
    expected = 1
    for stride, dim in inner:
        if dim > 1 and stride != expected:
            raise ConfigError(
                f"vLLM layer {name}: a block's page is not contiguous (shape {tuple(t.shape)}, "
                f"strides {t.stride()}); kvtier needs a layout with blocks outside heads, tokens "
                "and content (LBHNC, LBNHC, BLHNC, BLNHC)"
            )
        expected *= dim
    return int(t.storage_offset()) * size, t.stride(0) * size, int(prod(t.shape[1:])) * size


class PagedKV:
    """Pages of every layer; `gather` / `scatter` copy the pages of a list of blocks."""

    def __init__(self, layers: Sequence[tuple[str, torch.Tensor]], page_bytes: int) -> None:
        if not layers:
            raise ConfigError("vLLM registered no KV cache layers")
        geometry = [_page_geometry(name, t) for name, t in layers]
        for (name, _), (_, _, page) in zip(layers, geometry, strict=True):
            if page != page_bytes:
                raise ConfigError(
                    f"vLLM layer {name}: page of {page} bytes, the KV cache spec says "
                    f"{page_bytes}; kvtier cannot copy padded pages"
                )
        first = layers[0][1]
        self.device = first.device
        self.num_layers = len(layers)
        self.num_blocks = int(first.shape[0])
        self.page_bytes = page_bytes
        offsets = [g[0] for g in geometry]
        strides = {g[1] for g in geometry}
        same_storage = all(
            t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for _, t in layers
        )
        step = offsets[1] - offsets[0] if len(offsets) > 1 else 0
        uniform = all(b - a == step for a, b in pairwise(offsets))
        if same_storage and uniform and len(strides) == 1 and step >= 0:
            # One (L, B, P) view: a chunk's pages move in one indexed copy for all layers.
            self._all: torch.Tensor | None = _byte_view(first).as_strided(
                (self.num_layers, self.num_blocks, page_bytes),
                (step, strides.pop(), 1),
                offsets[0],
            )
            self._layers: list[torch.Tensor] = []
        else:
            self._all = None
            self._layers = [
                _byte_view(t).as_strided((self.num_blocks, page_bytes), (g[1], 1), g[0])
                for (_, t), g in zip(layers, geometry, strict=True)
            ]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return self.num_layers * self.page_bytes

    def index(self, block_ids: Sequence[int], non_blocking: bool = False) -> torch.Tensor:
        """Block ids as an index on this device; `non_blocking` on a GPU: queued on the
        current stream from pinned memory, so the host does not wait for that stream."""
        ids = torch.tensor(block_ids, dtype=torch.long)
        if self.device.type != "cuda":
            return ids
        if non_blocking:
            ids = ids.pin_memory()  # torch's pinned pool keeps it until the copy has run
        return ids.to(self.device, non_blocking=non_blocking)

    def gather(self, idx: torch.Tensor, out: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy the pages of blocks `idx` into `out`, shape (L, len(idx), P), on any device
        (`non_blocking`: a GPU-to-host copy the caller synchronises before reading `out`)."""
        if self._all is not None:
            if out.device == self.device:
                torch.index_select(self._all, 1, idx, out=out)  # (L, k, P)
            else:
                out.copy_(torch.index_select(self._all, 1, idx), non_blocking=non_blocking)
            return
        for layer, pages in enumerate(self._layers):
            out[layer].copy_(torch.index_select(pages, 0, idx), non_blocking=non_blocking)

    def scatter(self, idx: torch.Tensor, src: torch.Tensor) -> None:
        """Copy `src`, shape (L, len(idx), P), into the pages of blocks `idx`."""
        src = src.to(self.device)
        if self._all is not None:
            dst, src = _wide(self._all, src)
            dst.index_copy_(1, idx, src)
            return
        for layer in range(self.num_layers):
            self.scatter_layer(layer, idx, src[layer])

    def scatter_layer(self, layer: int, idx: torch.Tensor, src: torch.Tensor) -> None:
        """Copy `src`, shape (len(idx), P) on this device, into layer `layer`'s pages of
        blocks `idx`."""
        pages = self._all[layer] if self._all is not None else self._layers[layer]
        dst, src = _wide(pages, src)
        dst.index_copy_(0, idx, src)


def _wide(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same bytes as int64 where all of them allow it: torch's index_copy_ moves 8-byte
    elements about 5x faster than single bytes."""
    for t in tensors:
        if t.shape[-1] % 8 or t.stride(-1) != 1 or t.data_ptr() % 8:
            return tensors
        if any(stride % 8 for stride in t.stride()[:-1]):
            return tensors
    return tuple(t.view(torch.int64) for t in tensors)
