"""kvtier's DRAM as tensors the GPU copies to and from directly.

The chunks kvtier lends a worker (`Store.reading` / `Store.writing`) are views into one
mapping: the node process's shared DRAM file, or an in-process DRAM pool. Registered once
with CUDA (`cudaHostRegister`, the whole mapping), a copy between a lent chunk and the GPU is
one DMA at the link's speed, with no bounce through a pinned staging buffer and no copy on
the host: on an H200, 54.6 GB/s from the registered shared file against 6.8 unregistered
(`kvtier bench gpu`). Registration runs in the background, as it takes seconds for a large
DRAM file not yet touched: until it ends, and for a mapping that cannot be registered (a
locked-memory limit, say; logged), chunks are copied as pageable memory: correct, slower.
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
    """Tensors over lent views; on a GPU worker, their mappings registered with CUDA in the
    background (registering a large, untouched DRAM file takes seconds: its first copies
    run as from pageable memory meanwhile, correct and slower)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._mappings: dict[int, tuple[object, int | None]] = {}  # id -> (mapping, address)
        self._registering: list[threading.Thread] = []

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
            # Kept alive while registered (the registration names its address), until close:
            # the mapping of a node process that restarted stays until the worker ends.
            self._mappings[id(mapping)] = (mapping, None)
            thread = threading.Thread(
                target=self._pin, args=(mapping,), name="kvtier-cuda-register", daemon=True
            )
            self._registering.append(thread)
        thread.start()

    def _pin(self, mapping: object) -> None:
        try:
            array = np.frombuffer(mapping, dtype=np.uint8)  # type: ignore[call-overload]
            flags = _PORTABLE | (0 if array.flags.writeable else _READ_ONLY)
            with torch.cuda.device(self._device):
                cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
                err = int(cudart.cudaHostRegister(array.ctypes.data, array.nbytes, flags))
                if err:
                    _clear_cuda_error(cudart)  # this thread's, so no kernel of torch's sees it
        except (TypeError, ValueError) as exc:
            log.warning("kvtier: cannot register kvtier's DRAM with CUDA: %s", exc)
            return
        if err:
            log.warning(
                "kvtier: cudaHostRegister of a mapping of kvtier's DRAM (%d bytes) failed "
                "(CUDA error %d); its chunks are copied to the GPU as pageable memory (slower)",
                array.nbytes, err,
            )  # fmt: skip
            return
        with self._lock:
            self._mappings[id(mapping)] = (mapping, array.ctypes.data)

    def wait(self) -> None:
        """Until every mapping seen so far is registered (or failed to be)."""
        with self._lock:
            threads = list(self._registering)
        for thread in threads:
            thread.join()

    def close(self) -> None:
        self.wait()
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
