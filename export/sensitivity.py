"""Which groups of MatMuls kiln's int8 should leave in float, found in one session.

A switched graph (kiln.export.rowwise_int8, `switched=True`) holds both forms of every group of
MatMuls that read one activation (a layer's Q/K/V, its attention output, each FFN projection), each
group steered by a bool input (an `If`: only the form asked for runs). So no probe writes or loads a
graph: each group is measured alone in int8 on a few dozen items (its output error against the
original), the groups are ranked, a bisection over "the k most damaging in float" scores candidates
on all the calibration items, and each group that prefix keeps in float goes back to int8 if the
aim holds without it. The first ladder wrote and loaded a graph and ran a full evaluation per
probe: ~47 s on all-MiniLM-L6-v2, over 15 minutes on a roberta-base-sized model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from kiln.export.figures import Fidelity


@dataclass(frozen=True)
class Switchboard:
    """A switched graph's session with the groups it runs in int8; `run` is a session's `run`, so
    kiln's item runner and a Package take it as they take a plain session."""

    session: Any
    groups: dict[str, list[str]]  # switch input -> the MatMuls it steers
    int8: frozenset[str] = field(default_factory=frozenset)

    def with_int8(self, groups: set[str] | frozenset[str]) -> Switchboard:
        return replace(self, int8=frozenset(groups))

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        flags = {name: np.array(name in self.int8) for name in self.groups}
        return self.session.run(names, {**feeds, **flags})


Measure = Callable[[Switchboard], Fidelity]


def rank_groups(board: Switchboard, probe: Measure, label: Callable[[str], str]) -> list[dict[str, Any]]:
    """Each group alone in int8 (the rest float), most damaging first: lowest score, then largest error."""
    trials = []
    for group in board.groups:
        alone = probe(board.with_int8({group}))
        trials.append({"group": label(group), "switch": group, "alone_score": alone.score, "alone_error": alone.error})
    return sorted(trials, key=lambda t: (t["alone_score"], -t["alone_error"]))


def fewest_in_float(board: Switchboard, ranked: list[dict[str, Any]], score: Measure, aim: float) -> int:
    """The smallest k (by bisection) for which the k most damaging groups in float score `aim`;
    every group in float is the original graph, taken to pass. Scores land in `ranked`."""
    order = [t["switch"] for t in ranked]
    low, high = 0, len(order)  # low: known (or, for 0, assumed by the caller) to fall short

    while high - low > 1:
        middle = (low + high) // 2
        reached = score(board.with_int8(set(order[middle:]))).score
        ranked[middle - 1]["score_with_these_in_float"] = reached
        if reached >= aim:
            high = middle
        else:
            low = middle
    return high


def back_to_int8(board: Switchboard, ranked: list[dict[str, Any]], count: int, score: Measure, aim: float) -> set[str]:
    """The groups to keep in float: the bisection's `count` most damaging, less each one (least
    damaging first) that the calibration items still reach `aim` without. Ranked alone, groups do
    not add up exactly, so a prefix by rank keeps some in float that the others make unnecessary."""
    floating = [t["switch"] for t in ranked[:count]]
    for trial in reversed(ranked[: count - 1]):  # the last of the prefix was just measured as needed
        trying = set(floating) - {trial["switch"]}
        reached = score(board.with_int8(set(board.groups) - trying)).score
        trial["score_without_it_in_float"] = reached
        if reached >= aim:
            floating.remove(trial["switch"])
    return set(floating)
