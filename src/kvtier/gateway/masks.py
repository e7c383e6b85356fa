"""Block key -> holder mask, in NumPy arrays, looked up a whole prompt at a time.

A Python dict of a million block keys costs ~0.3 us per lookup here: each one chases the
index table, the entry and the key object through memory in turn, so a 32k-token prompt
(2,048 blocks) took ~1 ms to match. This table keeps keys and masks in flat arrays (open
addressing, linear probing, Fibonacci hashing of the key), so one prompt's lookups are a few
vectorised gathers whose cache misses overlap.

A mask is `words` uint64 words, bit i of the holder mask in bit i % 64 of word i // 64. A
slot is empty, live (its mask is not zero) or dead (its key stays, its mask went to zero):
clearing bits never moves anything, and a dead slot is reused by the next key inserted along
its chain. While dead slots are over a sixteenth of the table, every change also sweeps the
next few slots, rebuilding the stretch between two empty slots without its dead keys (no
chain crosses an empty slot, so that stretch is self-contained): dead slots stay near that
share with no stop-the-world rebuild. (The cluster that wraps from the table's end to its
start is never swept: its dead slots wait for an insert to reuse them.) When live and dead
slots reach half of the table it is rebuilt in full (~0.3 s at 1M keys here), doubled if the
live keys need it, so it is sized up front for the keys it is expected to hold.

Changes of up to SCALAR keys (a routed prompt's predicted tail, an eviction) go key by key
through memoryviews of the same arrays, and so do a short prompt's lookups (`leading`): a
handful of NumPy calls costs more than that.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MIN_SLOTS = 1 << 10
FIBONACCI = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads nearby keys apart
SWEEP = 16  # slots swept per key changed...
DEAD_SHARE = 16  # ...while dead slots are over this share of the table, which they then stay near
SWEEP_BATCH = 4096  # ...that many at a time (an eighth of a smaller table), once owed
LOOK = 4096  # slots looked through for an empty one
SCALAR = 64  # changes of up to this many keys go key by key: fewer NumPy calls
M64 = (1 << 64) - 1


def _slots_for(live: int) -> int:
    """Table size for `live` keys: they fill at most 3/8 of it."""
    return max(MIN_SLOTS, 1 << (live * 8 // 3).bit_length())


def as_keys(keys: Iterable[int]) -> np.ndarray:
    """Block keys (Python ints in [0, 2^64)) as a uint64 array."""
    if isinstance(keys, np.ndarray):
        return keys.astype(np.uint64, copy=False)
    if not isinstance(keys, list | tuple):
        keys = list(keys)
    return np.fromiter(keys, np.uint64, len(keys))


class MaskTable:
    """uint64 key -> mask of `words` uint64 words; absent keys read as all-zero masks."""

    def __init__(self, words: int = 1, expected_keys: int = 0) -> None:
        """`expected_keys`: how many live keys to make room for up front (the table grows
        past them with one full rebuild per doubling)."""
        if words < 1:
            raise ValueError("a mask needs at least one word")
        self.words = words
        self.live = 0  # keys whose mask is not zero
        self._allocate(_slots_for(expected_keys))

    def _allocate(self, slots: int) -> None:
        self._slots = slots
        self._shift = np.uint64(64 - (slots.bit_length() - 1))
        self._keys = np.zeros(slots, np.uint64)
        self._masks = [np.zeros(slots, np.uint64) for _ in range(self.words)]  # word -> slot
        self._used = np.zeros(slots, bool)  # live or dead
        self._owner = np.zeros(slots, np.int32)  # scratch: which key (+1) claims a free slot
        self._cursor = 0  # where the sweep goes on
        self._debt = 0  # slots owed to the sweep
        self.used = 0
        # the same arrays, read and written one slot at a time as Python ints and bools
        self._key_at, self._used_at = self._keys.data, self._used.data
        self._mask_at = [word.data for word in self._masks]

    def __len__(self) -> int:
        return self.live

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * np.uint64(FIBONACCI)) >> self._shift).astype(np.intp)  # (wraps silently)

    def _live(self, slot: np.ndarray | slice) -> np.ndarray:
        """Whether each slot's mask is not zero."""
        live: np.ndarray = self._masks[0][slot] != 0
        for word in self._masks[1:]:
            live |= word[slot] != 0
        return live

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key (live or dead), -1 where it has none."""
        found = np.full(len(keys), -1, np.intp)
        at, wanted, row = self._home(keys), keys, np.arange(len(keys))
        last = self._slots - 1
        while at.size:
            used = self._used[at]
            hit = used & (self._keys[at] == wanted)
            found[row[hit]] = at[hit]
            on = used ^ hit  # occupied by another key: probe on
            at, wanted, row = (at[on] + 1) & last, wanted[on], row[on]
        return found

    def get(self, keys: np.ndarray) -> np.ndarray:
        """(len(keys), words) masks, zero rows for keys it does not hold."""
        slot = self.find(keys)
        out = np.stack([word[slot] for word in self._masks], axis=1)
        out[slot < 0] = 0
        return out

    def leading(self, keys: list[int] | np.ndarray) -> list[int]:
        """The masks of `keys` as Python ints, up to the first key with none, one key at a
        time: for a short prompt, cheaper than the NumPy calls of `get`."""
        key_at, used_at, mask_at = self._key_at, self._used_at, self._mask_at
        last, shift = self._slots - 1, int(self._shift)
        out: list[int] = []
        if isinstance(keys, np.ndarray):
            keys = keys.tolist()  # Python ints: NumPy scalars would overflow in the hash
        first, rest = mask_at[0], list(enumerate(mask_at))[1:]
        for key in keys:  # `_find_one` inlined: a call per key costs ~30 % more here
            at = ((key * FIBONACCI) & M64) >> shift
            while key_at[at] != key:
                if not used_at[at]:
                    return out
                at = (at + 1) & last
            if not used_at[at]:  # (an empty slot left holding this key)
                return out
            mask = first[at]
            for word, masks in rest:
                mask |= masks[at] << (64 * word)
            if not mask:
                return out
            out.append(mask)
        return out

    def set_bit(self, keys: list[int] | np.ndarray, bit: int) -> None:
        """Sets one mask bit of each key, adding the keys it does not hold."""
        if self.used + len(keys) > self._slots // 2:
            self._rebuild(max(self._slots, _slots_for(self.live + len(keys))))
        word, flag = divmod(bit, 64)
        if len(keys) <= SCALAR:
            for key in keys:
                self._set_one(int(key), word, 1 << flag)
        else:
            self._set_many(np.unique(as_keys(keys)), word, np.uint64(1 << flag))
        self._swept(len(keys))

    def _set_many(self, keys: np.ndarray, word: int, value: np.uint64) -> None:
        slot = self.find(keys)
        held = slot[slot >= 0]
        self.live += int(len(held) - np.count_nonzero(self._live(held)))
        self._masks[word][held] |= value
        absent = keys[slot < 0]
        masks = [np.zeros(len(absent), np.uint64) for _ in range(self.words)]
        masks[word][:] = value
        self._insert(absent, masks)
        self.live += len(absent)

    def _set_one(self, key: int, word: int, value: int) -> None:
        key_at, used_at, mask_at = self._key_at, self._used_at, self._mask_at
        at, last, free = self._home_one(key), self._slots - 1, -1
        while used_at[at]:
            if key_at[at] == key:
                break
            if free < 0 and not self._live_one(at):
                free = at
            at = (at + 1) & last
        else:  # absent: into the first dead slot of its chain, or the empty one ending it
            if free < 0:
                free, used_at[at] = at, True
                self.used += 1
            at, key_at[free] = free, key  # (an empty or dead slot's masks are all zero)
        if not self._live_one(at):
            self.live += 1
        mask_at[word][at] |= value

    def clear_bit(self, keys: list[int] | np.ndarray, bit: int) -> None:
        """Clears one mask bit of each key it holds."""
        word, flag = divmod(bit, 64)
        if len(keys) <= SCALAR:
            keep, mask = ~(1 << flag) & M64, self._mask_at[word]
            for key in keys:
                at = self._find_one(int(key))
                if at >= 0 and mask[at] >> flag & 1:
                    mask[at] &= keep
                    self.live -= not self._live_one(at)
        else:
            slot = self.find(np.unique(as_keys(keys)))
            slot = slot[slot >= 0]
            before = self._live(slot)
            self._masks[word][slot] &= ~np.uint64(1 << flag)
            self.live -= int(np.count_nonzero(before & ~self._live(slot)))
        self._swept(len(keys))

    def _home_one(self, key: int) -> int:
        return ((key * FIBONACCI) & M64) >> int(self._shift)

    def _find_one(self, key: int) -> int:
        key_at, used_at = self._key_at, self._used_at
        at, last = self._home_one(key), self._slots - 1
        while used_at[at]:
            if key_at[at] == key:
                return at
            at = (at + 1) & last
        return -1

    def _live_one(self, at: int) -> bool:
        masks = self._mask_at
        return bool(masks[0][at]) if len(masks) == 1 else any(mask[at] for mask in masks)

    def _insert(self, keys: np.ndarray, masks: list[np.ndarray]) -> None:
        """Puts absent, distinct keys with their (non-zero) masks, one array per word, in the
        first free (empty or dead) slot of each one's chain. Keys that reach the same free
        slot in one round: the one whose number `_owner` ends up holding takes it (whichever
        NumPy's repeated write leaves), the others probe on."""
        at, row = self._home(keys), np.arange(1, len(keys) + 1, dtype=np.int32)
        last, owner = self._slots - 1, self._owner
        while at.size:
            free = ~self._used[at] | ~self._live(at)
            where, claims = at[free], row[free]
            owner[where] = claims
            won = owner[where] == claims
            owner[where] = 0
            taken, placed = where[won], claims[won] - 1
            self.used += int(np.count_nonzero(~self._used[taken]))
            self._keys[taken] = keys[placed]
            for word, mask in zip(self._masks, masks, strict=True):
                word[taken] = mask[placed]
            self._used[taken] = True
            free[free] = won  # now: placed
            on = ~free
            at, row = (at[on] + 1) & last, row[on]

    def _swept(self, changed: int) -> None:
        """While dead slots are over 1/DEAD_SHARE of the table, owes the sweep SWEEP slots
        per key changed, and pays once it owes a batch."""
        if (self.used - self.live) * DEAD_SHARE <= self._slots:
            self._debt = 0
            return
        self._debt += SWEEP * changed
        batch = min(SWEEP_BATCH, self._slots // 8)
        while self._debt >= batch:
            self._debt -= batch
            self._sweep(batch)

    def _sweep(self, slots: int) -> None:
        """Rebuilds the stretch between the first empty slot at the cursor and the first
        empty slot `slots` or more further on (or the last one before the table's end: a
        stretch must not wrap), without its dead keys."""
        used = self._used
        start = self._empty(self._cursor)
        if start is None:  # the table's end, or a cluster longer than LOOK
            self._cursor = 0 if self._cursor + LOOK >= self._slots else self._cursor + LOOK
            return
        stop = self._empty(start + slots)
        if stop is None:
            empty = np.flatnonzero(~used[start + 1 : start + slots])
            if not len(empty):
                self._cursor = 0 if start + slots >= self._slots else start + slots
                return
            stop = start + 1 + int(empty[-1])
        self._cursor = stop
        span = slice(start + 1, stop)
        dead = used[span] & ~self._live(span)
        if not dead.any():
            return
        keep = np.flatnonzero(used[span] & ~dead) + start + 1
        keys, masks = self._keys[keep], [word[keep] for word in self._masks]
        self.used -= int(np.count_nonzero(used[span]))
        used[span] = False
        for word in self._masks:
            word[span] = 0
        self._insert(keys, masks)  # homes in the stretch: they land in it again

    def _empty(self, at: int) -> int | None:
        """The first empty slot at or after `at` within the next LOOK slots, if any (and
        none past the table's end: a stretch must not wrap)."""
        window = self._used[at : at + LOOK]
        if not len(window) or window.all():
            return None
        return at + int(np.argmin(window))

    def _rebuild(self, slots: int) -> None:
        """Moves the live keys into a fresh table of `slots` slots."""
        keep = np.flatnonzero(self._used)
        keep = keep[self._live(keep)]
        keys, masks = self._keys[keep], [word[keep] for word in self._masks]
        self._allocate(slots)
        self._insert(keys, masks)
