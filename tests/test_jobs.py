"""The store's background I/O pool: its workers run below the starting thread's CPU priority."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from kvtier.jobs import Jobs


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority: Linux")
@pytest.mark.parametrize("nice", [0, 5, 19])
def test_io_workers_run_at_the_given_nice_and_the_caller_keeps_its_own(nice: int) -> None:
    """A job runs `nice` below the caller's priority (capped at 19); the caller is unchanged."""
    base = _priority()
    seen: list[int] = []
    jobs = Jobs(2, threading.Condition(), nice)
    try:
        for _ in range(4):
            jobs.submit(lambda: seen.append(_priority()))
        jobs.flush()
    finally:
        jobs.shutdown()
    assert seen == [min(base + nice, 19)] * 4
    assert _priority() == base
