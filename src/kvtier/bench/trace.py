"""Traces in the public Mooncake format, and a synthetic one for tests and benchmarks.

One JSON object per line: `timestamp` (ms), `input_length`, `output_length` and `hash_ids`,
the ids of the prompt's 512-token blocks (the same id at the same position means the same
prefix; the last block may be partial). Each id expands to 512 deterministic token ids.

The shipped sample (`kvtier/bench/data/sample_trace.jsonl`) is made by
`python -m kvtier.bench.trace --make-sample` (`synthetic_trace(300, seed=0)`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.bench.workloads import VOCAB, Request, Tokens

BLOCK_TOKENS = 512
SAMPLE = Path(__file__).parent / "data" / "sample_trace.jsonl"
_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


class TraceError(ValueError):
    """A trace line that is not a valid Mooncake-format record."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_line(line: str, where: str = "trace") -> TraceRecord:
    """One record; raises TraceError naming the line and what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict) or any(k not in obj for k in _FIELDS):
        raise TraceError(f"{where}: expected an object with fields {', '.join(_FIELDS)}")
    ts, n_in, n_out, ids = (obj[k] for k in _FIELDS)
    ids_ok = isinstance(ids, list) and all(_count(v) for v in ids)
    if not isinstance(ts, (int, float)) or not ids_ok or not _count(n_in) or not _count(n_out):
        raise TraceError(
            f"{where}: timestamp must be a number, input_length/output_length non-negative "
            "ints and hash_ids a list of non-negative ints"
        )
    blocks = len(ids)
    if not (blocks - 1) * BLOCK_TOKENS < n_in <= blocks * BLOCK_TOKENS:
        raise TraceError(
            f"{where}: input_length {n_in} does not fit {blocks} hash_ids of "
            f"{BLOCK_TOKENS}-token blocks (expected {(blocks - 1) * BLOCK_TOKENS + 1}.."
            f"{blocks * BLOCK_TOKENS})"
        )
    return TraceRecord(float(ts), n_in, n_out, tuple(ids))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """Every record of a JSONL trace (blank lines skipped), at most `limit`."""
    records: list[TraceRecord] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(records) >= limit:
                    break
                if line.strip():
                    records.append(parse_line(line, f"{path}:{number}"))
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from exc
    return records


@functools.lru_cache(maxsize=1 << 15)
def block_tokens(hash_id: int) -> Tokens:
    """The 512 token ids block `hash_id` stands for (deterministic, cached, read-only)."""
    tokens = np.random.default_rng([hash_id, 0x6B76]).integers(0, VOCAB, BLOCK_TOKENS, np.int32)
    tokens.flags.writeable = False
    return tokens


def trace_requests(records: Iterable[TraceRecord]) -> Iterator[Request]:
    """Requests in trace order; arrival times start at 0 s."""
    start: float | None = None
    for i, rec in enumerate(records):
        start = rec.timestamp_ms if start is None else start
        tokens = np.concatenate([block_tokens(h) for h in rec.hash_ids])[: rec.input_length]
        yield Request((rec.timestamp_ms - start) / 1000.0, f"t{i}", tokens, rec.output_length)


def synthetic_trace(requests: int, seed: int = 0, rate_per_s: float = 3.33) -> list[TraceRecord]:
    """A chat-service-like trace: sessions over a few shared system prompts, each turn
    extending its session's previous prompt; Poisson arrivals (Mooncake: ~12k/hour)."""
    rng = np.random.default_rng([seed, 0x7472])
    next_id = iter(range(1, 1 << 62))
    systems = [[next(next_id) for _ in range(int(rng.integers(1, 9)))] for _ in range(8)]
    sessions: list[tuple[list[int], int, int]] = []  # (hash_ids, input_length, turns)
    out: list[TraceRecord] = []
    at_ms = 0.0
    for _ in range(requests):
        at_ms += float(rng.exponential(1000.0 / rate_per_s))
        if sessions and rng.random() < 0.7:
            ids, length, turns = sessions.pop(int(rng.integers(len(sessions))))
            keep = length // BLOCK_TOKENS  # a partial last block changes once extended
            ids, length = ids[:keep], length + int(rng.integers(200, 2500))
        else:
            ids = list(systems[min(int(rng.zipf(1.5)), len(systems)) - 1])
            length, turns = len(ids) * BLOCK_TOKENS + int(rng.integers(100, 3000)), 0
        ids += [next(next_id) for _ in range(-(-length // BLOCK_TOKENS) - len(ids))]
        out.append(TraceRecord(round(at_ms, 1), length, int(rng.integers(50, 800)), tuple(ids)))
        if turns < 12 and length < 48_000:
            sessions.append((ids, length, turns + 1))
    return out


def write_trace(records: Sequence[TraceRecord], path: str | Path) -> None:
    """Write records as Mooncake-format JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            ts = int(r.timestamp_ms) if r.timestamp_ms.is_integer() else r.timestamp_ms
            row = {"timestamp": ts, "input_length": r.input_length}
            f.write(json.dumps({**row, "output_length": r.output_length, "hash_ids": r.hash_ids}))
            f.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.bench.trace")
    parser.add_argument("--make-sample", action="store_true", help="write a synthetic trace")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    if not args.make_sample:
        parser.print_help()
        return 2
    write_trace(synthetic_trace(args.requests, args.seed), args.out)
    print(f"wrote {args.requests} requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
