"""KV event subscriptions with vLLM's replay socket: a late subscriber first gets what the
worker still holds, a skipped sequence number is fetched again, each batch arrives once, and
a worker that starts over clears what it held. Real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zmq

from kvtier.gateway import events
from kvtier.gateway.events import AllBlocksCleared, BlockStored, Event, Publisher, subscribe

ANY = "tcp://127.0.0.1:0"


def stored(n: int) -> BlockStored:
    """Batch `n`'s one event: block hash n, chained to n - 1."""
    return BlockStored([n], n - 1 if n else None, [n] * 4, 4, medium="GPU")


def numbers(got: list[Event]) -> list[int | str]:
    out: list[int | str] = []
    for e in got:
        if isinstance(e, AllBlocksCleared):
            out.append("clear")
        else:
            assert isinstance(e, BlockStored) and isinstance(e.block_hashes[0], int)
            out.append(e.block_hashes[0])
    return out


class Heard:
    """The events of a subscription, pumped into a queue by a task of their own (a timed-out
    wait on the generator itself would close it)."""

    def __init__(self, stream: AsyncIterator[Event]) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._stream = stream
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for event in self._stream:
            self.queue.put_nowait(event)

    async def take(self, n: int, timeout_s: float = 5.0) -> list[Event]:
        """The next `n` events."""
        return [await asyncio.wait_for(self.queue.get(), timeout_s) for _ in range(n)]

    async def settle(self, quiet_s: float = 0.3) -> list[Event]:
        """The events heard until none comes for `quiet_s`."""
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(self.queue.get(), quiet_s))
            except TimeoutError:
                return got

    async def join(self, publish: Callable[[int], None]) -> list[Event]:
        """Publishes probes `publish(k)`, k from 1000 on, until one is heard (ZeroMQ drops
        what is published before a subscriber has joined); returns what was heard."""
        for k in range(1000, 1200):
            publish(k)
            try:
                first = await asyncio.wait_for(self.queue.get(), 0.05)
            except TimeoutError:
                continue
            return [first, *await self.settle()]
        raise AssertionError("the subscription never joined")

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def test_a_late_subscriber_gets_the_held_batches_then_live_ones_once() -> None:
    async def scenario() -> list[Event]:
        pub = Publisher(ANY, replay_endpoint=ANY)
        try:
            for n in range(5):  # before anyone listens
                pub.publish([stored(n)])
            heard = Heard(subscribe(pub.endpoint, replay=pub.replay_endpoint))
            got = await heard.take(5)
            for n in range(5, 8):
                pub.publish([stored(n)])
            got += await heard.take(3)
            got += await heard.settle()  # nothing twice
            await heard.close()
            return got
        finally:
            pub.close()

    assert numbers(asyncio.run(scenario())) == list(range(8))


def test_without_replay_a_late_subscriber_hears_only_what_follows() -> None:
    async def scenario() -> list[Event]:
        pub = Publisher(ANY, replay_endpoint=ANY)
        try:
            for n in range(5):
                pub.publish([stored(n)])
            heard = Heard(subscribe(pub.endpoint))
            got = await heard.join(lambda k: pub.publish([stored(k)]))
            await heard.close()
            return got
        finally:
            pub.close()

    got = numbers(asyncio.run(scenario()))
    assert got and all(isinstance(n, int) and n >= 1000 for n in got)


class RawWorker:
    """A PUB and a replay ROUTER driven by hand: `send(seq)` publishes batch `seq` live,
    `hold(seq)` only keeps it for replay (a batch the subscriber missed); the replay
    socket answers as vLLM's does, from a thread."""

    def __init__(self, answer: bool = True) -> None:
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(ANY)
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.bind(ANY)
        self.replay = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.held: dict[int, bytes] = {}
        self.requests: list[int] = []
        self._stop = threading.Event()
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def hold(self, seq: int, n: int | None = None) -> bytes:
        payload = events.encode([stored(seq if n is None else n)])
        self.held[seq] = payload
        return payload

    def send(self, seq: int, n: int | None = None) -> None:
        self.pub.send_multipart((b"", seq.to_bytes(8, "big"), self.hold(seq, n)))

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            client, _, first = self.router.recv_multipart()
            start = int.from_bytes(first, "big")
            self.requests.append(start)
            if not self._answer:
                continue
            for seq in sorted(s for s in self.held if s >= start):
                seq_bytes = seq.to_bytes(8, "big")
                self.router.send_multipart((client, b"", b"", seq_bytes, self.held[seq]))
            self.router.send_multipart((client, b"", b"", events.END_SEQ, b""))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pub.close(linger=0)
        self.router.close(linger=0)


