"""`kvtier worker-sim` and `kvtier gateway` as real subprocesses on 127.0.0.1, their URLs
read from the lines they print at start; always stopped (SIGTERM, then SIGKILL) on exit.
Built on the benchmark's own `Process`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvtier.bench.gateway_procs import Process

SRC = Path(__file__).resolve().parents[2] / "src"


class BannerProcess(Process):
    """`kvtier COMMAND ARGS` from this checkout, started once `count` lines matching
    `banner` were printed; `stop()` prints what it wrote, so pytest shows it with a failure."""

    banner: re.Pattern[str]

    def __init__(self, command: list[str], count: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        super().__init__(command, self.banner, count, env)

    def stop(self) -> int:
        code = super().stop()
        while not self.lines.empty():
            print(self.lines.get_nowait(), end="")
        return code


class GatewayProcess(BannerProcess):
    """`kvtier gateway --port 0 --workers URLS ARGS`; `url` is its base URL."""

    banner = re.compile(r"^kvtier gateway: (http://\S+)")

    def __init__(self, workers: list[str], *args: str) -> None:
        super().__init__(["gateway", "--port", "0", "--workers", ",".join(workers), *args], 1)
        self.url = self.matches[0].group(1)


class SimProcess(BannerProcess):
    """`kvtier worker-sim --port 0 --count N ARGS`: `urls`, `events` and `replays` (KV event
    and replay endpoints, or None), one per worker."""

    banner = re.compile(r"^worker-sim (http://\S+)(?: events (tcp://\S+) replay (tcp://\S+))?$")

    def __init__(self, *args: str, count: int = 1) -> None:
        super().__init__(["worker-sim", "--port", "0", "--count", str(count), *args], count)
        self.urls = [m.group(1) for m in self.matches]
        self.events: list[str | None] = [m.group(2) for m in self.matches]
        self.replays: list[str | None] = [m.group(3) for m in self.matches]

    @property
    def url(self) -> str:
        return self.urls[0]
