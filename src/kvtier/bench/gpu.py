"""`kvtier bench gpu`: the vLLM connector's worker path on a CUDA GPU: ordering, bandwidth and
time to first token, without vLLM itself.

vLLM's CUDA wheel (311 MiB, built against its own torch) cannot be installed on the GPU
machine this was written for, so the connector's worker (`ChunkMover`) runs here over CUDA
pages laid out exactly as vLLM's allocator lays them out (one allocation, per-layer strided
views), against a real node process (shared DRAM), as in an engine:

1. ordering: saves, synchronous loads and background loads with a busy kernel queued on the
   compute stream before each, checked byte for byte (vLLM #45704: an H2D copy not ordered
   against the compute stream corrupted restored KV), for the FlashAttention layout (LBNHC),
   the block-first one (BLNHC) and one allocation per layer; untouched blocks stay untouched
   and a missing chunk fails its blocks.
2. bandwidth: one step's loads and saves of `--tokens` tokens of an 8B-class layout (Llama 3
   8B: 32 layers, 8 KV heads, head 128, bf16, block 16) against raw pinned and pageable
   H2D / D2H copies of the same bytes.
3. TTFT: an 8B-class Llama with random bf16 weights: prefill of N tokens (recompute) against
   loading the whole chunks of N-1 tokens through the connector plus the forward of the rest
   over that cache (a hit, as vLLM runs it: the last token is always computed). The two
   halves of a hit are measured one after the other, and together ("layer-wise": the
   forward's attention layers wait for their layer's load, as vLLM's do); transformers' SDPA
   attention stands in for vLLM's kernels.
4. disk: the chunks of the longest prompt saved to the node's disk (the node restarted, the
   page cache dropped), then loaded in the background as vLLM loads chunks on disk, against
   reading the same files raw (`--disk-dir`: put it on the disk to measure, not tmpfs).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtier.config import StoreConfig, env_default
from kvtier.integrations.vllm.hostmem import HostMemory
from kvtier.integrations.vllm.node import engine_store, stop_nodes
from kvtier.integrations.vllm.pages import PagedKV
from kvtier.integrations.vllm.plan import ChunkCopy, RequestJobs, StepPlan
from kvtier.integrations.vllm.worker import ChunkMover
from kvtier.store import Store

LLAMA_8B = {
    "layers": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "hidden": 4096,
    "ffn": 14336,
    "q_heads": 32,
}
TINY = {"layers": 4, "kv_heads": 2, "head_dim": 64, "hidden": 256, "ffn": 512, "q_heads": 4}
BLOCK = 16
BUSY_CYCLES = 200_000_000  # ~0.1 s of a spinning kernel queued before each checked copy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--tokens", default=env_default("KVTIER_BENCH_TOKENS", "8192,16384,32768"))
    add("--chunk-tokens", type=int, default=256)
    add("--model-size", choices=["8b", "tiny"], default="8b", help="tiny: a dry run on CPU")
    add("--skip-ttft", action="store_true", help="ordering and bandwidth only")
    add(
        "--disk-dir", type=Path, default=None, help="where the disk tier goes (default: a temp dir)"
    )
    add("--json", action="store_true", help="print one JSON object")
    add("--out", type=Path, default=env_default("KVTIER_BENCH_OUT", "results"))


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() and args.model_size != "tiny":
        print(
            "kvtier bench gpu: no CUDA device (--model-size tiny runs a CPU dry run)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = LLAMA_8B if args.model_size == "8b" else TINY
    tokens = [int(t) for t in args.tokens.split(",")]
    result: dict[str, Any] = {"device": _device_name(device), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="kvtier-gpu-") as work:
        node_dir = Path(work) / "node"
        try:
            result["ordering"] = {
                layout: check_ordering(layout, device, node_dir)
                for layout in ("LBNHC", "BLNHC", "per-layer")
            }
            if device.type == "cuda":  # the compute on a stream of its own, as well
                with torch.cuda.stream(torch.cuda.Stream(device)):  # type: ignore[no-untyped-call]
                    result["ordering"]["LBNHC, side stream"] = check_ordering(
                        "LBNHC", device, node_dir, "side"
                    )
                result["ordering"]["registration"] = check_registration(device)
            _say(f"ordering: {result['ordering']}")
            result["raw"] = raw_copies(device, 1 << 30)
            _say(f"raw copies: {result['raw']}")
            result["connector"] = connector_bandwidth(
                shape, max(tokens), args.chunk_tokens, device, node_dir
            )
            _say(f"connector: {result['connector']}")
            if not args.skip_ttft:
                result["ttft"] = ttft(shape, tokens, args.chunk_tokens, device, node_dir)
            disk = Path(tempfile.mkdtemp(prefix="kvtier-gpu-disk-", dir=args.disk_dir or work))
            try:
                result["disk"] = disk_bandwidth(
                    shape, max(tokens) - 1, args.chunk_tokens, device, disk
                )
            finally:
                shutil.rmtree(disk, ignore_errors=True)
            _say(f"disk: {result['disk']}")
        finally:
            stop_nodes(node_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else _table(result))
    ok = all(all(v is True for v in checks.values()) for checks in result["ordering"].values())
    return 0 if ok else 1


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy(device: torch.device) -> None:
    """Queue ~0.1 s of work on the current stream (nothing on CPU, where copies are in order)."""
    if device.type == "cuda":
        torch.cuda._sleep(BUSY_CYCLES)  # type: ignore[no-untyped-call]


# -- vLLM's paged layout ------------------------------------------------------------------


def paged_views(
    layout: str, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device,
) -> list[torch.Tensor]:  # fmt: skip
    """Per-layer (blocks, heads, tokens, K|V content) views in `layout`'s physical order
    (vLLM's `create_kv_cache_views`: one allocation, `as_strided` per layer), or one
    allocation per layer ('per-layer')."""
    sizes = {"L": num_layers, "B": num_blocks, "N": BLOCK, "H": kv_heads, "C": 2 * head_dim}
    if layout == "per-layer":
        return [
            torch.empty((num_blocks, kv_heads, BLOCK, 2 * head_dim), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
    strides, step = {}, 1
    for dim in reversed(layout):
        strides[dim] = step
        step *= sizes[dim]
    flat = torch.empty(step, dtype=dtype, device=device)
    shape = tuple(sizes[d] for d in "BHNC")
    return [
        flat.as_strided(shape, tuple(strides[d] for d in "BHNC"), layer * strides["L"])
        for layer in range(num_layers)
    ]


def _page_bytes(kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return BLOCK * kv_heads * 2 * head_dim * torch.empty(0, dtype=dtype).element_size()


@contextmanager
def _mover(
    views: list[torch.Tensor],
    page_bytes: int,
    chunk_tokens: int,
    node_dir: Path,
    dram: str,
    **tiers: Any,
) -> Iterator[tuple[ChunkMover, Store]]:
    config = StoreConfig(chunk_tokens=chunk_tokens, dram_bytes=dram, **tiers)  # type: ignore[arg-type]
    store = engine_store(config, node_dir)
    pages = PagedKV(
        [(f"model.layers.{i}.self_attn.attn", v) for i, v in enumerate(views)], page_bytes
    )
    mover = ChunkMover(store, pages, chunk_tokens // BLOCK, (0, 1))
    try:
        yield mover, store
    finally:
        mover.close()
        store.close()


def _key(text: str) -> bytes:
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=16).digest()


# -- 1. ordering --------------------------------------------------------------------------


def check_registration(device: torch.device) -> dict[str, bool]:
    """A mapping that cannot be registered (here: registered already) is copied from all the
    same, and leaves no CUDA error behind for torch's next kernel to report as its own."""
    mapped = mmap.mmap(-1, 64 << 20)
    first, second = HostMemory(device), HostMemory(device)
    try:
        view = memoryview(mapped)[: 1 << 20]
        first.tensor(view, (1 << 20,)).fill_(3)
        first.wait()
        again = second.tensor(view, (1 << 20,))  # cudaHostRegister fails: registered already
        second.wait()
        on_gpu = again.to(device) * 2  # a kernel launched after the failure
        torch.cuda.synchronize(device)
        ok = bool((on_gpu == 6).all())
        del view, again
        return {"failed_registration_leaves_no_cuda_error": ok}
    finally:
        second.close()
        first.close()
        mapped.close()


def check_ordering(
    layout: str, device: torch.device, node_dir: Path, tag: str = ""
) -> dict[str, bool]:
    """Each copy with a busy kernel queued before it on the compute stream, checked byte for
    byte once the stream is drained."""
    k = 4  # blocks per chunk
    layers, heads, dim, dtype = 3, 2, 64, torch.bfloat16
    views = paged_views(layout, layers, 16, heads, dim, dtype, device)
    for v in views:
        v.copy_(torch.randn(v.shape, device=device).to(dtype))
    page_bytes = _page_bytes(heads, dim, dtype)
    src, dst, late = range(0, k), range(4, 4 + k), range(8, 8 + k)
    key, missing = _key(f"{layout}-{tag}-saved"), _key(f"{layout}-{tag}-missing")
    untouched = [b for b in range(16) if b not in (*src, *dst, *late)]

    def blocks(ids: range | list[int]) -> list[torch.Tensor]:
        return [v[list(ids)].clone() for v in views]

    before = blocks(untouched)
    checks: dict[str, bool] = {}
    with _mover(views, page_bytes, k * BLOCK, node_dir, "64MiB") as (mover, _):
        # A save right after the forward that wrote its blocks (still running) saves them.
        _busy(device)
        for v in views:
            v[src.start : src.stop] = torch.randn(v[src.start : src.stop].shape, device=device).to(
                dtype
            )
        mover.save(StepPlan(saves=[RequestJobs("s", [ChunkCopy(key, tuple(src))])]))
        _sync(device)
        written = blocks(src)
        # A synchronous load is read by the next kernel on the compute stream.
        _busy(device)
        for v in views:
            v[dst.start : dst.stop] = 0
        mover.load(StepPlan(loads=[RequestJobs("l", [ChunkCopy(key, tuple(dst))])]))
        seen = []
        for layer, v in enumerate(views):  # as the engine's attention layers do
            mover.wait_for_layer(layer)
            seen.append(v[dst.start : dst.stop].clone())  # queued after that layer's load
        mover.finish_loads()
        _sync(device)
        checks["save_after_queued_write"] = _same(written, blocks(dst))
        checks["sync_load_before_next_kernel"] = _same(written, seen)
        # A background load lands after the work queued before it, however late that runs.
        _busy(device)
        for v in views:
            v[late.start : late.stop] = 7
        mover.load(
            StepPlan(loads=[RequestJobs("a", [ChunkCopy(key, tuple(late))], async_load=True)])
        )
        deadline = time.monotonic() + 30
        while "a" not in mover.take_received() and time.monotonic() < deadline:
            mover.wait_for_loads(0.05)
        _sync(device)
        checks["async_load_after_queued_work"] = _same(written, blocks(late))
        checks["no_failed_blocks"] = not mover.take_failed()
        mover.load(StepPlan(loads=[RequestJobs("m", [ChunkCopy(missing, tuple(dst))])]))
        mover.finish_loads()
        checks["missing_chunk_fails_its_blocks"] = mover.take_failed() == set(dst)
        checks["untouched_blocks_untouched"] = _same(before, blocks(untouched))
    return checks


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(
        torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True)
    )


