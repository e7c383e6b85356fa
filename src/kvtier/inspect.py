"""`kvtier inspect DIR [--verify]`: what a disk tier holds, and whether every chunk verifies."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

from kvtier.tiers.disk import HEADER_BYTES, SUFFIX, checksum, parse_header


class ChunkReport(NamedTuple):
    path: Path
    payload_bytes: int
    ok: bool
    problem: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="the disk_dir of a store (or its kvtier-v1 folder)")
    parser.add_argument("--verify", action="store_true", help="read every chunk, check checksums")
    parser.add_argument("--list", action="store_true", help="print one line per chunk")


def inspect_chunk(path: Path, verify: bool) -> ChunkReport:
    """Header check (and with `verify`, payload checksum) of one chunk file."""
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
        meta = parse_header(header)
        if meta is None:
            return ChunkReport(path, 0, False, "not a kvtier chunk header")
        if meta.key.hex() + SUFFIX != path.name:
            return ChunkReport(path, meta.payload_bytes, False, "key does not match file name")
        size = os.fstat(f.fileno()).st_size
        if size != HEADER_BYTES + meta.payload_bytes:
            return ChunkReport(path, meta.payload_bytes, False, f"truncated ({size} bytes)")
        if verify and checksum(meta.key, [memoryview(f.read())]) != meta.checksum:
            return ChunkReport(path, meta.payload_bytes, False, "checksum mismatch")
    return ChunkReport(path, meta.payload_bytes, True, "")


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if (root / "kvtier-v1").is_dir():
        root = root / "kvtier-v1"
    if not root.is_dir():
        print(f"kvtier inspect: {args.dir} holds no kvtier disk tier", file=sys.stderr)
        return 2
    files = sorted(root.glob(f"??/*{SUFFIX}"))
    reports = [inspect_chunk(path, args.verify) for path in files]
    bad = [r for r in reports if not r.ok]
    total = sum(r.payload_bytes for r in reports)
    for r in reports if args.list else bad:
        print(f"{'ok ' if r.ok else 'BAD'} {r.path.name} {r.payload_bytes} {r.problem}")
    checked = "verified" if args.verify else "headers checked"
    print(
        f"{root}: {len(reports)} chunks, {total / 2**20:.1f} MiB payload, {checked}, {len(bad)} bad"
    )
    return 1 if bad else 0
