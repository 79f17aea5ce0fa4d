"""How close a package's outputs are to the original's: raw-output figures, the tolerances per
precision, and the lower bound that says how much a measured agreement can be trusted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from kiln.export.task_exports import cosine
from kiln.runtime.pipelines.feature_extraction import pool

Items = list[dict[str, np.ndarray]]  # per validation item, its outputs


@dataclass
class Tolerance:
    """Limits for one precision; recorded in the manifest next to the figures reached."""

    max_abs: float | None  # raw output error, relative to the reference's scale (max |ref|, >= 1)
    min_agreement: float
    min_cosine: float
    max_batch_drift: float  # alone against batched, relative to the same scale


def tolerance_for(precision: str, min_agreement: float) -> Tolerance:
    if precision == "fp32":
        return Tolerance(1e-3, min_agreement, 0.9999, 1e-3)
    if precision == "fp16":
        return Tolerance(3e-2, min_agreement, 0.999, 3e-2)
    if precision == "int8-dynamic":  # per-row int8 promises the same bits alone and batched
        return Tolerance(None, min_agreement, 0.99, 0.0)
    return Tolerance(None, min_agreement, 0.99, 5e-2)


@dataclass
class Fidelity:
    """How close a candidate graph is to the reference: a pass/fail score and a finer error."""

    score: float  # top-1 agreement (the lower of measured and expected), or minimum cosine for embeddings
    error: float  # mean absolute output error, to rank layers whose score ties


@dataclass
class Figures:
    """Raw-output figures of one graph against the reference."""

    max_abs: dict[str, float] = field(default_factory=dict)
    mean_abs: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0
    agreement: float | None = None
    agreement_lower_95: float | None = None  # Wilson's bound over the items (not over every position)
    expected_agreement: float | None = None  # on new text, from these items' margins and shifts
    items: int = 0
    min_cosine: float | None = None
    mean_cosine: float | None = None

    def fidelity(self) -> Fidelity:
        score = self.min_cosine if self.agreement is None else min(self.agreement, self.expected_agreement or 1.0)
        return Fidelity(score=float(score), error=float(np.mean(list(self.mean_abs.values()))))

    def relative_max_abs(self) -> float:
        return max(self.max_abs.values()) / self.scale


def wilson_lower(agreeing: float, n: int, z: float = 1.96) -> float:
    """The 95% lower bound of a proportion (Wilson score interval): 64 items all agreeing say no more
    than 0.943; 400 say 0.9905."""
    if n == 0:
        return 0.0
    p = agreeing / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def compare(task: str, reference: Items, got: Items, pooling_mode: str = "mean") -> Figures:
    figures = Figures(items=len(reference))
    names = list(reference[0])
    figures.scale = max(1.0, max(float(np.abs(r[n]).max()) for r in reference for n in names))
    for name in names:
        diffs = [np.abs(r[name] - g[name]) for r, g in zip(reference, got, strict=True)]
        figures.max_abs[name] = float(max(d.max() for d in diffs))
        figures.mean_abs[name] = float(np.mean([d.mean() for d in diffs]))
    if task == "feature-extraction":
        cosines = [
            cosine(pool(r["last_hidden_state"], pooling_mode), pool(g["last_hidden_state"], pooling_mode))
            for r, g in zip(reference, got, strict=True)
        ]
        figures.min_cosine, figures.mean_cosine = float(min(cosines)), float(np.mean(cosines))
    else:
        per_item = [
            float(np.mean([np.mean(r[n].argmax(-1) == g[n].argmax(-1)) for n in names]))
            for r, g in zip(reference, got, strict=True)
        ]
        figures.agreement = float(np.mean(per_item))
        figures.agreement_lower_95 = wilson_lower(sum(per_item), len(per_item))
        figures.expected_agreement = expected_agreement(reference, got)
    return figures


def expected_agreement(reference: Items, got: Items) -> float:
    """The top-1 agreement to expect on new text like these items: the share of (margin, shift)
    pairs, across every item and position, in which one position's shift of its top-two difference
    would not overturn another's margin.

    A few dozen items all agreeing say little (64 of 64: a 95% lower bound of 0.943), and a graph
    that kept all 64 once flipped 2 of 278 held-out answers. How close the errors come to the
    margins says more: each position's margin (top score minus runner-up, in the reference) is
    tried against every position's shift (how much the candidate moved its own top-two difference),
    64 x 64 pairs instead of 64 outcomes.
    """
    margins, shifts = [], []
    for r, g in zip(reference, got, strict=True):
        for name, ref in r.items():
            if ref.ndim == 0 or ref.shape[-1] < 2:
                continue
            ref = ref.reshape(-1, ref.shape[-1])
            moved = g[name].reshape(ref.shape) - ref
            runner_up, top = np.argsort(ref, axis=-1)[:, -2:].T
            rows = np.arange(len(ref))
            margins.append(ref[rows, top] - ref[rows, runner_up])
            shifts.append(moved[rows, top] - moved[rows, runner_up])  # below -margin: overturned
    if not margins:
        return 1.0
    ordered = np.sort(np.concatenate(shifts))
    overturned = np.searchsorted(ordered, -np.concatenate(margins), side="left") / len(ordered)
    return float(1.0 - overturned.mean())
