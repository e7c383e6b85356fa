"""The processes `kvtier bench gateway` measures: `kvtier worker-sim --count K` (all workers
in one process) and `kvtier gateway` in front of them, as users run them. Each is started
from the command line and ready once it printed its banner line(s); stopped with SIGTERM,
then SIGKILL."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from types import TracebackType

START_TIMEOUT_S = 30.0
_SIM = re.compile(r"^worker-sim (http://\S+)(?: events (tcp://\S+) replay (tcp://\S+))?$")
_GATEWAY = re.compile(r"^kvtier gateway: (http://\S+)")


class Process:
    """`python -m kvtier.cli ARGS`, started once `count` lines matched `banner`."""

    def __init__(
        self,
        args: list[str],
        banner: re.Pattern[str],
        count: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = args[0]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()  # its output not yet read
        threading.Thread(target=self._drain, daemon=True).start()
        self.matches: list[re.Match[str]] = []
        try:
            self._wait(banner, count)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _wait(self, banner: re.Pattern[str], count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        seen: list[str] = []
        while len(self.matches) < count:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"kvtier {self.name} did not start: {seen}") from None
            if not line:
                raise RuntimeError(f"kvtier {self.name} exited: {''.join(seen)}")
            seen.append(line)
            if match := banner.match(line.strip()):
                self.matches.append(match)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def sims(count: int, options: list[str]) -> Process:
    """`count` workers in one `kvtier worker-sim` process, with KV events on."""
    args = ["worker-sim", "--port", "0", "--count", str(count), "--kv-events-port", "0"]
    return Process([*args, *options], _SIM, count)


def gateway(workers: Process, options: list[str]) -> Process:
    """`kvtier gateway` in front of every worker of `workers`, following their KV events."""
    urls = ",".join(m.group(1) for m in workers.matches)
    events = ",".join(m.group(2) or "" for m in workers.matches)
    replays = ",".join(m.group(3) or "" for m in workers.matches)
    args = ["gateway", "--port", "0", "--workers", urls, "--kv-events", events,
            "--kv-events-replay", replays]  # fmt: skip
    return Process([*args, *options], _GATEWAY, 1)


def worker_urls(workers: Process) -> list[str]:
    return [m.group(1) for m in workers.matches]


def gateway_url(gw: Process) -> str:
    return gw.matches[0].group(1)
