"""One set of chunk loads into vLLM's pages, copied layer by layer.

The sources are chunks kvtier lends in place, `(layers, blocks, page)` tensors over its DRAM.
On a GPU the copies are queued on a copy stream, after the work already queued on the
compute stream, one layer at a time with an event per layer: the attention of layer `l`
makes the compute stream wait for layer `l` only (`wait`), so loading layer `l + 1` overlaps
computing layer `l`, and the engine thread never blocks. On a CPU a thread copies layer by
layer and `wait` blocks until that layer is in (or the copies run inline, before the step's
forward, when layer-wise loading is off). `finish` waits for every copy and gives the
sources back to kvtier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter as _now

import torch

from kvtier.integrations.vllm.pages import PagedKV
from kvtier.integrations.vllm.plan import ChunkCopy

BUFFER_BYTES = 64 << 20  # a GPU load's device buffer, whatever the step loads


def _groups(sizes: Sequence[int], most: int) -> list[tuple[int, int, list[int]]]:
    """Consecutive chunks (block counts `sizes`) in groups of at most `most` blocks (a larger
    chunk alone): (first block, end block, chunk indexes) of each."""
    groups: list[tuple[int, int, list[int]]] = []
    start = 0
    for i, size in enumerate(sizes):
        if groups and groups[-1][1] - groups[-1][0] + size <= most:
            first, _, members = groups[-1]
            groups[-1] = (first, start + size, [*members, i])
        else:
            groups.append((start, start + size, [i]))
        start += size
    return groups


class PageLoad:
    """Copies `(chunk, source)` pairs into `pages`; `release` runs once they are done."""

    def __init__(
        self,
        pages: PagedKV,
        copies: Sequence[tuple[ChunkCopy, torch.Tensor]],
        release: Callable[[], None],
        stream: torch.cuda.Stream | None = None,
        after: torch.cuda.Event | None = None,
        thread: ThreadPoolExecutor | None = None,
    ) -> None:
        """GPU pages: `stream` (the copy stream) and `after` (an event of the compute
        stream the copies must follow). CPU pages: a `thread` copies in the background;
        without one the copies are done here."""
        self.pages = pages
        self.nbytes = pages.block_bytes * sum(len(c.block_ids) for c, _ in copies)
        self.seconds = 0.0
        self.waited: set[int] = set()  # layers `wait` was called for
        self._release = release
        self._stream = stream
        self._error: BaseException | None = None
        self._future: Future[None] | None = None
        layers = pages.num_layers
        if stream is not None:
            event = torch.cuda.Event
            self._events = [event() for _ in range(layers)]  # type: ignore[no-untyped-call]
            timed = (event(enable_timing=True), event(enable_timing=True))  # type: ignore[no-untyped-call]
            self._timing = timed
            with torch.cuda.stream(stream):
                if after is not None:
                    stream.wait_event(after)
                self._queue(copies)
        else:
            self._ready = [threading.Event() for _ in range(layers)]
            if thread is None:
                self._copy(copies)
            else:
                self._future = thread.submit(self._copy, copies)

    def _queue(self, copies: Sequence[tuple[ChunkCopy, torch.Tensor]]) -> None:
        """GPU: per layer and group of chunks, each chunk's slice into one device buffer (of
        at most BUFFER_BYTES, reused in stream order), then one indexed copy into the pages."""
        pages = self.pages
        groups = _groups(
            [len(chunk.block_ids) for chunk, _ in copies], BUFFER_BYTES // pages.page_bytes
        )
        idx = pages.index([b for chunk, _ in copies for b in chunk.block_ids], non_blocking=True)
        rows = max(stop - start for start, stop, _ in groups)
        buffer = torch.empty((rows, pages.page_bytes), dtype=torch.uint8, device=pages.device)
        self._timing[0].record()
        for layer, event in enumerate(self._events):
            for start, stop, members in groups:
                at = 0
                for chunk, src in (copies[i] for i in members):
                    n = len(chunk.block_ids)
                    part = src[layer, chunk.skip_blocks : chunk.skip_blocks + n]
                    buffer[at : at + n].copy_(part, non_blocking=True)
                    at += n
                pages.scatter_layer(layer, idx[start:stop], buffer[:at])
            event.record()
        self._timing[1].record()

    def _copy(self, copies: Sequence[tuple[ChunkCopy, torch.Tensor]]) -> None:
        """CPU: layer by layer, each chunk's slice straight into its pages."""
        t0 = _now()
        try:
            indexes = [self.pages.index(chunk.block_ids) for chunk, _ in copies]
            for layer, ready in enumerate(self._ready):
                for (chunk, src), idx in zip(copies, indexes, strict=True):
                    part = src[layer, chunk.skip_blocks : chunk.skip_blocks + len(chunk.block_ids)]
                    self.pages.scatter_layer(layer, idx, part)
                ready.set()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            for ready in self._ready:
                ready.set()  # a waiter sees the error rather than hanging
            self.seconds = _now() - t0

    def wait(self, layer: int) -> None:
        """Layer `layer`'s pages are in before the engine reads them: the compute stream waits
        for them (GPU), or this call does (CPU)."""
        self.waited.add(layer)
        if self._stream is not None:
            torch.cuda.current_stream().wait_event(self._events[layer])
            return
        self._ready[layer].wait()
        if self._error is not None:
            raise RuntimeError("kvtier: a KV load failed while copying") from self._error

    def wait_all(self) -> None:
        self.wait(self.pages.num_layers - 1)

    def finish(self) -> None:
        """Wait for every copy, then give the sources back (raises what a copy raised)."""
        try:
            if self._stream is not None:
                self._timing[1].synchronize()
                self.seconds = self._timing[0].elapsed_time(self._timing[1]) / 1e3
            elif self._future is not None:
                self._future.result()
        finally:
            self._release()
