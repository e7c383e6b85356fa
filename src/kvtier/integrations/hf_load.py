"""Loading a stored prefix into a transformers cache, layer by layer.

`ChunkLoader` copies pinned DRAM chunks into per-layer host tensors on a background thread and
signals one event per layer; `PrefixLayer` (a `DynamicLayer`) waits for its layer only when the
model reaches it, so layer l+1 is loaded while layer l computes the new tokens.
`ReadyLoader` serves KV that was already loaded in full (the path without a DRAM tier).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from kvtier.errors import KvtierError
from kvtier.layout import KVLayout

# element size -> integer dtypes used to copy raw element bits (bfloat16 included)
_TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (1, H, T, D) each


class LayerLoader(Protocol):
    """A prefix of `tokens` tokens whose KV can be awaited layer by layer."""

    tokens: int

    def wait(self, layer: int) -> LayerKV:
        """Keys and values (1, H, T, D) of one layer; blocks until that layer is loaded."""
        ...

    def finish(self) -> None:
        """Wait until no background work touches the staging buffers any more."""
        ...


def raw_numpy(tensor: torch.Tensor) -> np.ndarray[Any, np.dtype[Any]]:
    """A NumPy view of a CPU tensor's element bits (works for bfloat16 too)."""
    return tensor.view(_TORCH_BITS[tensor.element_size()]).numpy()


class HostStaging:
    """Reusable per-layer host buffers (2, H, capacity, D): page faults are paid once."""

    def __init__(self, layout: KVLayout, dtype: torch.dtype) -> None:
        self.layout = layout
        self.dtype = dtype
        self._buffers: list[torch.Tensor] = []
        self._capacity = 0

    def layer(self, index: int, tokens: int) -> torch.Tensor:
        """Buffer of layer `index` for `tokens` tokens: (2, H, tokens, D)."""
        if tokens > self._capacity:
            self._grow(max(tokens, 2 * self._capacity))
        return self._buffers[index][:, :, :tokens]

    def _grow(self, capacity: int) -> None:
        lay = self.layout
        shape = (2, lay.num_kv_heads, capacity, lay.head_dim)
        self._buffers = [torch.empty(shape, dtype=self.dtype) for _ in range(lay.num_layers)]
        self._capacity = capacity


class ChunkLoader:
    """Fills layer after layer from pinned chunk views on a background thread.

    A chunk's bytes are layer-major: layer l is `[l*2*R, (l+1)*2*R)` with
    `R = chunk_tokens * H * D * itemsize`, the K row then the V row. `release` is called once
    every layer has been copied (or on failure), unpinning the chunks.
    """

    def __init__(
        self,
        views: Sequence[memoryview],
        release: Callable[[], None],
        chunk_tokens: int,
        staging: HostStaging,
        device: torch.device,
    ) -> None:
        self.tokens = len(views) * chunk_tokens
        self._views = list(views)
        self._release = release
        self._chunk_tokens = chunk_tokens
        self._staging = staging
        self._device = device
        layers = staging.layout.num_layers
        self._events = [threading.Event() for _ in range(layers)]
        self._kv: list[LayerKV | None] = [None] * layers
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvtier-load", daemon=True)
        self._thread.start()

    def wait(self, layer: int) -> LayerKV:
        self._events[layer].wait()
        kv = self._kv[layer]
        if kv is None:
            raise KvtierError(f"loading layer {layer} of a stored prefix failed") from self._error
        self._kv[layer] = None
        return kv

    def finish(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            for layer, event in enumerate(self._events):
                self._kv[layer] = self._fill(layer)
                event.set()
        except BaseException as exc:  # surfaced to the waiting forward pass by wait()
            self._error = exc
        finally:
            self._release()
            for event in self._events:
                event.set()

    def _fill(self, layer: int) -> LayerKV:
        lay = self._staging.layout
        c, heads, dim = self._chunk_tokens, lay.num_kv_heads, lay.head_dim
        buf = self._staging.layer(layer, self.tokens)  # (2, H, T, D)
        dst = raw_numpy(buf)
        bits = _NUMPY_BITS[buf.element_size()]
        count = 2 * c * heads * dim
        for i, view in enumerate(self._views):
            src = np.frombuffer(view, dtype=bits, count=count, offset=layer * count * dst.itemsize)
            np.copyto(dst[:, :, i * c : (i + 1) * c], src.reshape(2, c, heads, dim).swapaxes(1, 2))
        if self._device.type != "cpu":
            buf = buf.to(self._device)
        return buf[0:1], buf[1:2]


class ReadyLoader:
    """A prefix already loaded in full: kv (L, 2, T, H, D) on the host."""

    def __init__(self, kv: torch.Tensor, device: torch.device) -> None:
        self.tokens = kv.shape[2]
        self._kv = kv
        self._device = device

    def wait(self, layer: int) -> LayerKV:
        rows = self._kv[layer].transpose(1, 2).to(self._device)  # (2, H, T, D)
        return rows[0:1], rows[1:2]

    def finish(self) -> None:
        """Nothing runs in the background."""


class PrefixLayer(DynamicLayer):  # type: ignore[misc,no-untyped-call]
    """A `DynamicLayer` that starts with a stored prefix, awaited at its first update.

    Until then it reports the prefix length, so positions and masks are computed for the full
    sequence while the prefix is still being loaded.
    """

    def __init__(self, loader: LayerLoader, index: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._loader = loader
        self._index = index
        self._pending = loader.tokens

    def get_seq_length(self) -> int:
        return self._pending if self._pending else int(super().get_seq_length())

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> LayerKV:
        if self._pending:
            keys, values = self._loader.wait(self._index)
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys, self.values = keys, values
            self.is_initialized = True
            self._pending = 0
        result: LayerKV = super().update(key_states, value_states, *args, **kwargs)
        return result
