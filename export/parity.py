"""The parity gate: an export is done only when its package answers like the PyTorch original.

Checked on real tokenized text of several lengths: raw outputs (each text alone, and in padded
batches), top-1 agreement or cosine, batch invariance (alone against batched), and end-to-end
task answers of kiln's runtime against the `transformers` pipeline on the original model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kiln.export.quantize import Fidelity
from kiln.runtime.package import Package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.pipelines.feature_extraction import pool
from kiln.runtime.session import SessionOptions, create_session
from kiln.runtime.tasks import TaskSpec, Texts, spec_for
from kiln.runtime.tasks.feature_extraction import cosine
from kiln.runtime.tokenize import TextEncoder
from tokenizers import Encoding

BATCH = 8


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
    return Tolerance(None, min_agreement, 0.99, 5e-2)


@dataclass
class Inputs:
    """The validation items of a task, and the encodings its pipeline makes of them: what both the
    package and the original are fed."""

    items: Texts
    encodings: list[Encoding]
    sequence_outputs: tuple[str, ...]

    def batches(self) -> list[list[int]]:
        """Unsorted batches, so padding is exercised as a server would see it."""
        n = len(self.encodings)
        return [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]


def make_inputs(pipe: Pipeline, texts: list[str], mask_token: str | None) -> Inputs:
    spec = spec_for(pipe.task)
    items = spec.gate.items(texts, mask_token)
    prepared = spec.prepare(pipe, items, spec.parse_params(spec.gate.params))
    return Inputs(items, prepared.encodings, pipe.sequence_outputs)


Items = list[dict[str, np.ndarray]]


def run_onnx(session: Any, encoder: TextEncoder, inputs: Inputs, outputs: list[str], alone: bool) -> Items:
    groups = [[i] for i in range(len(inputs.encodings))] if alone else inputs.batches()
    items: Items = [{} for _ in inputs.encodings]
    for group in groups:
        batch = encoder.pad([inputs.encodings[i] for i in group])
        values = session.run(outputs, batch.feeds)
        _split(items, group, inputs, dict(zip(outputs, values, strict=True)))
    return items


def run_torch(model: Any, encoder: TextEncoder, inputs: Inputs, outputs: list[str]) -> Items:
    import torch

    items: Items = [{} for _ in inputs.encodings]
    with torch.inference_mode():
        for group in inputs.batches():
            batch = encoder.pad([inputs.encodings[i] for i in group])
            result = model(**{k: torch.from_numpy(v) for k, v in batch.feeds.items()})
            values = {name: getattr(result, name).float().numpy() for name in outputs}
            _split(items, group, inputs, values)
    return items


def _split(items: Items, group: list[int], inputs: Inputs, values: dict[str, np.ndarray]) -> None:
    for row, index in enumerate(group):
        length = len(inputs.encodings[index].ids)
        items[index] = {
            name: value[row, :length] if name in inputs.sequence_outputs else value[row]
            for name, value in values.items()
        }


@dataclass
class Figures:
    """Raw-output figures of one graph against the reference."""

    max_abs: dict[str, float] = field(default_factory=dict)
    mean_abs: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0
    agreement: float | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None

    def fidelity(self) -> Fidelity:
        score = self.min_cosine if self.agreement is None else self.agreement
        return Fidelity(score=float(score), error=float(np.mean(list(self.mean_abs.values()))))

    def relative_max_abs(self) -> float:
        return max(self.max_abs.values()) / self.scale


def compare(task: str, reference: Items, got: Items, pooling_mode: str = "mean") -> Figures:
    figures = Figures()
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
        matches = [
            np.mean(r[n].argmax(-1) == g[n].argmax(-1)) for r, g in zip(reference, got, strict=True) for n in names
        ]
        figures.agreement = float(np.mean(matches))
    return figures


# ---- end-to-end task answers: kiln's runtime pipeline against transformers' pipeline ----------


def hf_answers(spec: TaskSpec, hf_pipe: Any, inputs: Inputs, reference: Items, pooling: Any) -> list[Any]:
    """The original's answers: transformers' pipeline, or pooled PyTorch vectors for embeddings."""
    return spec.gate.theirs(hf_pipe, inputs.items, reference, pooling)


def kiln_answers(spec: TaskSpec, pipe: Pipeline, inputs: Inputs) -> list[Any]:
    return spec.gate.ours(pipe.run(spec.prepare(pipe, inputs.items, spec.parse_params(spec.gate.params))))


# ---- the gate ---------------------------------------------------------------------------------


def median_ms(sessions: dict[str, Any], encoder: TextEncoder, inputs: Inputs, rounds: int = 4) -> dict[str, float]:
    """Median latency of one text at a time, per session. The sessions take turns over shares of
    the texts (after a warm-up pass), so that the machine's drift does not favour one of them;
    text by text alternation would not do either: one session's spinning threads slow the next."""
    batches = [encoder.pad([enc]) for enc in inputs.encodings]
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for batch in batches:
            session.run(None, batch.feeds)
    for r in range(rounds):
        for name, session in sessions.items():
            for batch in batches[r::rounds]:
                start = time.perf_counter()
                session.run(None, batch.feeds)
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1000) for name, t in times.items()}


