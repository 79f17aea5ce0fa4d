"""kiln.export.figures: what a candidate graph's outputs say about its answers on new text."""

from __future__ import annotations

import numpy as np
from kiln.export.figures import compare, expected_agreement


def _logits(top_minus_runner_up: list[float]) -> list[dict[str, np.ndarray]]:
    return [{"logits": np.array([m, 0.0, -5.0], dtype=np.float32)} for m in top_minus_runner_up]


def test_expected_agreement_tries_every_items_shift_against_every_items_margin():
    reference = _logits([1.0, 2.0, 3.0, 4.0])
    got = [dict(r) for r in reference]
    got[0] = {"logits": reference[0]["logits"] + np.array([-0.5, 0.0, 0.0], np.float32)}  # top-two closer by 0.5
    got[1] = {"logits": reference[1]["logits"] + np.array([0.0, 1.5, 0.0], np.float32)}  # by 1.5
    # every item still agrees, but a shift of 1.5 would overturn a margin of 1: 1 pair in 16
    assert compare("text-classification", reference, got).agreement == 1.0
    assert expected_agreement(reference, got) == 1 - 1 / 16
    assert compare("text-classification", reference, got).fidelity().score == 1 - 1 / 16
    assert expected_agreement(reference, reference) == 1.0


def test_a_shift_that_widens_the_margin_overturns_nothing():
    reference = _logits([0.5, 0.5])
    got = [{"logits": r["logits"] + np.array([3.0, 0.0, 0.0], np.float32)} for r in reference]
    assert expected_agreement(reference, got) == 1.0


def test_per_token_outputs_count_every_position():
    reference = [{"logits": np.array([[2.0, 0.0], [0.0, 0.2]], dtype=np.float32)}]  # margins 2 and 0.2
    got = [{"logits": np.array([[2.0, 0.0], [0.0, 0.2]], dtype=np.float32) + np.array([[-0.3, 0.0], [0, 0]])}]
    # shifts -0.3 and 0: the first overturns the margin of 0.2 (1 pair of 4)
    assert expected_agreement(reference, got) == 0.75
