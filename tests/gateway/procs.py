"""`kvtier worker-sim` and `kvtier gateway` as real subprocesses on 127.0.0.1, their URLs
read from the lines they print at start; always stopped (SIGTERM, then SIGKILL) on exit."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

SRC = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT_S = 30.0


class BannerProcess:
    """`kvtier COMMAND ARGS`, started once `count` lines matching `banner` were printed."""

    banner: re.Pattern[str]

    def __init__(self, command: list[str], count: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.matches: list[re.Match[str]] = []
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._read_banners(count)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        """Every output line into `lines`, so the pipe never fills."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _read_banners(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        seen: list[str] = []
        while len(self.matches) < count:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"did not start: {''.join(seen)}") from None
            if not line:
                raise RuntimeError(f"exited: {''.join(seen)}")
            seen.append(line)
            match = self.banner.match(line.strip())
            if match:
                self.matches.append(match)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; the exit status. Prints what the process
        wrote, so pytest shows it with a failure."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        while not self.lines.empty():
            print(self.lines.get_nowait(), end="")
        return self.proc.returncode

    def __enter__(self) -> BannerProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class GatewayProcess(BannerProcess):
    """`kvtier gateway --port 0 --workers URLS ARGS`; `url` is its base URL."""

    banner = re.compile(r"^kvtier gateway: (http://\S+)")

    def __init__(self, workers: list[str], *args: str) -> None:
        super().__init__(["gateway", "--port", "0", "--workers", ",".join(workers), *args], 1)
        self.url = self.matches[0].group(1)


class SimProcess(BannerProcess):
    """`kvtier worker-sim --port 0 --count N ARGS`: `urls` and `events` (endpoint or None),
    one per worker."""

    banner = re.compile(r"^worker-sim (http://\S+)(?: events (tcp://\S+))?$")

    def __init__(self, *args: str, count: int = 1) -> None:
        super().__init__(["worker-sim", "--port", "0", "--count", str(count), *args], count)
        self.urls = [m.group(1) for m in self.matches]
        self.events: list[str | None] = [m.group(2) for m in self.matches]

    @property
    def url(self) -> str:
        return self.urls[0]
