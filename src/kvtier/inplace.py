"""Lending a store's chunk memory in place, so callers copy once instead of twice.

A vLLM worker gathers a step's new chunks straight into slots kvtier lends (`writing`) and
scatters hits straight from views it lends (`reading`); a server lets its same-host clients
fill slots of its shared DRAM file (`reserve_chunk` / `commit_chunk` / `abort_chunk`, behind
PUT_LOCAL and COMMIT). Slots and views come from the DRAM tier, or, for a store whose one tier
is a same-host server (an engine process of the node-local process), from that server's
shared DRAM through the remote tier (`RemoteTier.lend`, `RemoteTier.borrow`).

`InPlace` is a part of `Store` (its base class); it uses the store's tiers and call
accounting, declared below.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.keys import Key
from kvtier.tiers.base import Tier
from kvtier.tiers.dram import DramTier


class InPlace:
    """The in-place half of `Store`."""

    _dram: DramTier | None
    _lower: tuple[Tier, ...]

    if TYPE_CHECKING:

        def _enter(self) -> None: ...
        def _leave(self, saved: int = 0) -> None: ...
        def _holds(self, key: Key) -> bool: ...
        def _dram_hit(self, key: Key) -> None: ...
        def _publish(
            self, key: Key, slot: memoryview, release: Callable[[], None], expires_ns: int = 0
        ) -> None: ...
        def _claim(
            self, key: Key, nbytes: int
        ) -> tuple[memoryview | None, Callable[[], None] | None]: ...

    @contextlib.contextmanager
    def writing(self, keys: Sequence[Key], nbytes: int) -> Iterator[list[memoryview | None] | None]:
        """Writable slots of `nbytes` for new chunks, for the caller to fill in place (no
        staging copy); on a clean exit the filled slots become chunks, on an exception they
        are given back. A slot is None for a chunk held already or with no room. Served by
        the DRAM tier, or by a same-host server's shared DRAM when that is the one tier;
        yields None (not a list) when neither can lend: then use `write_chunk`."""
        self._enter()
        saved = 0
        try:
            if self._dram is not None:
                slots = [self.reserve_chunk(k, nbytes) for k in keys]
                mine = [(k, s) for k, s in zip(keys, slots, strict=True) if s is not None]
                try:
                    yield slots
                except BaseException:
                    for key, _ in mine:
                        self.abort_chunk(key)
                    raise
                for key, slot in mine:
                    self.commit_chunk(key, slot)  # counted saved there
                return
            tier = self._in_place_tier()
            lent = None if tier is None else tier.lend(keys, nbytes)
            if lent is None:
                yield None
                return
            try:
                yield lent.slots
            except BaseException:
                lent.abort()
                raise
            saved = lent.commit()
        finally:
            self._leave(saved)

    @contextlib.contextmanager
    def reading(self, keys: Sequence[Key], nbytes: int) -> Iterator[list[memoryview | None] | None]:
        """Views of stored chunks of `nbytes`, pinned for the block, for the caller to copy
        from in place (no staging copy); None for a chunk no tier serves. Served by the DRAM
        tier (DRAM hits only), or by a same-host server's shared DRAM when that is the one
        tier; yields None (not a list) when neither can lend: then use `read_chunk`."""
        self._enter()
        try:
            if self._dram is not None:
                views = [self._dram.acquire(k) for k in keys]
                for i, view in enumerate(views):
                    if view is not None and view.nbytes != nbytes:  # stored at another size
                        self._dram.release(keys[i])
                        views[i] = None
                    elif view is not None:
                        self._dram_hit(keys[i])
                try:
                    yield views
                finally:
                    for key, view in zip(keys, views, strict=True):
                        if view is not None:
                            self._dram.release(key)
                return
            tier = self._lower[0] if len(self._lower) == 1 else None
            borrowed = getattr(tier, "borrow", lambda *_: None)(keys, nbytes)
            if borrowed is None:
                yield None
                return
            try:
                yield borrowed.views
            finally:
                borrowed.release()
        finally:
            self._leave()

    def reserve_chunk(self, key: Key, nbytes: int) -> memoryview | None:
        """A writable DRAM slot for a new chunk, for someone else to fill (a same-host client
        writing into `shared_dram()`): then `commit_chunk` or `abort_chunk`. Waits while
        in-flight lower-tier writes pin every DRAM chunk (as `write_chunk` does: not on an
        event loop). None without a DRAM tier, when the chunk is held already, or when it
        cannot be held."""
        self._enter()
        try:
            if self._dram is None or self._holds(key):
                return None
            return self._claim(key, nbytes)[0]
        finally:
            self._leave()

    def commit_chunk(self, key: Key, slot: memoryview) -> None:
        """Publish a slot from `reserve_chunk`, filled; written to the lower tiers later."""
        assert self._dram is not None
        self._enter()
        try:
            self._publish(key, slot, functools.partial(self._dram.release, key))
        finally:
            self._leave(saved=1)

    def abort_chunk(self, key: Key) -> None:
        """Give back a slot from `reserve_chunk` unfilled."""
        assert self._dram is not None
        self._dram.abort(key)

    def _in_place_tier(self) -> Any | None:
        """The one lower tier, when its puts are copies into a same-host server's memory
        (`RemoteTier.writes_in_place`): staging them for a background write would only add
        a copy."""
        tier = self._lower[0] if len(self._lower) == 1 else None
        return tier if getattr(tier, "writes_in_place", False) else None
