"""`kvtier worker-sim` as a real subprocess on 127.0.0.1, its ports read from its banner."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

SRC = Path(__file__).resolve().parents[2] / "src"
_BANNER = re.compile(r"^worker-sim (http://\S+)(?: events (tcp://\S+))?$")
START_TIMEOUT_S = 20.0


class SimProcess:
    """`kvtier worker-sim --port 0 ARGS` with `urls` and `events` (endpoints or None), one
    per worker; always stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, *args: str, count: int = 1) -> None:
        cmd = [sys.executable, "-m", "kvtier.cli", "worker-sim", "--port", "0"]
        cmd += ["--count", str(count), *args]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.urls: list[str] = []
        self.events: list[str | None] = []
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
        while len(self.urls) < count:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"worker-sim did not start: {''.join(seen)}") from None
            if not line:
                raise RuntimeError(f"worker-sim exited: {''.join(seen)}")
            seen.append(line)
            match = _BANNER.match(line.strip())
            if match:
                self.urls.append(match.group(1))
                self.events.append(match.group(2))

    @property
    def url(self) -> str:
        return self.urls[0]

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

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
