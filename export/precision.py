"""Lowering the fp32 graph to the package's precision, trading speed for accuracy step by step on
the calibration items until the target is met (the gate then checks held-out items)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from kiln.export.figures import Fidelity, Tolerance, compare
from kiln.export.gate import our_answers
from kiln.export.items import run_onnx
from kiln.export.original import Reference
from kiln.export.qdq import quantize_qdq
from kiln.export.quantize import (
    QuantInfo,
    choose_float_layers,
    convert_fp16,
    head_matmuls,
    quantize_int8,
)
from kiln.export.targets import GraphForm
from kiln.export.task_exports import EXPORTS
from kiln.runtime.errors import ParityError
from kiln.runtime.manifest import Manifest
from kiln.runtime.package import Package
from kiln.runtime.session import SessionOptions, create_session
from kiln.runtime.tasks import spec_for
from kiln.runtime.tokenize import TextEncoder


@dataclass
class Scorer:
    """Scores a candidate graph on the calibration items, as its package would serve them."""

    raw_dir: Path
    draft: Manifest
    encoder: TextEncoder
    tuning: Reference

    @property
    def task(self) -> str:
        return self.draft.task

    def evaluate(self, path: Path) -> Fidelity:
        """Raw agreement (or cosine) and end-to-end agreement; the lower one counts."""
        session = create_session(path, SessionOptions())
        got = run_onnx(session, self.encoder, self.tuning.inputs, self.draft.outputs, alone=True)  # served per text
        raw = compare(self.task, self.tuning.outputs, got).fidelity()
        spec = spec_for(self.task)
        package = Package(self.raw_dir, replace(self.draft, precision="int8-dynamic"), self.encoder, session)
        e2e = EXPORTS[spec.task].gate.agreement(
            self.tuning.answers, our_answers(spec, spec.pipeline(package), self.tuning.inputs)
        )
        return Fidelity(score=min(raw.score, e2e.get("agreement", e2e.get("min_cosine", 1.0))), error=raw.error)

    def batch_invariant(self, path: Path) -> bool:
        """Whether every item's outputs are the same bits alone and in padded batches; a graph
        that is not runs one text per call (the manifest's max_batch_size 1)."""
        session = create_session(path, SessionOptions())
        alone = run_onnx(session, self.encoder, self.tuning.inputs, self.draft.outputs, alone=True)
        batched = run_onnx(session, self.encoder, self.tuning.inputs, self.draft.outputs, alone=False)
        return all(np.array_equal(a[k], b[k]) for a, b in zip(alone, batched, strict=True) for k in a)


def lower_precision(
    form: GraphForm, fp32_path: Path, work: Path, scorer: Scorer | None, tolerance: Tolerance, texts: list[str]
) -> tuple[Path, QuantInfo | None]:
    out = work / "lowered.onnx"
    if form.precision == "fp32":
        return fp32_path, None
    if form.precision == "fp16":
        return out, convert_fp16(fp32_path, out, fused=form.fusions is not None)
    target = tolerance.min_cosine if scorer.task == "feature-extraction" else tolerance.min_agreement
    if form.precision == "int8-static":
        return out, quantize_qdq(fp32_path, out, one_text_feeds(scorer.encoder, texts), scorer.evaluate, target)
    heads = head_matmuls(fp32_path)  # the task head decides the answer directly and costs little: float
    info = quantize_int8(fp32_path, out, heads)
    reached = scorer.evaluate(out).score
    info.details["score_on_calibration_items"] = reached
    if reached < target:  # the projections that cost answers go back to float, most damaging first
        kept, trials = choose_float_layers(fp32_path, work, scorer.evaluate, target, heads, by_projection=True)
        info = quantize_int8(fp32_path, out, kept)
        info.details.update(sensitivity=trials, score_on_calibration_items=scorer.evaluate(out).score)
    if info.quantized == 0:
        raise ParityError(
            f"int8 cannot reach {target:g} on this model (every encoder MatMul in int8: {reached:.4f}), "
            "nor with its most sensitive projections back in float; export fp32 (--quantize none) or lower "
            "--min-agreement",
            {"quantization": info.details},
        )
    info.details["batch_invariant"] = scorer.batch_invariant(out)
    return out, info


def one_text_feeds(encoder: TextEncoder, texts: list[str]) -> list[dict[str, Any]]:
    """Each calibration text as its own unpadded batch, for the calibration of explicit int8."""
    return [encoder.pad([e]).feeds for e in encoder.tokenize(texts)]
