"""Lowering the fp32 graph to the package's precision, trading speed for accuracy step by step on
the calibration items until the target is met (the gate then checks held-out items)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from kiln.export.activation_stats import activation_stats
from kiln.export.figures import Fidelity, Items, Tolerance, compare
from kiln.export.gate import our_answers
from kiln.export.items import Inputs, run_onnx
from kiln.export.original import Reference
from kiln.export.qdq import quantize_qdq
from kiln.export.quantize import QuantInfo, convert_fp16, head_matmuls, layer_of, matmul_weights, quantize_int8
from kiln.export.rowwise_int8 import SWITCH, Calibrated, quantize_rows
from kiln.export.sensitivity import Switchboard, back_to_int8, fewest_in_float, rank_groups
from kiln.export.targets import GraphForm
from kiln.export.task_exports import EXPORTS
from kiln.runtime.cpu import INT8_CPUS
from kiln.runtime.errors import ParityError
from kiln.runtime.manifest import Manifest
from kiln.runtime.native import kernels_library
from kiln.runtime.package import Package
from kiln.runtime.session import SessionOptions, create_session
from kiln.runtime.tasks import spec_for
from kiln.runtime.tokenize import TextEncoder

# the calibration tokens each group is measured alone on, at all-MiniLM-L6-v2's size (10.6M weights in
# its MatMuls): enough to rank there; a larger model gets proportionally fewer, down to PROBE_MIN_TOKENS,
# so the ladder's time grows with its number of groups, not with their size too
PROBE_TOKENS, PROBE_WEIGHTS, PROBE_MIN_TOKENS = 512, 10.6e6, 128
# what the ladder aims for on the calibration items, as a share of the way from the target to a
# perfect score: the worst of 64 calibration items flatters the worst of hundreds held out (all-MiniLM
# reached cosine 0.992 on calibration items and 0.9885 held out), so aiming at the target itself fails
AIM_SHARE = 0.5


@dataclass
class Scorer:
    """Scores a candidate graph on the calibration items, as its package would serve them."""

    raw_dir: Path
    draft: Manifest
    encoder: TextEncoder
    tuning: Reference
    _short_before: set[int] = field(default_factory=set)  # items in batches that fell short of an aim

    @property
    def task(self) -> str:
        return self.draft.task

    def evaluate(self, path: Path) -> Fidelity:
        """Raw agreement (or cosine) and end-to-end agreement, each item run alone as its package
        serves it; the lower one counts."""
        session = create_session(path, SessionOptions())
        inputs = self.tuning.inputs
        raw = compare(self.task, self.tuning.outputs, self._run(session, inputs, inputs.alone())).fidelity()
        spec = spec_for(self.task)
        package = Package(self.raw_dir, replace(self.draft, precision="int8-dynamic"), self.encoder, session)
        e2e = EXPORTS[spec.task].gate.agreement(self.tuning.answers, our_answers(spec, spec.pipeline(package), inputs))
        return Fidelity(score=min(raw.score, e2e.get("agreement", e2e.get("min_cosine", 1.0))), error=raw.error)

    def quick(self, session: Any, tokens: int | None = None, aim: float | None = None) -> Fidelity:
        """Raw-output figures only, in batches of like lengths, on the leading items within a budget
        of tokens (all of them without one): what ranks and sizes what int8 costs, in a fraction of
        `evaluate`'s time (the verdict is `evaluate`'s). Given the `aim` that a yes/no question is
        asked against, an embedding's score (its worst item's cosine) stops at the first batch short."""
        inputs = self.tuning.inputs if tokens is None else self.tuning.inputs.first(tokens)
        if aim is not None and self.task == "feature-extraction":
            return self._until_short(session, inputs, aim)
        got = self._run(session, inputs, inputs.by_length())
        return compare(self.task, self.tuning.outputs[: len(got)], got).fidelity()

    def _until_short(self, session: Any, inputs: Inputs, aim: float) -> Fidelity:
        """The worst cosine, batch by batch, batches that fell short before first: a candidate that
        falls short is known to after a batch or two. The answer (short or not) is the full run's; a
        short score is the lowest seen before stopping, an upper bound of the full run's."""
        items: Items = [{} for _ in inputs.encodings]
        for batch in sorted(inputs.by_length(), key=lambda batch: not self._short_before.intersection(batch)):
            got = self._run(session, inputs, [batch])
            for i in batch:
                items[i] = got[i]
            part = compare(self.task, [self.tuning.outputs[i] for i in batch], [got[i] for i in batch]).fidelity()
            if part.score < aim:
                self._short_before.update(batch)
                return part
        return compare(self.task, self.tuning.outputs[: len(items)], items).fidelity()

    def forms(self, path: Path) -> dict[bool, tuple[Items, Items]]:
        """Every item's outputs alone and in padded batches, with kiln's kernels (True, where the
        library is built) and without them (False: onnxruntime running the ops' definitions): what
        `batch_invariant` and `without_native_kernels` judge, run once."""
        inputs, runs = self.tuning.inputs, {}
        for native in (True, False) if kernels_library() is not None else (False,):
            session = create_session(path, SessionOptions(native_kernels=native))
            runs[native] = (self._run(session, inputs, inputs.alone()), self._run(session, inputs, inputs.batches()))
        return runs

    def without_native_kernels(
        self, forms: dict[bool, tuple[Items, Items]], target: float, exact: bool
    ) -> dict[str, Any] | str:
        """How the package answers where kiln's kernels library is missing (onnxruntime inlines the
        ops' definitions instead), on the calibration items in padded batches. The quantiser's kernel
        gives its definition's bits (`exact`: a graph without kiln's attention and LayerNorm must
        match bit for bit); those two kernels the same answers to float rounding, which int8's
        rounding of the next activation can widen: so the outputs of the two forms are compared, and the form
        without the kernels is scored as int8 is and must reach `target`."""
        if True not in forms:
            return "not checked: kiln's kernels library is not built here (the standard ops ran)"
        native, standard = forms[True][1], forms[False][1]
        same = same_bits(native, standard)
        if exact and not same:
            raise ParityError(
                "kiln's native RowQuantize kernel gave other bits than its standard-op definition on the "
                "calibration items: a kiln bug; export with KILN_NATIVE_KERNELS=0 and report it"
            )
        score = compare(self.task, self.tuning.outputs, standard).fidelity().score
        if score < target:
            raise ParityError(
                f"without kiln's kernels library this package scores {score:.4f} < {target:g} on the calibration "
                "items (onnxruntime's attention and LayerNorm instead of kiln's); export with KILN_NATIVE_KERNELS=0 "
                "and report it"
            )
        between = compare(self.task, native, standard)
        return {
            "items": len(native),
            "same_bits": same,
            "max_difference": max(between.max_abs.values()),
            "agreement_between" if between.agreement is not None else "min_cosine_between": between.fidelity().score,
            "score_without": score,
        }

    def alone_feeds(self) -> list[dict[str, Any]]:
        """Each calibration item as its own unpadded batch."""
        return [self.encoder.pad([e]).feeds for e in self.tuning.inputs.encodings]

    def _run(self, session: Any, inputs: Inputs, groups: list[list[int]]) -> Items:
        return run_onnx(session, self.encoder, inputs, self.draft.outputs, groups)


