"""The kvtier wire protocol: length-prefixed binary frames with a fixed header.

Every frame (request or reply) is a 24-byte header followed by a body of
`key_count * 16` key bytes and then `payload_bytes` payload bytes:

    magic "KVTR" | version u8 | opcode u8 | status u16 | request_id u32 |
    key_count u32 | payload_bytes u64                        (little-endian)

Requests and their payloads (a reply echoes opcode and request_id; status OK or an error
whose payload is a UTF-8 message):

    HELLO          no keys; payload = token (UTF-8)       reply: tenant name (UTF-8)
    PING           nothing                                reply: nothing
    EXISTS_PREFIX  keys                                   reply: u32 leading keys present
    GET            keys; u64 expected size per key        reply: u8 found flag per key, then
                                                                 the found chunks' bytes
    PUT            keys; u64 size per key, then the data  reply: u8 stored flag per key
    DELETE         keys                                   reply: u32 keys deleted
    STATS          nothing                                reply: JSON (UTF-8)
    MAP            nothing                                reply: u64 capacity, u64 device,
                                                                 u64 inode, then the path (UTF-8)
    GET_LOCAL      keys; u64 expected size per key        reply: u8 found flag per key, then a
                                                                 u64 offset per found chunk
    RELEASE        keys                                   reply: u32 pins released
    PUT_LOCAL      keys; u64 size per key                 reply: u8 reserved flag per key,
                                                                 then a u64 offset per reserved
    COMMIT         keys                                   reply: u32 chunks published
    LOCATE         keys                                   reply: u8 tier per leading key
                                                                 present (1 dram, 2 disk,
                                                                 3 remote): as many as found
    PIN            keys (a prefix)                        reply: u32 keys pinned (its stored
                                                                 leading run); refused: 0,
                                                                 then the reason (UTF-8)
    UNPIN          keys                                   reply: u32 longest prefix unpinned

MAP, GET_LOCAL and RELEASE are the same-host fast path: a server whose DRAM tier lives in a
shared file (`dram_shm`) tells a client where it is (MAP; UNSUPPORTED otherwise), GET_LOCAL
pins each found chunk in DRAM for this connection and answers its byte offset in that file,
RELEASE drops one pin per key. A connection's pins go when it closes.

PUT_LOCAL and COMMIT are its write half, answered only by a server that lets its same-host
clients write into that file (the node-local process of the vLLM connector; UNSUPPORTED
otherwise): PUT_LOCAL reserves a DRAM slot per new chunk (flag 0: held already, or no room)
and answers its offset; the client writes the chunk's bytes there and sends COMMIT, which
publishes them (and starts their lower-tier writes). Reserved slots not committed when the
connection closes are given back.

Replies carry no keys (key_count 0). Requests may be pipelined; replies come back in
request order.

A server with TLS (`kvtiers://`) answers a client that starts in plaintext with one
plaintext reply of status TLS_REQUIRED (its payload a UTF-8 message), then closes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from kvtier.errors import ProtocolError
from kvtier.keys import KEY_BYTES

MAGIC = b"KVTR"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_BYTES = HEADER.size
SIZE = struct.Struct("<Q")
COUNT = struct.Struct("<I")
MAP_INFO = struct.Struct("<QQQ")  # a MAP reply: capacity_bytes, device, inode; then the path
MAX_TOKEN_BYTES = 4096
TIER_CODES = {"dram": 1, "disk": 2, "remote": 3}  # a LOCATE reply's byte per chunk


class Op(IntEnum):
    HELLO = 1
    PING = 2
    EXISTS_PREFIX = 3
    GET = 4
    PUT = 5
    DELETE = 6
    STATS = 7
    MAP = 8
    GET_LOCAL = 9
    RELEASE = 10
    PUT_LOCAL = 11
    COMMIT = 12
    LOCATE = 13
    PIN = 14
    UNPIN = 15


class Status(IntEnum):
    OK = 0
    ERROR = 1
    AUTH_REQUIRED = 2
    AUTH_FAILED = 3
    UNSUPPORTED = 4
    TLS_REQUIRED = 5  # sent in plaintext by a TLS server to a plaintext client, then closed


# A frame body carries, per chunk, its key and its u64 size (PUT) or a u8 found flag (GET
# reply) on top of the chunk's bytes: the frame limit is the chunk limit plus this.
CHUNK_OVERHEAD_BYTES = KEY_BYTES + SIZE.size


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits a server enforces on every frame (and a client on every request and reply).

    `max_chunk_bytes` is the one source of truth for the largest chunk the wire carries; the
    frame limit is derived from it, so a chunk at the limit always fits in one PUT frame and
    in one GET reply.
    """

    max_keys: int = 4096
    max_chunk_bytes: int = 256 << 20
    drain_timeout_s: float = 30.0  # a GET reply not read by then is dropped with its connection

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame body (keys + payload, header excluded): one chunk at the limit."""
        return self.max_chunk_bytes + CHUNK_OVERHEAD_BYTES

    def check_sizes(self, sizes: list[int]) -> None:
        for size in sizes:
            if not 0 < size <= self.max_chunk_bytes:
                raise ProtocolError(f"chunk size {size} is outside 1..{self.max_chunk_bytes} bytes")

    def check_reply(self, sizes: list[int]) -> None:
        """A GET's reply (found flags, then every chunk) must fit in one frame."""
        reply = len(sizes) + sum(sizes)
        if reply > self.max_frame_bytes:
            raise ProtocolError(
                f"GET of {len(sizes)} chunks needs a {reply}-byte reply; the limit is "
                f"{self.max_frame_bytes}: ask for fewer chunks per GET"
            )


