"""Which worker holds which prefix blocks, and in which tier.

A `MaskTable` maps a block key to a bit mask of its holders: bit 0 is kvtier's shared tier
(every worker can load from it), and worker w has the four bits `4 (w + 1) + tier` for its GPU
cache, its kvtier DRAM, its kvtier disk, and the gateway's own prediction of its GPU cache
(the prompts it sent there; kept apart so that a worker's events never evict the
predictions, nor the reverse). A holder keeps at most `capacity_blocks` keys, evicted in
second-chance (CLOCK) order over insertion order, which approximates LRU with one C-level
update per prompt instead of a move per key, so a shadow index fed only by the gateway's own
decisions stays bounded and forgets the way a worker's cache does. The order is an
OrderedDict's: taking the oldest key of a plain dict that keeps losing its oldest keys is
O(keys deleted since it was last resized) - up to ~0.3 ms per block at 256k keys, on every
block once a holder is full.

`match(keys)` looks a prompt's keys up (a long prompt's at once), cuts the masks into runs of
the same holders (a prompt's blocks come in long runs), and splits each worker's usable
prefix the way vLLM and kvtier load it: first the leading blocks in its GPU cache, then the
following blocks kvtier can supply (its DRAM, its disk or the shared tier, the nearest
counted), up to the first block it has in none.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from kvtier.gateway.masks import SCALAR, MaskTable, as_keys

GPU, DRAM, DISK, PREDICTED = 0, 1, 2, 3  # PREDICTED counts as GPU
TIERS = 4
SHARED = -1  # the holder number of kvtier's shared tier


class Hits(NamedTuple):
    """Leading blocks of one prompt a worker would reuse, by where it would find them."""

    gpu: int
    dram: int
    disk: int
    shared: int

    @property
    def blocks(self) -> int:
        return self.gpu + self.dram + self.disk + self.shared


NO_HITS = Hits(0, 0, 0, 0)


def holder_bit(worker: int, tier: int) -> int:
    """The mask bit of a worker's tier, or of the shared tier for worker SHARED."""
    return 0 if worker == SHARED else TIERS * (worker + 1) + tier


class PrefixIndex:
    """Block key -> holders, each holder an LRU bounded to `capacity_blocks` keys."""

    def __init__(self, workers: int, capacity_blocks: int) -> None:
        if workers < 1 or capacity_blocks < 1:
            raise ValueError("an index needs at least one worker and one block per holder")
        self.workers = workers
        self.capacity_blocks = capacity_blocks
        # room for every worker's GPU cache, full: its events and predictions share keys
        words = -(-TIERS * (workers + 1) // 64)
        self._masks = MaskTable(words, expected_keys=workers * capacity_blocks)
        self._lrus: dict[int, OrderedDict[int, bool]] = {}  # holder bit -> key -> used again

    def __len__(self) -> int:
        return len(self._masks)

    def add(self, worker: int, tier: int, keys: Iterable[int]) -> None:
        """The holder now has these blocks (in prompt order)."""
        bit = holder_bit(worker, tier)
        lru = self._lrus.get(bit)
        if lru is None:
            lru = self._lrus[bit] = OrderedDict()
        keys = list(keys)
        new = [k for k in keys if k not in lru]
        if new:
            self._masks.set_bit(new, bit)
        marks = dict.fromkeys(keys, True)  # held ones referenced, new ones appended...
        marks.update(dict.fromkeys(new, False))  # ...unreferenced
        lru.update(marks)  # (one OrderedDict update: slower than a dict's)
        self._evict(lru, bit)

    def _evict(self, lru: OrderedDict[int, bool], bit: int) -> None:
        """Second-chance (CLOCK) eviction down to capacity: the oldest key goes unless it was
        used again since it was last passed over, in which case it moves to the end."""
        dropped = []
        while len(lru) > self.capacity_blocks:
            oldest, used = lru.popitem(last=False)
            if used:
                lru[oldest] = False
            else:
                dropped.append(oldest)
        if dropped:
            self._masks.clear_bit(dropped, bit)

    def remove(self, worker: int, tier: int, keys: Iterable[int]) -> None:
        """The holder no longer has these blocks."""
        bit = holder_bit(worker, tier)
        lru = self._lrus.get(bit)
        if lru is None:
            return
        gone = [key for key in dict.fromkeys(keys) if key in lru]  # (an event may repeat one)
        for key in gone:
            del lru[key]
        if gone:
            self._masks.clear_bit(gone, bit)

    def clear(self, worker: int, tier: int) -> None:
        """The holder has nothing (a restarted worker, vLLM's AllBlocksCleared)."""
        bit = holder_bit(worker, tier)
        lru = self._lrus.pop(bit, None)
        if lru:
            self._masks.clear_bit(list(lru), bit)

    def _runs(self, keys: list[int]) -> list[tuple[int, int]]:
        """A prompt's holder masks as (mask, blocks) runs, up to its first block no holder
        has: looked up key by key for a short prompt, at once for a long one."""
        if len(keys) <= SCALAR:
            masks = self._masks.leading(keys)
            return [(mask, sum(1 for _ in run)) for mask, run in itertools.groupby(masks)]
        rows = self._masks.get(as_keys(keys))  # (n, words)
        present = rows.any(axis=1)
        if not present.all():
            rows = rows[: int(np.argmin(present))]
        if not len(rows):
            return []
        edges = [0, *(np.flatnonzero((rows[1:] != rows[:-1]).any(axis=1)) + 1).tolist(), len(rows)]
        return [
            (int.from_bytes(rows[start].astype("<u8").tobytes(), "little"), end - start)
            for start, end in itertools.pairwise(edges)
        ]

    def match(self, keys: list[int]) -> list[Hits]:
        """Per worker, the prefix of `keys` it would reuse, split by tier."""
        counts = [[0, 0, 0, 0] for _ in range(self.workers)]  # gpu, dram, disk, shared
        phase = [0] * self.workers  # 0: in its GPU run, 1: in kvtier's run, 2: done
        live = self.workers
        for mask, length in self._runs(keys):
            live = self._account(mask, length, counts, phase, live)
            if not live:
                break
        return [Hits(*c) for c in counts]

    def match_one(self, keys: list[int], worker: int) -> Hits:
        """`match(keys)[worker]`, looking at that worker's bits only (for a policy that does
        not compare workers' hits, only the chosen one's are needed)."""
        counts = [0, 0, 0, 0]  # gpu, dram, disk, shared
        shift, in_gpu = TIERS * (worker + 1), True
        for mask, length in self._runs(keys):
            bits = mask >> shift
            if in_gpu and bits & 9:  # GPU or PREDICTED
                counts[0] += length
                continue
            in_gpu = False
            if bits & 2:
                counts[1] += length
            elif bits & 4:
                counts[2] += length
            elif mask & 1:
                counts[3] += length
            else:
                break
        return Hits(*counts)

    def _account(
        self, mask: int, length: int, counts: list[list[int]], phase: list[int], live: int
    ) -> int:
        """Adds a run of `length` blocks held by `mask` to each worker still matching."""
        shared = mask & 1
        for w in range(self.workers):
            if phase[w] == 2:
                continue
            bits = mask >> (TIERS * (w + 1))
            if phase[w] == 0 and bits & 9:  # GPU or PREDICTED
                counts[w][0] += length
                continue
            phase[w] = 1
            if bits & 2:
                counts[w][1] += length
            elif bits & 4:
                counts[w][2] += length
            elif shared:
                counts[w][3] += length
            else:
                phase[w] = 2
                live -= 1
        return live