def same_bits(a: Items, b: Items) -> bool:
    """Whether two runs gave every item's every output the same bits."""
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def lower_precision(
    form: GraphForm, fp32_path: Path, work: Path, scorer: Scorer | None, tolerance: Tolerance
) -> tuple[Path, QuantInfo | None]:
    out = work / "lowered.onnx"
    if form.precision == "fp32":
        return fp32_path, None
    if form.precision == "fp16":
        return out, convert_fp16(fp32_path, out, fused=form.fusions is not None)
    target = tolerance.min_cosine if scorer.task == "feature-extraction" else tolerance.min_agreement
    if form.precision == "int8-static":
        return out, quantize_qdq(fp32_path, out, scorer.alone_feeds(), scorer.evaluate, target)
    heads = head_matmuls(fp32_path)  # the task head decides the answer directly and costs little: float
    calibrated = Calibrated(activation_stats(fp32_path, scorer.alone_feeds()), INT8_CPUS[form.int8_cpus])
    info = quantize_int8(fp32_path, out, heads, calibrated)
    reached = scorer.evaluate(out).score
    aim = target + (1 - target) * AIM_SHARE
    if reached < aim:  # the projections that cost answers go back to float, most damaging first
        info, reached = choose_float_groups(fp32_path, out, scorer, aim, heads, calibrated)
    info.details.update(score_on_calibration_items=reached, aimed_at=aim)
    if info.quantized == 0:
        raise ParityError(
            f"int8 cannot reach {target:g} on this model, nor with its most sensitive projections back in float; "
            "export fp32 (--quantize none) or lower --min-agreement",
            {"quantization": info.details},
        )
    forms = scorer.forms(out)
    # a graph whose answers depend on batch-mates, in either form, runs one text per call (max_batch_size 1)
    info.details["batch_invariant"] = all(same_bits(alone, batched) for alone, batched in forms.values())
    exact = not (info.details.get("self_attentions") or info.details.get("skip_layer_norms"))
    info.details["native_kernels"] = scorer.without_native_kernels(forms, target, exact)
    return out, info


