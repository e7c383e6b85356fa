"""`kvtier bench gateway`'s balance figures from in-flight samples (pure, no servers)."""

from __future__ import annotations

import math

from kvtier.bench import gateway_report as rep
from kvtier.bench.gateway_client import InflightSample

KEY = {"workload": "trace", "workers": 2, "policy": "kvtier", "tiers": "off", "load": 4.0,
       "sweep": True}  # fmt: skip


def test_steady_balance_counts_only_samples_with_a_request_per_worker() -> None:
    """A sample with fewer requests than workers says nothing of balance (one request alone
    is 'imbalance'): it is left out, and the row says over how many samples it measured."""
    samples = [
        InflightSample(1, 2.0, (100.0, 0.0)),  # one request: not steady
        InflightSample(2, 1.5, (300.0, 100.0)),
        InflightSample(3, 1.0, (100.0, 100.0)),
    ]
    row = rep.row(KEY, [], [], samples, 0.05)
    assert row["steady_samples"] == 2
    # time-averaged: worker 0 books 200, worker 1 100; the mean 150
    assert math.isclose(row["steady_inflight_tokens_ratio"], 200 / 150)
    assert math.isnan(rep.row(KEY, [], [], samples[:1], 0.05)["steady_inflight_tokens_ratio"])


def test_headline_judges_balance_over_rows_with_enough_samples() -> None:
    """A row whose balance rests on a sample or two is named apart, not judged: the judged
    figure is the worst row with STEADY_MIN_SAMPLES samples or more."""
    few = [InflightSample(2, 1.5, (300.0, 100.0))]
    many = [InflightSample(2, 1.0, (120.0, 80.0))] * rep.STEADY_MIN_SAMPLES
    rows = [rep.row(KEY, [], [], few, 0.05), rep.row({**KEY, "load": 9.0}, [], [], many, 0.05)]
    head = rep.headline(rows, "trace", 2, 4.0)
    assert math.isclose(head["steady_inflight_tokens_ratio"], 1.2)
    assert head["steady_inflight_worst_row"] == "trace x2 tiers off load 9: 10 samples"
    assert head["steady_inflight_tokens_ratio_any_samples"] == 1.5
    assert head["steady_inflight_worst_row_any_samples"] == "trace x2 tiers off load 4: 1 samples"
