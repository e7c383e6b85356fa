"""vLLM's KV cache events on the wire, published and consumed.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'`) binds a ZeroMQ PUB socket and sends each batch as three
frames: topic, an 8-byte big-endian sequence number, and a msgpack `KVEventBatch`
`[ts, [event, ...], dp_rank]` whose events are maps tagged by `"type"`: `BlockStored`
(engine block hashes, parent hash, token ids, block size, medium, `extra_keys` with the
`cache_salt`), `BlockRemoved` and `AllBlocksCleared`. These structs mirror that format, so
`kvtier worker-sim` publishes what vLLM publishes and the gateway reads either.

A PUB socket sends to whoever is connected: a gateway started after a worker never hears of
the blocks the worker stored before, and one that falls behind loses batches. vLLM keeps its
last batches for replay when given a `replay_endpoint` (a ROUTER socket): a client sends the
first sequence number it wants (8 bytes, big-endian) and gets every buffered batch from it
on, then an end marker (sequence -1). `subscribe` asks it for everything buffered when it
starts and for what it missed when a sequence number is skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
import zmq

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"  # kvtier's DRAM behind the engine
MEDIUM_DISK = "DISK"  # kvtier's local disk
MEDIUM_SHARED = "SHARED"  # kvtier's shared cache server: loadable by every worker
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # vLLM's end of a replay
REPLAY_BATCHES = 10_000  # batches kept for replay (vLLM's `buffer_steps` default)
REPLAY_TIMEOUT_S = 2.0  # a replay socket silent this long is given up on...
REPLAY_BACKOFF_S = 30.0  # ...and not asked again for this long
REPLAY_ATTEMPTS = 5  # a replay cut short is asked again from where it stopped


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
    """A PUB socket bound on 127.0.0.1 (port 0: any free port), sending vLLM's frames; with
    `replay_endpoint`, a ROUTER socket that replays the last `buffer_batches` as vLLM's does
    (served by a thread of its own)."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:0",
        topic: str = "",
        replay_endpoint: str | None = None,
        buffer_batches: int = REPLAY_BATCHES,
    ) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._seq = itertools.count()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.replay_endpoint: str | None = None
        self._replayer: threading.Thread | None = None
        if replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops what exceeds it
            router.bind(replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replayer = threading.Thread(
                target=self._serve_replays, args=(router,), name="kv-events-replay", daemon=True
            )
            self._replayer.start()

    def publish(self, events: list[Event]) -> None:
        if events:
            seq = next(self._seq)
            payload = encode(events)
            if self._replayer is not None:
                with self._lock:
                    self._buffer.append((seq, payload))
            self._sock.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), copy=False)

    def _serve_replays(self, router: zmq.Socket[bytes]) -> None:
        try:
            while not self._closing.is_set():
                if not router.poll(100):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or len(frames[2]) != 8:
                    continue
                client, first = frames[0], int.from_bytes(frames[2], "big")
                with self._lock:
                    batches = [(seq, payload) for seq, payload in self._buffer if seq >= first]
                for seq, payload in batches:
                    seq_bytes = seq.to_bytes(8, "big")
                    router.send_multipart((client, b"", self._topic, seq_bytes, payload))
                router.send_multipart((client, b"", b"", END_SEQ, b""))
        finally:
            router.close(linger=0)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._replayer is not None:
            self._closing.set()
            self._replayer.join()


