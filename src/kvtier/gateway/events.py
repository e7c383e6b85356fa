"""vLLM's KV cache events on the wire, published and consumed.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'`) binds a ZeroMQ PUB socket and sends each batch as three
frames: topic, an 8-byte big-endian sequence number, and a msgpack `KVEventBatch`
`[ts, [event, ...], dp_rank]` whose events are maps tagged by `"type"`: `BlockStored`
(engine block hashes, parent hash, token ids, block size, medium, `extra_keys` with the
`cache_salt`), `BlockRemoved` and `AllBlocksCleared`. These structs mirror that format, so
`kvtier worker-sim` publishes what vLLM publishes and the gateway reads either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"  # kvtier's DRAM behind the engine
MEDIUM_DISK = "DISK"  # kvtier's local disk
MEDIUM_SHARED = "SHARED"  # kvtier's shared cache server: loadable by every worker


class BlockStored(msgspec.Struct, tag=True):
    """Blocks a worker stored, with their tokens; the first chains from `parent_block_hash`."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    """Blocks a worker evicted from `medium`."""

    block_hashes: list[int | bytes]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    """The worker's prefix cache was reset."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    """One published message: `[ts, [event, ...], dp_rank]`."""

    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)


def encode(events: list[Event]) -> bytes:
    return _encoder.encode(EventBatch(ts=time.time(), events=events))


def decode(payload: bytes) -> EventBatch:
    """Raises msgspec.DecodeError on a payload that is not a KV event batch."""
    return _decoder.decode(payload)


def salt_of(event: BlockStored) -> str:
    """The `cache_salt` vLLM puts in the first block's extra keys (after a LoRA name)."""
    if not event.extra_keys or not event.extra_keys[0]:
        return ""
    strings = [k for k in event.extra_keys[0] if isinstance(k, str) and k != event.lora_name]
    return strings[-1] if strings else ""


class Publisher:
    """A PUB socket bound on 127.0.0.1 (port 0: any free port), sending vLLM's frames."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", topic: str = "") -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._seq = itertools.count()

    def publish(self, events: list[Event]) -> None:
        if events:
            seq = next(self._seq).to_bytes(8, "big")
            self._sock.send_multipart((self._topic, seq, encode(events)), copy=False)

    def close(self) -> None:
        self._sock.close(linger=0)


async def subscribe(endpoint: str, ready: asyncio.Event | None = None) -> AsyncIterator[Event]:
    """Every event published at `endpoint`; batches that do not decode are skipped.

    A plain socket read without blocking, woken by its ZMQ_FD on the event loop: zmq.asyncio
    spends ~50 us of Python per message on futures and flag enums (a fifth of what a message
    costs the gateway, the wake-up being most of the rest). Per ZMQ_FD's contract the socket
    is read until EAGAIN before waiting again (the descriptor signals a change, not a message)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    fd: int | None = None
    try:
        sock.connect(endpoint)
        fd = sock.FD
        loop.add_reader(fd, readable.set)
        if ready is not None:
            ready.set()
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                readable.clear()
                await readable.wait()
                continue
            if len(frames) != 3:
                continue
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                for event in decode(frames[2]).events:
                    yield event
    finally:
        if fd is not None:
            loop.remove_reader(fd)
        sock.close(linger=0)