# -- 2. bandwidth -------------------------------------------------------------------------


def _gbps(nbytes: int, fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return round(nbytes / best / 1e9, 2)


def raw_copies(device: torch.device, nbytes: int) -> dict[str, Any]:
    """Host <-> device copies of `nbytes`: pinned, pageable, and a shared file mapping
    registered with CUDA (how a worker could read the node's shared DRAM directly)."""
    if device.type != "cuda":
        return {}
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    out: dict[str, Any] = {
        "h2d_pinned_gbps": _gbps(nbytes, lambda: gpu.copy_(pinned, non_blocking=True), device),
        "d2h_pinned_gbps": _gbps(nbytes, lambda: pinned.copy_(gpu, non_blocking=True), device),
        "h2d_pageable_gbps": _gbps(nbytes, lambda: gpu.copy_(pageable), device),
        "d2h_pageable_gbps": _gbps(nbytes, lambda: pageable.copy_(gpu), device),
    }
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.truncate(nbytes)
        mapped = mmap.mmap(f.fileno(), nbytes, mmap.MAP_SHARED)
        try:
            out.update(_shm_copies(mapped, gpu, device))
        finally:
            mapped.close()
    return out


def _shm_copies(mapped: mmap.mmap, gpu: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """H2D from a shared file mapping, before and after registering it with CUDA."""
    nbytes = len(mapped)
    host = torch.frombuffer(mapped, dtype=torch.uint8)
    host.fill_(1)
    out: dict[str, Any] = {
        "h2d_shm_unregistered_gbps": _gbps(nbytes, lambda: gpu.copy_(host), device)
    }
    address = host.data_ptr()
    t0 = time.perf_counter()
    err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))  # type: ignore[no-untyped-call]
    out["shm_register_seconds_per_gib"] = round((time.perf_counter() - t0) * (1 << 30) / nbytes, 3)
    out["shm_register_error"] = err
    if err == 0:
        out["h2d_shm_registered_gbps"] = _gbps(
            nbytes, lambda: gpu.copy_(host, non_blocking=True), device
        )
        out["d2h_shm_registered_gbps"] = _gbps(
            nbytes, lambda: host.copy_(gpu, non_blocking=True), device
        )
        torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
    return out  # `host` goes before the mapping is closed


