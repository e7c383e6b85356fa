"""Mooncake-format traces: parsing, partial blocks, clear errors, the shipped sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvtier.bench.trace import (
    BLOCK_TOKENS,
    SAMPLE,
    TraceError,
    TraceRecord,
    parse_line,
    read_trace,
    synthetic_trace,
    trace_requests,
    write_trace,
)


def _line(**fields: object) -> str:
    row: dict[str, object] = {
        "timestamp": 0,
        "input_length": 700,
        "output_length": 10,
        "hash_ids": [1, 2],
    }
    row.update(fields)
    return json.dumps(row)


def test_partial_last_block_gives_exact_input_length() -> None:
    """A partial last block is cut so the prompt has exactly input_length tokens."""
    rec = parse_line(_line(input_length=700))
    (req,) = trace_requests([rec])
    assert len(req.tokens) == 700
    assert req.tokens.dtype == np.int32


def test_same_hash_prefix_gives_same_tokens() -> None:
    """Blocks with the same ids expand to the same tokens; another id to other tokens."""
    a = TraceRecord(0, 1024, 1, (7, 8))
    b = TraceRecord(1000, 1500, 1, (7, 8, 9))
    c = TraceRecord(2000, 1024, 1, (7, 10))
    ra, rb, rc = trace_requests([a, b, c])
    assert np.array_equal(ra.tokens, rb.tokens[:1024])
    assert np.array_equal(ra.tokens[:BLOCK_TOKENS], rc.tokens[:BLOCK_TOKENS])
    assert not np.array_equal(ra.tokens[BLOCK_TOKENS:], rc.tokens[BLOCK_TOKENS:])
    assert [r.arrival_s for r in (ra, rb, rc)] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"timestamp": 0, "input_length": 3}), "expected an object with fields"),
        (_line(input_length=1025), "does not fit 2 hash_ids"),
        (_line(input_length=512), "does not fit 2 hash_ids"),
        (_line(hash_ids=[1, "x"]), "hash_ids a list of non-negative ints"),
        (_line(input_length=-1), "non-negative"),
    ],
)
def test_bad_lines_name_the_line_and_the_problem(tmp_path: Path, line: str, message: str) -> None:
    """A bad line raises TraceError with file:line and what is wrong."""
    path = tmp_path / "t.jsonl"
    path.write_text(_line() + "\n\n" + line + "\n")
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert f"{path}:3" in str(info.value)


def test_shipped_sample_is_what_make_sample_writes(tmp_path: Path) -> None:
    """The shipped sample equals `--make-sample` output and parses back to its records."""
    records = synthetic_trace(300, seed=0)
    path = tmp_path / "s.jsonl"
    write_trace(records, path)
    assert path.read_text() == SAMPLE.read_text()
    assert read_trace(path) == records
    assert len({r.hash_ids[0] for r in records}) > 1
