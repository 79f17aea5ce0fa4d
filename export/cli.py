"""`kiln export`: arguments, progress on a terminal, and the closing summary (or --json)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kiln.export.build import ExportOptions, ExportResult, export
from kiln.export.targets import graph_form


def run(args: argparse.Namespace) -> int:
    if args.min_agreement is not None and not 0.0 < args.min_agreement <= 1.0:
        raise SystemExit("kiln export: --min-agreement must be in (0, 1]")
    form = graph_form(args.device, args.quantize, args.int8_cpus)
    suffix = form.precision if form.target == "cpu" else f"{form.precision}-{form.target}"
    output = args.output or Path(f"{Path(args.model).name}-{suffix}")
    options = ExportOptions(
        model=args.model,
        output=output,
        revision=args.revision,
        task=args.task,
        quantize=args.quantize,
        device=args.device,
        int8_cpus=args.int8_cpus,
        opset=args.opset,
        max_length=args.max_length,
        calibration=args.calibration,
        validation=args.validation,
        validation_items=args.validation_items,
        min_agreement=args.min_agreement,
        force=args.force,
        trust_remote_code=args.trust_remote_code,
        optimize=not args.no_optimize,
    )
    show_progress = not (args.json or args.quiet)
    result = export(options, progress=_print_progress if show_progress else lambda *_: None)
    if args.json:
        print(json.dumps(_result_json(result), ensure_ascii=False))
    else:
        print(summary(result))
    return 0


def _print_progress(stage: str, message: str) -> None:
    print(f"[{stage:>8}] {message}", file=sys.stderr, flush=True)


def summary(result: ExportResult) -> str:
    manifest, report = result.manifest, result.manifest.parity
    lines = [
        f"kiln package: {result.output}",
        f"  task {manifest.task}, precision {manifest.precision}, for {manifest.target}, "
        f"max length {manifest.max_sequence_length}",
        f"  size: fp32 ONNX {result.sizes['fp32_onnx'] / 1e6:.1f} MB -> "
        f"model {result.sizes['package_model'] / 1e6:.1f} MB",
    ]
    texts = report["texts"]
    if manifest.generation:
        return "\n".join(lines + _generation_lines(report))
    lines.append(
        f"  validated on {report['items']} held-out items ({texts['validation_source']}); "
        f"calibrated on {texts['calibration_items']}"
    )
    batched = report["batched"]
    if batched.get("agreement") is not None:
        lines.append(
            f"  top-1 agreement with PyTorch: {batched['agreement']:.4f} (95% lower bound "
            f"{batched['agreement_lower_95']:.4f}; batched), {report['alone']['agreement']:.4f} (one at a time)"
        )
    if batched.get("min_cosine") is not None:
        lines.append(
            f"  embedding cosine with PyTorch: min {batched['min_cosine']:.5f}, mean {batched['mean_cosine']:.5f}"
        )
    lines.append(f"  max abs error: {_fmt(batched['max_abs'])}")
    invariance = report["batch_invariance"]
    served = "one text per call" if invariance["served_one_text_per_call"] else "batched"
    lines.append(
        f"  batch invariance ({served}): max |alone - served| {invariance['max_abs']:.3g}; "
        f"graph in padded batches of 8: max drift {invariance['graph_batched_max_abs']:.3g}"
    )
    e2e = {k: v for k, v in report["end_to_end"].items() if k != "items"}
    lines.append(f"  task answers vs transformers pipeline: {_fmt(e2e)}")
    if manifest.target != "cpu":
        lines.append(_target_line(manifest.target, report.get("on_target")))
    kept = manifest.quantization.get("kept_float")
    if kept:
        lines.append(f"  kept in float for accuracy: {len(kept)} MatMuls")
        if len(kept) > manifest.quantization.get("int8_matmuls", len(kept)):
            lines.append(
                "  note: most MatMuls stayed in float, so this package may be no faster than fp32; calibration text "
                "like the model's traffic (--calibration FILE) lets int8 keep fewer in float"
            )
    return "\n".join(lines)


def _generation_lines(report: dict[str, Any]) -> list[str]:
    texts, forced = report["texts"], report["teacher_forced"]
    lines = [
        f"  validated on {report['items']} held-out prompts ({texts['validation_source']}), greedy, "
        f"{report['new_tokens']} new tokens, each prompt alone",
        f"  greedy output identical to transformers generate: {report['identical']:.4f} (95% lower bound "
        f"{report['identical_lower_95']:.4f}; required {report['required_identical']})",
        f"  teacher-forced: max logit error {forced['max_logit_error']:.3g}, "
        f"top-1 agreement {forced['top1_agreement']:.4f}",
    ]
    if report.get("first_divergence"):
        lines.append(f"  first divergence: token {report['first_divergence']['min']} at the earliest")
    if "chrf_vs_original" in report:
        lines.append(f"  chrF against the original's text: {report['chrf_vs_original']:.2f} (100: identical)")
    return lines


def _target_line(target: str, on_target: dict[str, Any] | None) -> str:
    if on_target is None or "skipped" in on_target:
        return (
            f"  on {target}: not checked (no {target} provider on this machine); the figures above are from the "
            f"same graph on CPU: measure it on the GPU with `kiln bench gpu`"
        )
    figures = on_target["batched"]
    score = figures.get("agreement")
    shown = f"agreement {score:.4f}" if score is not None else f"cosine min {figures['min_cosine']:.5f}"
    return f"  on {target}: {shown}, max abs error {max(figures['max_abs'].values()):.3g} (gate passed there too)"


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def _result_json(result: ExportResult) -> dict[str, Any]:
    return {
        "output": str(result.output),
        "sizes": result.sizes,
        "seconds": result.seconds,
        "manifest": result.manifest.to_dict(),
    }
