"""Who gets in and for how long: connection cap, timeouts and the throttle on wrong tokens.

A connection is *pending* until it proves itself (a valid HELLO with an auth file, its first
valid frame without one). Pending connections may use at most half of `max_connections`; when
that half is full the oldest pending one is dropped for the newcomer, so a flood of silent
connections cannot lock out a client with a token. Every wrong token makes its peer address
wait `auth_delay_s` before its next HELLO is even checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.errors import ConfigError

PEERS_KEPT = 4096  # addresses remembered by the throttle before expired ones are forgotten


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """The server's resource bounds (see docs/server.md, `kvtier serve --help`)."""

    recv_budget_bytes: int = 512 << 20  # frame bodies being received, all connections together
    max_connections: int = 1024
    handshake_timeout_s: float = 5.0  # pending longer: closed
    idle_timeout_s: float = 600.0  # logged in, no frame for this long: closed
    stall_timeout_s: float = 30.0  # waiting for receive budget or stopped mid-frame: closed
    auth_delay_s: float = 0.5  # per peer address, after each wrong token

    def __post_init__(self) -> None:
        for name in ("recv_budget_bytes", "max_connections"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("handshake_timeout_s", "idle_timeout_s", "stall_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name}: must be a positive number of seconds")
        if not float(self.auth_delay_s) >= 0:
            raise ConfigError("auth_delay_s: must be 0 or more seconds")

    @property
    def max_pending(self) -> int:
        """Connections allowed before their handshake: half the cap (head-room for clients)."""
        return max(1, self.max_connections // 2)

    @property
    def sweep_s(self) -> float:
        """How often timeouts are checked."""
        shortest = min(self.handshake_timeout_s, self.idle_timeout_s, self.stall_timeout_s)
        return min(1.0, max(0.02, shortest / 4))


class AuthThrottle:
    """Spaces the HELLOs of a peer address that sent a wrong token `delay_s` apart."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._next_at: dict[str, float] = {}

    def wait_s(self, peer: str, now: float) -> float:
        """How long to hold this peer's HELLO before checking it; reserves that turn."""
        next_at = self._next_at.get(peer)
        if next_at is None or next_at <= now:
            return 0.0
        self._next_at[peer] = next_at + self.delay_s
        return next_at - now

    def failed(self, peer: str, now: float) -> None:
        """A wrong token from `peer`: its next HELLO waits at least `delay_s`."""
        if self.delay_s <= 0:
            return
        if len(self._next_at) >= PEERS_KEPT:
            self._next_at = {p: t for p, t in self._next_at.items() if t > now}
        self._next_at[peer] = max(self._next_at.get(peer, 0.0), now + self.delay_s)