class _Reader:
    """A ZeroMQ socket read without blocking the event loop, woken by its ZMQ_FD.

    zmq.asyncio spends ~50 us of Python per message on futures and flag enums (a fifth of
    what a message costs the gateway, the wake-up being most of the rest). Per ZMQ_FD's
    contract the socket is read until EAGAIN before waiting again (the descriptor signals a
    change, not a message)."""

    def __init__(self, kind: int, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        else:  # a replay comes all at once: queued here, not dropped by this side's limit
            self.sock.setsockopt(zmq.RCVHWM, 0)
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()
        try:
            self.sock.connect(endpoint)
            self._fd: int = self.sock.FD
        except BaseException:
            self.sock.close(linger=0)
            raise

    async def recv(self, timeout_s: float | None = None) -> list[bytes]:
        """The next message; TimeoutError if none comes within `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._readable.clear()
            # The descriptor signals edges only, and any send or recv may have consumed one:
            # ZMQ_EVENTS says whether a message came meanwhile.
            if int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                continue
            # Watched only while waiting: a descriptor left readable while this socket is not
            # read (the live one during a replay) would wake the loop on every pass.
            self._loop.add_reader(self._fd, self._readable.set)
            try:
                if deadline is None:
                    await self._readable.wait()
                    continue
                # Not asyncio.wait_for: on Python < 3.12 it can swallow a cancellation that
                # arrives as the wait ends, and a cancelled subscription would then live on.
                waiter = asyncio.ensure_future(self._readable.wait())
                try:
                    done, _ = await asyncio.wait({waiter}, timeout=deadline - time.monotonic())
                finally:
                    waiter.cancel()
                if not done:
                    raise TimeoutError
            finally:
                self._loop.remove_reader(self._fd)

    def close(self) -> None:
        self.sock.close(linger=0)


async def _replayed(endpoint: str, first: int) -> AsyncGenerator[tuple[int, bytes], None]:
    """(sequence, payload) of every batch the replay socket at `endpoint` holds from `first`
    on. Raises TimeoutError if it stays silent REPLAY_TIMEOUT_S."""
    dealer = _Reader(zmq.DEALER, endpoint)
    try:
        dealer.sock.send_multipart((b"", first.to_bytes(8, "big")))
        while True:
            frames = await dealer.recv(REPLAY_TIMEOUT_S)
            if len(frames) != 4:
                continue
            if frames[2] == END_SEQ:
                return
            yield int.from_bytes(frames[2], "big"), frames[3]
    finally:
        dealer.close()


def _events(payload: bytes) -> list[Event]:
    """The events of one batch; none if it does not decode."""
    try:
        return decode(payload).events
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


class _Cursor:
    """Where a subscription is in a worker's batch sequence, and its replays."""

    def __init__(self, replay: str | None) -> None:
        self.replay = replay
        self.last: int | None = None  # the last batch yielded
        # batches a replay brought that the live stream may bring again: sequence -> digest
        self.replayed: dict[int, int] = {}
        self._retry_at = 0.0

    def can_replay(self) -> bool:
        return self.replay is not None and time.monotonic() >= self._retry_at

    async def catch_up(self, first: int) -> AsyncIterator[Event]:
        """The events of the batches the replay socket holds from `first` on, past `last`.
        A replay cut short (silent before its end marker, or missing batches after its
        first: vLLM's replay socket drops what exceeds its queue limit) is asked again from
        the first batch missing, as long as each try brings some; after REPLAY_ATTEMPTS
        tries that bring nothing it is given up on for REPLAY_BACKOFF_S."""
        assert self.replay is not None
        fruitless = 0
        while fruitless < REPLAY_ATTEMPTS:
            got, cut = 0, False
            replies = _replayed(self.replay, first)
            try:
                async for seq, payload in replies:
                    if got and seq != first:  # a batch dropped on the way
                        cut = True
                        break
                    got += 1
                    first = seq + 1
                    if self.last is None or seq > self.last:
                        self.last = seq
                        self.replayed[seq] = hash(payload)
                        for event in _events(payload):
                            yield event
            except TimeoutError:
                cut = True
            finally:
                await replies.aclose()  # its socket closed now, not when collected
            if not cut:
                return
            fruitless = 0 if got else fruitless + 1
            log.info("KV event replay at %s was cut short; asking from %d", self.replay, first)
        log.warning("KV event replay at %s did not answer; live events only", self.replay)
        self._retry_at = time.monotonic() + REPLAY_BACKOFF_S

    def repeated(self, seq: int, payload: bytes) -> bool:
        """A live batch a replay brought already (a restarted worker's batch of the same
        number is another batch)."""
        return self.replayed.get(seq) == hash(payload)


async def subscribe(
    endpoint: str, ready: asyncio.Event | None = None, replay: str | None = None
) -> AsyncIterator[Event]:
    """Every event published at `endpoint`; batches that do not decode are skipped.

    With `replay` (the worker's replay endpoint), first every batch the worker still holds,
    and again the batches missed whenever a sequence number is skipped; each batch once.
    A sequence number that goes back means the worker restarted, with an empty prefix cache:
    an `AllBlocksCleared` is yielded. A replay socket that does not answer is given up on for
    REPLAY_BACKOFF_S (the live events go on)."""
    sub = _Reader(zmq.SUB, endpoint)
    cursor = _Cursor(replay)
    try:
        if ready is not None:
            ready.set()
        if cursor.can_replay():
            async for event in cursor.catch_up(0):
                yield event
        while True:
            frames = await sub.recv()
            if len(frames) != 3 or len(frames[1]) != 8:
                continue
            seq, payload = int.from_bytes(frames[1], "big"), frames[2]
            last = cursor.last
            if last is not None and seq <= last:
                if cursor.repeated(seq, payload):
                    continue
                yield AllBlocksCleared()  # the worker started over, from batch 0
                cursor.replayed.clear()
                last = cursor.last = -1
            if last is not None and seq > last + 1 and cursor.can_replay():
                async for event in cursor.catch_up(last + 1):
                    yield event
                if cursor.repeated(seq, payload):
                    continue  # the replay brought it
            cursor.last = seq
            cursor.replayed.clear()  # the live stream is past what the replays brought
            for event in _events(payload):
                yield event
    finally:
        sub.close()