def test_a_skipped_sequence_number_is_fetched_from_the_replay_socket() -> None:
    async def scenario() -> tuple[list[Event], list[int]]:
        worker = RawWorker()
        try:
            heard = Heard(subscribe(worker.endpoint, replay=worker.replay))
            seqs = itertools.count()
            got = await heard.join(lambda k: worker.send(next(seqs), k))
            seq = next(seqs)
            worker.send(seq, 1)
            worker.hold(seq + 1, 2)  # published while the subscriber was away
            worker.hold(seq + 2, 3)
            worker.send(seq + 3, 4)
            worker.send(seq + 4, 5)
            got += await heard.settle()
            await heard.close()
            return got, worker.requests
        finally:
            worker.close()

    got, requests = asyncio.run(scenario())
    probes = [n for n in numbers(got) if isinstance(n, int) and n >= 1000]
    assert probes == sorted(set(probes))  # each once, in order
    assert [n for n in numbers(got) if isinstance(n, int) and n < 1000] == [1, 2, 3, 4, 5]
    assert len(requests) == 2 and requests[0] == 0  # at the start, then from the gap


def test_a_sequence_that_starts_over_means_a_restarted_worker() -> None:
    async def scenario() -> list[Event]:
        worker = RawWorker()
        try:
            heard = Heard(subscribe(worker.endpoint))
            seqs = itertools.count()
            await heard.join(lambda k: worker.send(next(seqs), k))
            worker.send(0, 7)  # the restarted worker's first batch
            got = await heard.settle()
            await heard.close()
            return got
        finally:
            worker.close()

    assert numbers(asyncio.run(scenario())) == ["clear", 7]


def test_a_replay_socket_that_does_not_answer_leaves_the_live_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "REPLAY_TIMEOUT_S", 0.2)

    async def scenario() -> list[Event]:
        worker = RawWorker(answer=False)
        try:
            heard = Heard(subscribe(worker.endpoint, replay=worker.replay))
            seqs = itertools.count()
            got = await heard.join(lambda k: worker.send(next(seqs), k))
            seq = next(seqs) + 50  # a gap: not asked for again within REPLAY_BACKOFF_S
            worker.send(seq, 1)
            worker.send(seq + 1, 2)
            got += await heard.settle()
            await heard.close()
            return got
        finally:
            worker.close()

    got = numbers(asyncio.run(scenario()))
    assert [n for n in got if isinstance(n, int) and n < 1000] == [1, 2]


def test_a_worker_restarted_after_a_replay_is_heard_from_its_first_batch() -> None:
    """Batches a replay brought are skipped when the live stream repeats them, but a
    restarted worker's batches under the same numbers are other batches: a clear, then all
    of them."""

    async def scenario() -> list[Event]:
        worker = RawWorker()
        try:
            for seq in range(5):
                worker.hold(seq, seq)
            heard = Heard(subscribe(worker.endpoint, replay=worker.replay))
            got = await heard.take(5)
            worker.held.clear()  # the worker restarts: numbering starts over
            seqs = itertools.count()
            got += await heard.join(lambda k: worker.send(next(seqs), k))
            await heard.close()
            return got
        finally:
            worker.close()

    got = numbers(asyncio.run(scenario()))
    assert got[:6] == [0, 1, 2, 3, 4, "clear"]
    probes = got[6:]
    assert probes == list(range(1000, 1000 + len(probes)))  # from the first, none lost


@pytest.mark.parametrize("publisher", ["kvtier", "vllm"])
def test_a_replay_of_thousands_of_batches_arrives_whole(publisher: str, tmp_path: Path) -> None:
    """A replay is sent all at once: 3,000 buffered batches (vLLM's own publisher, or
    worker-sim's) all reach a late subscriber, in order, beyond ZeroMQ's default queue
    limits of 1,000 messages."""
    n = 3000

    async def scenario() -> list[Event]:
        if publisher == "vllm":
            from vllm.distributed.kv_events import BlockStored as VllmStored
            from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

            endpoint, replay = f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/replay"
            vllm_pub = ZmqEventPublisher(0, endpoint=endpoint, replay_endpoint=replay)
            for i in range(n):
                event = VllmStored([i], i - 1 if i else None, [i] * 4, 4, None, "GPU", None)
                vllm_pub.publish(KVEventBatch(ts=0.0, events=[event]))
            while len(vllm_pub._buffer) < n:  # published by its own thread
                await asyncio.sleep(0.05)
            close = vllm_pub.shutdown
        else:
            pub = Publisher(ANY, replay_endpoint=ANY)
            for i in range(n):
                pub.publish([stored(i)])
            endpoint, replay, close = pub.endpoint, pub.replay_endpoint or "", pub.close
        try:
            heard = Heard(subscribe(endpoint, replay=replay))
            got = await heard.take(n, timeout_s=10.0)
            await heard.close()
            return got
        finally:
            close()

    assert numbers(asyncio.run(scenario())) == list(range(n))