@dataclass
class _Pages:
    """Random KV of whole chunks in LBNHC pages of twice their blocks, under fresh keys (a
    node kept from an earlier call holds others): `save` copies the first half's chunks out,
    `load` the same chunks into the second half."""

    views: list[torch.Tensor]
    page_bytes: int
    nbytes: int  # of one half
    blocks_per_chunk: int
    save: list[ChunkCopy]
    load: list[ChunkCopy]

    @property
    def dram(self) -> str:
        """A DRAM tier holding both halves (and more)."""
        return f"{max(self.nbytes * 2, 64 << 20) >> 20}MiB"

    def byte_exact(self) -> bool:
        half = len(self.save) * self.blocks_per_chunk
        return all(
            torch.equal(v[:half].view(torch.uint8), v[half:].view(torch.uint8)) for v in self.views
        )

    def warm(self, mover: ChunkMover) -> None:
        """Have kvtier's DRAM registered with CUDA (once per worker), so timings leave it out."""
        key = _key(f"warm-{secrets.token_hex(8)}")
        mover.save(StepPlan(saves=[RequestJobs("w", [ChunkCopy(key, self.save[0].block_ids)])]))
        mover.wait_registered()


def _pages(shape: dict[str, int], chunks: int, chunk_tokens: int, device: torch.device) -> _Pages:
    k = chunk_tokens // BLOCK
    heads, dim, dtype = shape["kv_heads"], shape["head_dim"], torch.bfloat16
    views = paged_views("LBNHC", shape["layers"], 2 * chunks * k, heads, dim, dtype, device)
    for v in views:
        v.normal_()
    page_bytes = _page_bytes(heads, dim, dtype)
    run = secrets.token_hex(8)
    keys = [_key(f"chunk-{run}-{i}") for i in range(chunks)]
    save = [ChunkCopy(key, tuple(range(i * k, (i + 1) * k))) for i, key in enumerate(keys)]
    load = [ChunkCopy(key, tuple(range((chunks + i) * k, (chunks + i + 1) * k)))
            for i, key in enumerate(keys)]  # fmt: skip
    nbytes = chunks * k * page_bytes * shape["layers"]
    return _Pages(views, page_bytes, nbytes, k, save, load)


