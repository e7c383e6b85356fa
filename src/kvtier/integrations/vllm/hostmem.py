"""kvtier's DRAM as tensors the GPU copies to and from directly.

The chunks kvtier lends a worker (`Store.reading` / `Store.writing`) are views into one
mapping: the node process's shared DRAM file, or an in-process DRAM pool. Registered once
with CUDA (`cudaHostRegister`, the whole mapping), a copy between a lent chunk and the GPU is
one DMA at the link's speed, with no bounce through a pinned staging buffer and no copy on
the host: on an H200, 54.6 GB/s from the registered shared file against 6.8 unregistered
(`kvtier bench gpu`). A mapping that cannot be registered (a locked-memory limit, say) is
copied from as pageable memory: correct, slower, and said once in the log.
"""

from __future__ import annotations

import logging
import threading
import warnings

import numpy as np
import torch

log = logging.getLogger("kvtier.vllm")
_READ_ONLY = 8  # cudaHostRegisterReadOnly: the mapping is PROT_READ


class HostMemory:
    """Tensors over lent views; on a GPU worker, their mappings registered with CUDA."""

    def __init__(self, cuda: bool) -> None:
        self._cuda = cuda
        self._lock = threading.Lock()
        self._mappings: dict[int, tuple[object, int | None]] = {}  # id -> (mapping, address)

    def tensor(self, view: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        """A uint8 tensor of `shape` over `view` (no copy). A read-only view gives a tensor
        that only ever serves as a copy's source."""
        if self._cuda:
            self._register(view.obj)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch on a read-only buffer
            return torch.frombuffer(view, dtype=torch.uint8).view(shape)

    def _register(self, mapping: object) -> None:
        with self._lock:
            if id(mapping) in self._mappings:
                return
            address: int | None = None
            try:
                array = np.frombuffer(mapping, dtype=np.uint8)  # type: ignore[call-overload]
                flags = _READ_ONLY if not array.flags.writeable else 0
                err = torch.cuda.cudart().cudaHostRegister(array.ctypes.data, array.nbytes, flags)  # type: ignore[no-untyped-call]
                if int(err) == 0:
                    address = array.ctypes.data
                else:
                    log.warning(
                        "kvtier: cudaHostRegister of kvtier's DRAM (%d bytes) failed (CUDA error "
                        "%d); its chunks are copied to the GPU as pageable memory (slower)",
                        array.nbytes, int(err),
                    )  # fmt: skip
            except (TypeError, ValueError) as exc:
                log.warning("kvtier: cannot register kvtier's DRAM with CUDA: %s", exc)
            # The mapping is kept alive while it is registered: the registration names its address.
            self._mappings[id(mapping)] = (mapping, address)

    def close(self) -> None:
        with self._lock:
            mappings, self._mappings = self._mappings, {}
        for _, address in mappings.values():
            if address is not None:
                torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
