"""Finding what kiln's int8 leaves in float (kiln.export.sensitivity), on a small graph run by
onnxruntime: one switched session ranks the groups and sizes how many go back to float."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from kiln.export.figures import Fidelity
from kiln.export.rowwise_int8 import SWITCH, quantize_rows
from kiln.export.sensitivity import Switchboard, back_to_int8, fewest_in_float, rank_groups

from tests.test_rowwise_int8 import K, _graph


def _chain(tmp_path, outlier: float):
    """x -> a -> b -> c, each a MatMul; b's weight reads channel 5 of a's output `outlier` times
    more weakly than a writes it (as transformers' outlier channels after LayerNorm are read): the
    float model is unchanged in scale, but a row's int8 scale is set by that channel, so the
    MatMul reading a's output (b) rounds every other channel coarsely."""
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=(K, K)).astype(np.float32) / np.sqrt(K) for name in "abc"}
    weights["a"][:, 5] *= outlier
    weights["b"][5, :] /= outlier
    return _graph(tmp_path, weights, {"a": "x", "b": "a", "c": "b"})


def test_the_group_reading_an_outlier_channel_ranks_first_and_goes_back_to_float(tmp_path):
    source, switched = _chain(tmp_path, outlier=30.0), tmp_path / "switched.onnx"
    groups = quantize_rows(source, switched, set(), switched=True).switches
    board = Switchboard(ort.InferenceSession(str(switched), providers=["CPUExecutionProvider"]), groups)
    assert board.groups == {SWITCH + "x": ["a"], SWITCH + "a": ["b"], SWITCH + "b": ["c"]}
    x = np.random.default_rng(1).normal(size=(1, 64, K)).astype(np.float32)
    (want,) = board.with_int8(set()).run(["c"], {"x": x})

    def measure(candidate: Switchboard) -> Fidelity:
        (got,) = candidate.run(["c"], {"x": x})
        cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        return Fidelity(score=float(cosine.min()), error=float(np.abs(got - want).mean()))

    ranked = rank_groups(board, measure, label=lambda group: group.removeprefix(SWITCH))
    assert ranked[0]["group"] == "a" and ranked[0]["alone_score"] < ranked[1]["alone_score"]
    everything = measure(board.with_int8(set(board.groups))).score
    without_b = measure(board.with_int8({SWITCH + "x", SWITCH + "b"})).score
    assert everything < without_b < 1.0
    assert fewest_in_float(board, ranked, measure, aim=without_b) == 1
    assert fewest_in_float(board, ranked, measure, aim=1.0) == 3  # every group in float: the original graph
    # a prefix by rank that keeps more in float than needed gives back what the aim does not need
    # (the prefix's last group is the one the bisection measured as needed, so it is not retried)
    kept = back_to_int8(board, ranked, 3, measure, aim=without_b)
    assert kept == {SWITCH + "a", ranked[2]["switch"]}
    assert ranked[1]["score_without_it_in_float"] >= without_b