def connector_bandwidth(
    shape: dict[str, int],
    tokens: int,
    chunk_tokens: int,
    device: torch.device,
    node_dir: Path,
    forward: Callable[[Callable[[int], None]], object] | None = None,
) -> dict[str, Any]:
    """One step's save of `tokens` tokens, then one step's synchronous load of them into
    other blocks, through ChunkMover and the node's shared DRAM (LBNHC, bf16). `forward(wait)`:
    a forward pass run during the load, calling `wait(layer)` before each layer's attention
    as vLLM does (timed: the load overlapped with it)."""
    chunks = tokens // chunk_tokens
    pages = _pages(shape, chunks, chunk_tokens, device)
    save = StepPlan(saves=[RequestJobs("s", pages.save)])
    load = StepPlan(loads=[RequestJobs("l", pages.load)])
    nbytes = pages.nbytes
    with _mover(pages.views, pages.page_bytes, chunk_tokens, node_dir, pages.dram) as (mover, _):
        pages.warm(mover)
        _sync(device)
        t0 = time.perf_counter()
        mover.save(save)
        save_s = time.perf_counter() - t0
        times = []
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            mover.load(load)
            for layer in range(len(pages.views)):
                mover.wait_for_layer(layer)
            mover.finish_loads()
            _sync(device)
            times.append(time.perf_counter() - t0)
        overlapped = []
        for _ in range(3 if forward is not None else 0):
            _sync(device)
            t0 = time.perf_counter()
            mover.load(load)
            forward(mover.wait_for_layer)  # type: ignore[misc]
            mover.finish_loads()
            _sync(device)
            overlapped.append(time.perf_counter() - t0)
        failed = mover.take_failed()
    return {
        "tokens": chunks * chunk_tokens,
        "bytes": nbytes,
        "kv_bytes_per_token": nbytes // (chunks * chunk_tokens),
        "save_gbps": round(nbytes / save_s / 1e9, 2),
        "load_gbps": round(nbytes / min(times) / 1e9, 2),
        "load_seconds": round(min(times), 4),
        "failed_blocks": len(failed),
        "byte_exact": pages.byte_exact(),
        **({"load_with_forward_seconds": round(min(overlapped), 4)} if overlapped else {}),
    }


