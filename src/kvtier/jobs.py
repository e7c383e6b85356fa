"""A store's background I/O jobs (write-behind, prefetch), and `flush` by ticket.

A job submitted from outside any job takes the next ticket; a job submitted by a running job
shares its parent's ticket (a prefetch's promotions, a promotion's write-back). `flush()` waits
until every ticket issued before it has finished all its jobs, so jobs issued meanwhile are not
waited for. The counters live under the store's condition, which is notified whenever a job
ends (a save waiting for memory that in-flight writes pin wakes up then).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvtier.errors import StoreClosed


class Jobs:
    """A pool of I/O workers whose jobs are counted until they end. With `nice` > 0 the workers
    run that much below the CPU priority of the thread that starts them (Linux: per thread),
    so background writes yield the cores to the compute they serve."""

    def __init__(self, workers: int, cond: threading.Condition, nice: int = 0) -> None:
        self._pool = ThreadPoolExecutor(
            workers, thread_name_prefix="kvtier-io", initializer=_lower_priority, initargs=(nice,)
        )
        self._cond = cond
        self.pending = 0  # jobs not yet finished (read under `cond`)
        self._issued = 0
        self._finished_below = 1  # every ticket below has finished all its jobs
        self._open: dict[int, int] = {}  # ticket -> its jobs not yet finished
        self._job = threading.local()  # .ticket: the ticket of the job this worker runs

    def submit(
        self, fn: Callable[..., None], *args: Any, cleanup: Callable[[], None] | None = None
    ) -> None:
        """Run `fn(*args)` on an I/O worker, counted as pending until it ends; if the pool
        has shut down (the store is closing), `cleanup` undoes what the job would have done
        and StoreClosed is raised."""
        with self._cond:
            self.pending += 1
            ticket: int | None = getattr(self._job, "ticket", None)
            if ticket is None:
                self._issued += 1
                ticket = self._issued
            self._open[ticket] = self._open.get(ticket, 0) + 1

        def run() -> None:
            self._job.ticket = ticket
            try:
                fn(*args)
            finally:
                self._job.ticket = None
                self._done(ticket)

        try:
            self._pool.submit(run)
        except RuntimeError as exc:  # the pool shut down: close() won the race
            self._done(ticket)
            if cleanup is not None:
                cleanup()
            raise StoreClosed("this Store was closed during the call") from exc

    def flush(self) -> None:
        """Wait until every job issued before this call has ended."""
        with self._cond:
            target = self._issued
            self._cond.wait_for(lambda: self._finished_below > target)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def _done(self, ticket: int) -> None:
        with self._cond:
            self.pending -= 1
            left = self._open[ticket] - 1
            if left:
                self._open[ticket] = left
            else:
                del self._open[ticket]
                while (
                    self._finished_below <= self._issued and self._finished_below not in self._open
                ):
                    self._finished_below += 1
            self._cond.notify_all()


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (to at most 19); where threads have
    no priority of their own (not Linux), nothing."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