def choose_float_groups(
    fp32_path: Path, out: Path, scorer: Scorer, aim: float, always_float: list[str], calibrated: Calibrated
) -> tuple[QuantInfo, float]:
    """Write to `out` kiln's int8 with the fewest groups of MatMuls (those reading one activation)
    in float that bring the calibration items to `aim`: ranked, sized and pared in one switched
    session (kiln.export.sensitivity), then checked as served and widened while it falls short."""
    switched = out.with_name("switched.onnx")
    groups = quantize_rows(fp32_path, switched, set(always_float), switched=True, calibrated=calibrated).switches
    board = Switchboard(create_session(switched, SessionOptions()), groups)
    switched.unlink()

    floor = scorer.quick(board.with_int8(set())).score
    if floor < aim:  # the answers are near ties that even float rounding moves: no int8 can do better
        raise ParityError(
            f"int8 cannot reach {aim:.4f} on the calibration items: the float graph itself scores {floor:.4f} there "
            "(answers in near ties); export fp32 (--quantize none) or lower --min-agreement",
            {"quantization": {"float_score_on_calibration_items": floor, "aimed_at": aim}},
        )

    def label(group: str) -> str:
        return f"{layer_of(board.groups[group][0]) or 'head'} <- {group.removeprefix(SWITCH)}"

    weights = sum(k * n for k, n in matmul_weights(fp32_path).values())
    tokens = int(np.clip(PROBE_TOKENS * PROBE_WEIGHTS / weights, PROBE_MIN_TOKENS, PROBE_TOKENS))
    ranked = rank_groups(board, lambda b: scorer.quick(b, tokens), label)

    def short_or_not(candidate: Switchboard) -> Fidelity:  # asked against the aim: may stop early
        return scorer.quick(candidate, aim=aim)

    count = fewest_in_float(board, ranked, short_or_not, aim)
    floating = back_to_int8(board, ranked, count, short_or_not, aim)
    more = iter(t["switch"] for t in ranked if t["switch"] not in floating)
    while True:  # checked as served: widened, most damaging first, while it falls short
        kept = [m for group in floating for m in board.groups[group]]
        info = quantize_int8(fp32_path, out, always_float + kept, calibrated)
        reached = scorer.evaluate(out).score
        if reached >= aim or len(floating) == len(ranked):
            break
        floating.add(next(more))
    for trial in ranked:
        trial["kept_in_float"] = trial.pop("switch") in floating
    info.details["sensitivity"] = ranked
    return info, reached