# -- 4. the disk tier ----------------------------------------------------------------------


def disk_bandwidth(
    shape: dict[str, int], tokens: int, chunk_tokens: int, device: torch.device, work: Path
) -> dict[str, Any]:
    """The whole chunks of `tokens` tokens saved through the node into its disk tier (the node
    then stopped, flushing, and its files dropped from the page cache), then loaded as vLLM
    loads chunks kvtier holds on disk: in the background (`async_load`), promoted into the
    restarted node's DRAM and copied to the GPU; against reading the same files raw."""
    chunks = tokens // chunk_tokens
    pages = _pages(shape, chunks, chunk_tokens, device)
    nbytes = pages.nbytes
    node_dir, disk = work / "node", work / "tier"
    disk_bytes = f"{(nbytes * 2 >> 20) + 64}MiB"

    def node() -> AbstractContextManager[tuple[ChunkMover, Store]]:
        return _mover(pages.views, pages.page_bytes, chunk_tokens, node_dir, pages.dram,
                      disk_dir=disk, disk_bytes=disk_bytes)  # fmt: skip

    try:
        with node() as (mover, _):
            mover.save(StepPlan(saves=[RequestJobs("s", pages.save)]))
        stop_nodes(node_dir)  # flushes its DRAM to disk; a restarted node serves the disk
        files = [f for f in disk.rglob("*") if f.is_file()]
        _drop_cache(files)
        with node() as (mover, _):
            pages.warm(mover)  # the restarted node's DRAM
            _sync(device)
            t0 = time.perf_counter()
            mover.load(StepPlan(loads=[RequestJobs("l", pages.load, async_load=True)]))
            deadline = time.monotonic() + 600
            received = False
            while not received and time.monotonic() < deadline:
                mover.wait_for_loads(0.05)
                received = "l" in mover.take_received()
            _sync(device)
            load_s = time.perf_counter() - t0
            failed = mover.take_failed()
    finally:
        stop_nodes(node_dir)
    _drop_cache(files)
    t0 = time.perf_counter()
    raw = sum(len(f.read_bytes()) for f in files)
    raw_s = time.perf_counter() - t0
    return {
        "tokens": chunks * chunk_tokens,
        "bytes": nbytes,
        "received": received,
        "filesystem": _filesystem(disk),
        "load_gbps": round(nbytes / load_s / 1e9, 2),
        "load_seconds": round(load_s, 4),
        "raw_read_gbps": round(raw / raw_s / 1e9, 2),
        "failed_blocks": len(failed),
        "byte_exact": pages.byte_exact(),
    }


