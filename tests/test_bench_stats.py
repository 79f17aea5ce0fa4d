"""The ideal queue the serve bench compares its open-loop tail with, checked against queueing theory."""

from __future__ import annotations

import numpy as np
from kiln.bench.stats import fifo_sojourns


def test_ideal_queue_matches_the_m_m_1_formula():
    service = np.random.default_rng(1).exponential(0.010, 50_000)  # mean 10 ms
    sojourns = fifo_sojourns(service, rate=50.0, servers=1)  # load 0.5
    assert abs(sojourns.mean() - 0.020) < 0.002  # 1 / (mu - lambda) = 1 / (100 - 50)


def test_a_second_server_shortens_the_tail():
    service = np.random.default_rng(2).exponential(0.010, 50_000)
    one = np.percentile(fifo_sojourns(service, rate=80.0, servers=1), 99)
    two = np.percentile(fifo_sojourns(service, rate=80.0, servers=2), 99)
    assert two < one / 2
