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

import ctypes
import logging
import threading
import warnings

import numpy as np
import torch

log = logging.getLogger("kvtier.vllm")
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process
_READ_ONLY = 8  # cudaHostRegisterReadOnly: the mapping is PROT_READ


class HostMemory:
    """Tensors over lent views; on a GPU worker, their mappings registered with CUDA."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._cuda = device.type == "cuda"
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
                flags = _PORTABLE | (0 if array.flags.writeable else _READ_ONLY)
                with torch.cuda.device(self._device):  # a loader thread's device may be 0
                    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
                    err = int(cudart.cudaHostRegister(array.ctypes.data, array.nbytes, flags))
                    if err:
                        _clear_cuda_error(cudart)
                if err == 0:
                    address = array.ctypes.data
                else:
                    log.warning(
                        "kvtier: cudaHostRegister of a mapping of kvtier's DRAM (%d bytes) "
                        "failed (CUDA error %d); its chunks are copied to the GPU as pageable "
                        "memory (slower)",
                        array.nbytes, err,
                    )  # fmt: skip
            except (TypeError, ValueError) as exc:
                log.warning("kvtier: cannot register kvtier's DRAM with CUDA: %s", exc)
            # Kept alive while registered (the registration names its address), until close:
            # the mapping of a node process that restarted stays until the worker ends.
            self._mappings[id(mapping)] = (mapping, address)

    def close(self) -> None:
        with self._lock:
            mappings, self._mappings = self._mappings, {}
        for _, address in mappings.values():
            if address is not None:
                torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]


def _clear_cuda_error(cudart: object) -> None:
    """Reset CUDA's last error after a failed call, so that torch's next kernel launch does
    not report it as its own."""
    get_last = getattr(cudart, "cudaGetLastError", None)
    if get_last is not None:
        get_last()
        return
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except OSError:
            continue