def _drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on (tmpfs would make a disk figure a DRAM one)."""
    best, kind, where = "", "unknown", path.resolve()
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and where.is_relative_to(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


# -- 3. time to first token ---------------------------------------------------------------


def _model(shape: dict[str, int], device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["q_heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], vocab_size=128256 if shape is LLAMA_8B else 1024,
        max_position_embeddings=131072, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    finally:
        torch.set_default_dtype(default)
    return model.eval()  # type: ignore[no-untyped-call]


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ttft(
    shape: dict[str, int],
    lengths: list[int],
    chunk_tokens: int,
    device: torch.device,
    node_dir: Path,
) -> list[dict[str, Any]]:
    model = _model(shape, device)
    rows = []
    with torch.inference_mode():
        warm = torch.randint(0, model.config.vocab_size, (1, 1024), device=device)
        model(warm, logits_to_keep=1)
        for n in lengths:
            rows.append(_ttft_row(model, n, shape, chunk_tokens, device, node_dir))
            _say(f"ttft: {rows[-1]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _ttft_row(
    model: Any,
    n: int,
    shape: dict[str, int],
    chunk_tokens: int,
    device: torch.device,
    node_dir: Path,
) -> dict[str, Any]:
    """Recompute (prefill of `n` tokens) against a hit (the whole chunks of n-1 tokens
    loaded through the connector, the rest computed over them)."""
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)

    def prefill() -> object:
        return model(ids, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1).item()

    recompute = _timed(prefill, device, repeat=3)
    hit = (n - 1) // chunk_tokens * chunk_tokens
    cache = DynamicCache()
    model(ids[:, :hit], past_key_values=cache, use_cache=True, logits_to_keep=1)

    def rest() -> object:
        out = model(ids[:, hit:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(hit)
        return out.logits[:, -1].argmax(-1).item()

    compute_rest = _timed(rest, device, repeat=3)

    def forward(wait: Callable[[int], None]) -> object:
        hooks = [
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i: wait(i))
            for i, layer in enumerate(model.model.layers)
        ]
        try:
            return rest()
        finally:
            for hook in hooks:
                hook.remove()

    load = connector_bandwidth(shape, hit, chunk_tokens, device, node_dir, forward)
    hit_s = load["load_seconds"] + compute_rest
    layerwise_s = load["load_with_forward_seconds"]
    return {
        "tokens": n,
        "hit_tokens": hit,
        "recompute_ttft_s": round(recompute, 4),
        "load_s": load["load_seconds"],
        "load_gbps": load["load_gbps"],
        "compute_rest_s": round(compute_rest, 4),
        "hit_ttft_s": round(hit_s, 4),
        "hit_over_recompute": round(hit_s / recompute, 3),
        "hit_layerwise_ttft_s": layerwise_s,
        "hit_layerwise_over_recompute": round(layerwise_s / recompute, 3),
        "prefill_tokens_per_s": round(n / recompute),
        "break_even_load_gbps": round(load["kv_bytes_per_token"] * n / recompute / 1e9, 2),
        "byte_exact": load["byte_exact"],
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}  torch {result['torch']}", "ordering checks:"]
    for layout, checks in result["ordering"].items():
        lines += [
            f"  {layout:<10} {name:<34} {'ok' if ok else 'FAILED'}" for name, ok in checks.items()
        ]
    lines.append("raw copies (GB/s): " + ", ".join(f"{k}={v}" for k, v in result["raw"].items()))
    lines.append("connector: " + ", ".join(f"{k}={v}" for k, v in result["connector"].items()))
    if "disk" in result:
        lines.append("disk: " + ", ".join(f"{k}={v}" for k, v in result["disk"].items()))
    for row in result.get("ttft", []):
        lines.append(
            f"  {row['tokens']:>6} tokens: recompute {row['recompute_ttft_s'] * 1e3:8.1f} ms, "
            f"hit {row['hit_ttft_s'] * 1e3:7.1f} ms (load {row['load_s'] * 1e3:.1f} at "
            f"{row['load_gbps']} GB/s + compute {row['compute_rest_s'] * 1e3:.1f}) = "
            f"{row['hit_over_recompute']}x; layer-wise {row['hit_layerwise_ttft_s'] * 1e3:.1f} ms "
            f"= {row['hit_layerwise_over_recompute']}x; "
            f"break-even load {row['break_even_load_gbps']} GB/s"
        )
    return "\n".join(lines)
