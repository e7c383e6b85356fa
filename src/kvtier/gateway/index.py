"""Which worker holds which prefix blocks, and in which tier.

One dict maps a block key to a bit mask of its holders: bit 0 is kvtier's shared tier (every
worker can load from it), and worker w has four bits, `1 + 4w + tier` for its GPU cache, its
kvtier DRAM, its kvtier disk, and the gateway's own prediction of its GPU cache (the prompts
it sent there; kept apart so that a worker's events never evict the predictions, nor the
reverse). A holder keeps at most `capacity_blocks` keys, evicted in second-chance (CLOCK)
order over insertion order, which approximates LRU with one C-level update per prompt
instead of a move per key, so a shadow index fed only by the gateway's own decisions stays
bounded and forgets the way a worker's cache does. The order is an OrderedDict's: taking the
oldest key of a plain dict that keeps losing its oldest keys is O(keys deleted since it was
last resized) - up to ~0.3 ms per block at 256k keys, on every block once a holder is full.

`match(keys)` walks a prompt's keys once, comparing each mask with the last (a prompt's blocks
come in long runs of the same holders), and splits each worker's usable prefix the way vLLM
and kvtier load it: first the leading blocks in its GPU cache, then the following blocks
kvtier can supply (its DRAM, its disk or the shared tier, the nearest counted), up to the
first block it has in none.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

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
    return 0 if worker == SHARED else 1 + TIERS * worker + tier


class PrefixIndex:
    """Block key -> holders, each holder an LRU bounded to `capacity_blocks` keys."""

    def __init__(self, workers: int, capacity_blocks: int) -> None:
        if workers < 1 or capacity_blocks < 1:
            raise ValueError("an index needs at least one worker and one block per holder")
        self.workers = workers
        self.capacity_blocks = capacity_blocks
        self._masks: dict[int, int] = {}
        self._lrus: dict[int, OrderedDict[int, bool]] = {}  # holder bit -> key -> used again

    def __len__(self) -> int:
        return len(self._masks)

    def add(self, worker: int, tier: int, keys: Iterable[int]) -> None:
        """The holder now has these blocks (in prompt order)."""
        bit = holder_bit(worker, tier)
        flag = 1 << bit
        lru = self._lrus.get(bit)
        if lru is None:
            lru = self._lrus[bit] = OrderedDict()
        keys = list(keys)
        new = [k for k in keys if k not in lru]
        masks = self._masks
        for key in new:
            masks[key] = masks.get(key, 0) | flag
        marks = dict.fromkeys(keys, True)  # held ones referenced, new ones appended...
        marks.update(dict.fromkeys(new, False))  # ...unreferenced
        lru.update(marks)  # (one OrderedDict update: slower than a dict's)
        self._evict(lru, flag)

    def _evict(self, lru: OrderedDict[int, bool], flag: int) -> None:
        """Second-chance (CLOCK) eviction down to capacity: the oldest key goes unless it was
        used again since it was last passed over, in which case it moves to the end."""
        while len(lru) > self.capacity_blocks:
            oldest, used = lru.popitem(last=False)
            if used:
                lru[oldest] = False
            else:
                self._drop(flag, oldest)

    def remove(self, worker: int, tier: int, keys: Iterable[int]) -> None:
        """The holder no longer has these blocks."""
        bit = holder_bit(worker, tier)
        lru = self._lrus.get(bit)
        if lru is None:
            return
        for key in keys:
            if key in lru:
                del lru[key]
                self._drop(1 << bit, key)

    def clear(self, worker: int, tier: int) -> None:
        """The holder has nothing (a restarted worker, vLLM's AllBlocksCleared)."""
        bit = holder_bit(worker, tier)
        for key in self._lrus.pop(bit, {}):
            self._drop(1 << bit, key)

    def _drop(self, flag: int, key: int) -> None:
        mask = self._masks.get(key, 0) & ~flag
        if mask:
            self._masks[key] = mask
        else:
            self._masks.pop(key, None)

    def match(self, keys: list[int]) -> list[Hits]:
        """Per worker, the prefix of `keys` it would reuse, split by tier."""
        counts = [[0, 0, 0, 0] for _ in range(self.workers)]  # gpu, dram, disk, shared
        phase = [0] * self.workers  # 0: in its GPU run, 1: in kvtier's run, 2: done
        masks = self._masks
        run_mask, run_len, live = -1, 0, self.workers
        for key in keys:
            mask = masks.get(key, 0)
            if mask == run_mask:
                run_len += 1
                continue
            live = self._account(run_mask, run_len, counts, phase, live)
            if not mask or not live:
                run_mask, run_len = -1, 0
                break
            run_mask, run_len = mask, 1
        self._account(run_mask, run_len, counts, phase, live)
        return [Hits(*c) for c in counts]

    def match_one(self, keys: list[int], worker: int) -> Hits:
        """`match(keys)[worker]`, walking that worker's prefix only (for a policy that does
        not compare workers' hits, only the chosen one's are needed)."""
        counts = [0, 0, 0, 0]  # gpu, dram, disk, shared
        masks, shift, in_gpu = self._masks, 1 + TIERS * worker, True
        for key in keys:
            mask = masks.get(key, 0)
            bits = mask >> shift
            if in_gpu and bits & 9:  # GPU or PREDICTED
                counts[0] += 1
                continue
            in_gpu = False
            if bits & 2:
                counts[1] += 1
            elif bits & 4:
                counts[2] += 1
            elif mask & 1:
                counts[3] += 1
            else:
                break
        return Hits(*counts)

    def _account(
        self, mask: int, length: int, counts: list[list[int]], phase: list[int], live: int
    ) -> int:
        """Adds a run of `length` blocks held by `mask` to each worker still matching."""
        if length == 0 or mask < 0:
            return live
        shared = mask & 1
        for w in range(self.workers):
            if phase[w] == 2:
                continue
            bits = mask >> (1 + TIERS * w)
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
