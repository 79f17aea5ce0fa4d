"""The parity gate: an export is done only when its package answers like the PyTorch original on
held-out text.

Checked on the validation items (never the text that calibrated the package): raw outputs with each
item alone and in unsorted padded batches, top-1 agreement (with its 95% lower bound) or cosine,
batch invariance (alone against batched), and end-to-end task answers of kiln's pipeline against
the original's (the `transformers` pipeline, or pooled PyTorch vectors for embeddings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kiln.export.figures import Figures, Items, Tolerance, compare, wilson_lower
from kiln.export.items import BATCH, Inputs, run_onnx
from kiln.export.task_exports import EXPORTS
from kiln.runtime.package import Package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.tasks import TaskSpec, spec_for


@dataclass
class GateResult:
    passed: bool
    report: dict[str, Any]
    failures: list[str]


def their_answers(spec: TaskSpec, hf_pipe: Any, inputs: Inputs, reference: Items, pooling: Any) -> list[Any]:
    """The original's answers: transformers' pipeline, or pooled PyTorch vectors for embeddings."""
    return EXPORTS[spec.task].gate.theirs(hf_pipe, inputs.items, reference, pooling)


def our_answers(spec: TaskSpec, pipe: Pipeline, inputs: Inputs) -> list[Any]:
    gate = EXPORTS[spec.task].gate
    return gate.ours(pipe.run(spec.prepare(pipe, inputs.items, spec.parse_params(gate.params))))


def task_agreement(spec: TaskSpec, theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    figures = EXPORTS[spec.task].gate.agreement(theirs, ours)
    if "agreement" in figures:
        figures["agreement_lower_95"] = wilson_lower(figures["agreement"] * len(ours), len(ours))
    return figures


def run_gate(
    package: Package, expected: list[Any], reference: Items, inputs: Inputs, tolerance: Tolerance
) -> GateResult:
    """Check a loaded package; returns the report (for kiln.json) and what failed, if anything."""
    manifest = package.manifest
    task, encoder, outputs = manifest.task, package.encoder, manifest.outputs
    mode = manifest.pooling.mode if manifest.pooling else "mean"
    alone = run_onnx(package.session, encoder, inputs, outputs, inputs.alone())
    batched = run_onnx(package.session, encoder, inputs, outputs, inputs.batches())
    one_at_a_time = manifest.max_batch_size == 1
    fig_alone = compare(task, reference, alone, mode)
    fig_graph_batched = compare(task, reference, batched, mode)
    # "batched" is what a caller gets when its text shares a request or a server batch with others
    fig_batched = fig_alone if one_at_a_time else fig_graph_batched
    graph_drift = compare(task, alone, batched, mode)
    drift = compare(task, alone, alone if one_at_a_time else batched, mode)
    spec = spec_for(task)
    end_to_end = task_agreement(spec, expected, our_answers(spec, spec.pipeline(package), inputs))
    failures = _failures(fig_alone, fig_batched, drift, tolerance, end_to_end)
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
        "passed": not failures,
        "failures": failures,
    }
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
            failures.append(
                f"top-1 agreement ({label}) {fig.agreement:.4f} < {tol.min_agreement:g} on {fig.items} held-out items"
            )
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