@dataclass
class GateResult:
    passed: bool
    report: dict[str, Any]
    failures: list[str]


def run_gate(
    package: Package,
    expected: list[Any],
    reference: Items,
    inputs: Inputs,
    tolerance: Tolerance,
    fp32_path: Path | None,
) -> GateResult:
    """Check a loaded package; returns the report (for kiln.json) and what failed, if anything."""
    manifest = package.manifest
    task, encoder, outputs = manifest.task, package.encoder, manifest.outputs
    mode = manifest.pooling.mode if manifest.pooling else "mean"
    alone = run_onnx(package.session, encoder, inputs, outputs, alone=True)
    batched = run_onnx(package.session, encoder, inputs, outputs, alone=False)
    one_at_a_time = manifest.max_batch_size == 1
    fig_alone = compare(task, reference, alone, mode)
    fig_graph_batched = compare(task, reference, batched, mode)
    # "batched" is what a caller gets when its text shares a request or a server batch with others
    fig_batched = fig_alone if one_at_a_time else fig_graph_batched
    graph_drift = compare(task, alone, batched, mode)
    drift = compare(task, alone, alone if one_at_a_time else batched, mode)
    spec = spec_for(task)
    end_to_end = spec.gate.agreement(expected, kiln_answers(spec, spec.pipeline(package), inputs))
    report: dict[str, Any] = {
        "precision": manifest.precision,
        "items": len(inputs.encodings),
        "batch_sizes": [1, BATCH],
        "tolerance": asdict(tolerance),
        "alone": asdict(fig_alone),
        "batched": asdict(fig_batched),
        "graph_in_padded_batches": asdict(fig_graph_batched),
        "batch_invariance": {
            "served_one_text_per_call": one_at_a_time,
            "max_abs": max(drift.max_abs.values()),
            "agreement": drift.agreement,
            "min_cosine": drift.min_cosine,
            "graph_batched_max_abs": max(graph_drift.max_abs.values()),
            "graph_batched_agreement": graph_drift.agreement,
        },
        "end_to_end": end_to_end,
    }
    if fp32_path is not None:
        fp32 = create_session(fp32_path, SessionOptions())
        report["speed_one_text_ms"] = median_ms({"fp32": fp32, manifest.precision: package.session}, encoder, inputs)
    failures = _failures(fig_alone, fig_batched, drift, tolerance, end_to_end)
    report["passed"] = not failures
    report["failures"] = failures
    return GateResult(not failures, report, failures)


def _failures(alone: Figures, batched: Figures, drift: Figures, tol: Tolerance, e2e: dict) -> list[str]:
    failures = []
    for label, fig in (("alone", alone), ("batched", batched)):
        if tol.max_abs is not None and fig.relative_max_abs() > tol.max_abs:
            failures.append(
                f"raw outputs ({label}) differ by up to {max(fig.max_abs.values()):.3g} "
                f"(relative {fig.relative_max_abs():.3g} > {tol.max_abs:g})"
            )
        if fig.agreement is not None and fig.agreement < tol.min_agreement:
            failures.append(f"top-1 agreement ({label}) {fig.agreement:.4f} < {tol.min_agreement:g}")
        if fig.min_cosine is not None and fig.min_cosine < tol.min_cosine:
            failures.append(f"embedding cosine ({label}) down to {fig.min_cosine:.5f} < {tol.min_cosine:g}")
    # batched kernels round differently (GPU libraries pick other algorithms by batch size), which
    # can flip a near-tied label: such flips count against the same budget as disagreement with PyTorch
    if drift.agreement is not None and drift.agreement < tol.min_agreement:
        failures.append(
            f"answers depend on batch-mates: {1 - drift.agreement:.2%} of top-1 labels change "
            f"(more than the {1 - tol.min_agreement:.2%} --min-agreement allows)"
        )
    if drift.relative_max_abs() > tol.max_batch_drift:
        failures.append(
            f"outputs depend on batch-mates: up to {max(drift.max_abs.values()):.3g} between alone and batched"
        )
    if "agreement" in e2e and e2e["agreement"] < tol.min_agreement:
        failures.append(f"task answers agree with transformers on {e2e['agreement']:.4f} < {tol.min_agreement:g}")
    if "min_cosine" in e2e and e2e["min_cosine"] < tol.min_cosine:
        failures.append(f"pipeline embeddings cosine down to {e2e['min_cosine']:.5f} < {tol.min_cosine:g}")
    return failures