LIMITS = Limits()  # what every client and a default server use


class Header(NamedTuple):
    opcode: int
    status: int
    request_id: int
    key_count: int
    payload_bytes: int

    @property
    def body_bytes(self) -> int:
        return self.key_count * KEY_BYTES + self.payload_bytes


def pack_header(
    opcode: int, request_id: int, key_count: int, payload_bytes: int, status: int = Status.OK
) -> bytes:
    return HEADER.pack(MAGIC, VERSION, opcode, status, request_id, key_count, payload_bytes)


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Decode a frame header; raises ProtocolError for a frame that is not ours."""
    magic, version, opcode, status, request_id, key_count, payload = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: the peer is not a kvtier server")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}: upgrade kvtier")
    return Header(opcode, status, request_id, key_count, payload)


def check_request(header: Header, limits: Limits) -> Op:
    """The opcode of a request header that respects `limits`; raises ProtocolError otherwise."""
    try:
        op = Op(header.opcode)
    except ValueError as exc:
        raise ProtocolError(f"unknown opcode {header.opcode}") from exc
    n, payload = header.key_count, header.payload_bytes
    if n > limits.max_keys:
        raise ProtocolError(f"{n} keys in one frame; the limit is {limits.max_keys}")
    if header.body_bytes > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {header.body_bytes} bytes; limit {limits.max_frame_bytes}")
    expected = {
        Op.HELLO: (n == 0 and payload <= MAX_TOKEN_BYTES),
        Op.PING: (n == 0 and payload == 0),
        Op.STATS: (n == 0 and payload == 0),
        Op.MAP: (n == 0 and payload == 0),
        Op.GET_LOCAL: (n > 0 and payload == n * SIZE.size),
        Op.RELEASE: (payload == 0),
        Op.PUT_LOCAL: (n > 0 and payload == n * SIZE.size),
        Op.COMMIT: (n > 0 and payload == 0),
        Op.LOCATE: (payload == 0),
        Op.PIN: (n > 0 and payload == 0),
        Op.UNPIN: (n > 0 and payload == 0),
        Op.EXISTS_PREFIX: (payload == 0),
        Op.DELETE: (payload == 0),
        Op.GET: (n > 0 and payload == n * SIZE.size),
        Op.PUT: (n > 0 and payload > n * SIZE.size),
    }[op]
    if not expected:
        raise ProtocolError(f"{op.name} frame with {n} keys and {payload} payload bytes")
    return op


def split_keys(body: memoryview, key_count: int) -> list[bytes]:
    """The keys at the start of a frame body."""
    return [bytes(body[i * KEY_BYTES : (i + 1) * KEY_BYTES]) for i in range(key_count)]


def unpack_sizes(buf: memoryview, count: int) -> list[int]:
    return list(struct.unpack_from(f"<{count}Q", buf))


def pack_sizes(sizes: list[int]) -> bytes:
    return struct.pack(f"<{len(sizes)}Q", *sizes)
