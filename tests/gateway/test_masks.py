"""The routing index's key -> holder-mask table, against a dict doing the same."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvtier.gateway.masks import SCALAR, MaskTable


def _check(table: MaskTable, ref: dict[int, int], probes: list[int]) -> None:
    assert len(table) == len(ref)
    rows = table.get(np.array(probes, dtype=np.uint64))
    for key, row in zip(probes, rows, strict=True):
        assert int.from_bytes(row.astype("<u8").tobytes(), "little") == ref.get(key, 0)


@pytest.mark.parametrize("words", [1, 3])
def test_the_table_reads_back_what_a_dict_holds(words: int) -> None:
    """Random sets and clears, one key at a time and in bulk, with keys at both ends of
    uint64: every mask reads back as the dict's, and absent keys read as zero."""
    rng = random.Random(words)
    table, ref = MaskTable(words), {}
    universe = [0, 1, (1 << 64) - 1] + [rng.getrandbits(64) for _ in range(4000)]
    for _ in range(300):
        size = rng.choice([rng.randrange(1, SCALAR + 1), rng.randrange(SCALAR + 1, 400)])
        keys, bit = rng.sample(universe, size), rng.randrange(64 * words)
        keys += keys[: size // 4]  # repeats within one call
        if rng.random() < 0.6:
            table.set_bit(keys if rng.random() < 0.5 else np.array(keys, np.uint64), bit)
            for k in keys:
                ref[k] = ref.get(k, 0) | 1 << bit
        else:
            table.clear_bit(keys, bit)
            for k in keys:
                if ref.get(k, 0) & ~(1 << bit):
                    ref[k] &= ~(1 << bit)
                else:
                    ref.pop(k, None)
        _check(table, ref, rng.sample(universe, 200))
    _check(table, ref, universe)


def test_churn_at_a_steady_size_neither_grows_the_table_nor_fills_it_with_dead_keys() -> None:
    """Keys come and go with the live count steady: the sweep reclaims the dead slots, so
    the table keeps its size and every live key stays readable."""
    rng = random.Random(3)
    table, live = MaskTable(1, expected_keys=3000), []
    slots = table._slots
    for _ in range(2000):
        new = [rng.getrandbits(64) for _ in range(rng.randrange(1, 120))]
        table.set_bit(new, 5)
        live += new
        if len(live) > 3000:
            table.clear_bit(live[:-3000], 5)
            live = live[-3000:]
        assert table.used <= table._slots // 2
    assert table._slots == slots and len(table) == 3000
    assert (table.used - table.live) < slots // 4
    assert (table.get(np.array(live, np.uint64))[:, 0] == 1 << 5).all()


def test_a_table_grows_past_its_expected_size_and_keeps_everything() -> None:
    table = MaskTable(2)
    keys = list(range(0, 50_000, 7))
    table.set_bit(keys, 70)
    table.set_bit(keys[::2], 1)
    rows = table.get(np.array(keys, np.uint64))
    assert (rows[:, 1] == 1 << 6).all()
    assert (rows[::2, 0] == 2).all() and (rows[1::2, 0] == 0).all()
    assert len(table) == len(keys)
