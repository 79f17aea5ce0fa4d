"""The export flow for generators: optimum-onnx's graphs with past, lowered (int8 or fp16) graph by
graph, assembled into a package with its generation layout, and gated greedy token by token
against `transformers` `generate` (kiln.export.generation_gate) before it is written.

Same transaction as every export (kiln.export.output): built in a scratch directory, renamed into
place only when the gate passed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.export.gemm_as_matmul import split_constant_gemms
from kiln.export.generation_gate import GATE_NEW_TOKENS, reference, run_generation_gate
from kiln.export.key_transpose import move_key_scales
from kiln.export.onnx_export import TOKENIZER_FILES, export_onnx
from kiln.export.original import load_torch, source_record, tool_versions
from kiln.export.output import move_into_place
from kiln.export.quantize import convert_fp16, int8_scheme, quantize_int8
from kiln.export.resolve import ResolvedModel
from kiln.export.rowwise_int8 import WEIGHT_LEVELS, Calibrated
from kiln.export.targets import GraphForm
from kiln.export.tasks import GENERATORS, DetectedTask
from kiln.export.texts import split_texts
from kiln.runtime.cpu import INT8_CPUS
from kiln.runtime.errors import ParityError, UnsupportedModel
from kiln.runtime.generation.package import load_generator
from kiln.runtime.manifest import Manifest, sha256_file
from kiln.runtime.session import SessionOptions
from kiln.runtime.tasks import spec_for

if TYPE_CHECKING:
    from kiln.export.build import ExportOptions, ExportResult, Stages

GRAPHS = {
    "decoder-only": {"decoder": "model.onnx"},
    "encoder-decoder": {
        "encoder": "encoder_model.onnx",
        "decoder": "decoder_model.onnx",
        "decoder_with_past": "decoder_with_past_model.onnx",
    },
}
GENERATION_ITEMS = 100  # greedy prompts the gate runs by default (each is up to 32 decoding steps, twice)
MIN_IDENTICAL = 0.95  # int8 / fp16: share of prompts whose greedy output must be identical
EXTRA_FILES = ("generation_config.json", "spiece.model", "source.spm", "target.spm")


def export_generator(
    options: ExportOptions,
    form: GraphForm,
    resolved: ResolvedModel,
    config: dict[str, Any],
    task: DetectedTask,
    output: Path,
    work: Path,
    stages: Stages,
) -> ExportResult:
    from kiln.export.build import ExportResult

    if form.precision not in ("fp32", "int8-dynamic", "fp16"):
        raise UnsupportedModel(f"a generator exports as fp32, int8 or fp16; {form.precision} is for encoders")
    layout = GENERATORS[task.model_type][0]
    texts = split_texts(options.calibration, options.validation, min(options.validation_items, GENERATION_ITEMS), False)
    model = load_torch(resolved, task.task, options.trust_remote_code)
    stages.done("resolve", f"{task.model_type} ({layout}) for {task.task} from {resolved.path}")

    raw_dir = work / "onnx"
    export_onnx(resolved.path, task.task, options.opset, raw_dir, options.trust_remote_code)
    graphs = GRAPHS[layout]
    missing = [name for name in graphs.values() if not (raw_dir / name).is_file()]
    if missing:
        raise UnsupportedModel(f"optimum-onnx did not write {', '.join(missing)} for {task.task}")
    fp32_bytes = sum((raw_dir / name).stat().st_size for name in graphs.values())
    stages.done("export", f"ONNX opset {options.opset} with past: {', '.join(graphs.values())}")

    package_dir = work / "package"
    package_dir.mkdir()
    quantization = _lower(form, raw_dir, package_dir, graphs)
    stages.done("quantize", quantization["scheme"])

    manifest = _manifest(task, form, config, layout, graphs, quantization, package_dir, raw_dir)
    manifest.source, manifest.tools, manifest.opset = source_record(resolved), tool_versions(), options.opset
    manifest.write(package_dir)
    pipe = spec_for(task.task).pipeline(load_generator(package_dir, SessionOptions(allow_fp16_on_cpu=True)))
    ref = reference(model, pipe.generator, texts.validation)
    threshold = options.min_agreement if options.min_agreement is not None else MIN_IDENTICAL
    gate = run_generation_gate(pipe, model, ref, form.precision, threshold)
    manifest.parity = {**gate.report, "provider": "cpu", "texts": texts.record()}
    if not gate.passed:
        raise ParityError("parity gate failed:\n  - " + "\n  - ".join(gate.failures), manifest.parity)
    manifest.write(package_dir)
    stages.done(
        "validate", f"greedy {GATE_NEW_TOKENS} tokens on {len(ref.prompts)} held-out prompts against transformers"
    )

    sizes = {"fp32_onnx": fp32_bytes, "package_model": sum((package_dir / n).stat().st_size for n in graphs.values())}
    move_into_place(package_dir, output)
    stages.done("write", f"package written to {output}")
    return ExportResult(output, manifest, sizes, stages.seconds)


def _lower(form: GraphForm, raw_dir: Path, package_dir: Path, graphs: dict[str, str]) -> dict[str, Any]:
    """Each graph at the package's precision; returns what was done (the manifest's quantization).

    int8 is kiln's per-row int8 (kiln.export.rowwise_int8), as for encoders: a row's scale is its
    own, so a sequence decodes to the same tokens alone or beside any others. onnxruntime's dynamic
    int8, used here until 2026-12-06, shares one scale across the rows of a step, and which prompts
    shared a step changed near-tied picks."""
    moved, int8 = 0, []
    for name in graphs.values():
        source, target = raw_dir / name, package_dir / name
        moved += move_key_scales(source)
        if form.precision == "int8-dynamic":
            split_constant_gemms(source)
            int8.append(quantize_int8(source, target, [], _weight_levels(form)))
        elif form.precision == "fp16":
            convert_fp16(source, target)
        else:
            shutil.copyfile(source, target)
    quantization: dict[str, Any] = {"scheme": "kept fp32" if form.precision == "fp32" else "fp16 with float32 IO"}
    if int8:
        details = int8[0].details  # the same levels and rounding for every graph
        counts = ", ".join(f"{name}: {done.quantized}" for name, done in zip(graphs, int8, strict=True))
        scheme = int8_scheme(details["weight_levels"], details["weight_rounding"], f"every MatMul ({counts})")
        quantization = {**details, "int8_matmuls": sum(q.quantized for q in int8), "scheme": scheme}
    if moved:
        quantization["scheme"] += f"; key scales moved onto the queries in {moved} attention MatMuls"
    return quantization


def _weight_levels(form: GraphForm) -> Calibrated | None:
    """Generators calibrate nothing: weights rounded to nearest, at the levels the target CPUs allow."""
    levels = INT8_CPUS[form.int8_cpus]
    return None if levels == WEIGHT_LEVELS else Calibrated({}, levels)


def _manifest(
    task: DetectedTask,
    form: GraphForm,
    config: dict[str, Any],
    layout: str,
    graphs: dict[str, str],
    quantization: dict[str, Any],
    package_dir: Path,
    raw_dir: Path,
) -> Manifest:
    for name in (*TOKENIZER_FILES, *EXTRA_FILES):
        if (raw_dir / name).is_file():
            shutil.copyfile(raw_dir / name, package_dir / name)
    generation: dict[str, Any] = {"layout": layout, "sessions": graphs, "max_positions": task.max_length}
    if layout == "encoder-decoder":
        start = _generation_field(raw_dir, config, "decoder_start_token_id")
        if start is None:
            raise UnsupportedModel("the model's config names no decoder_start_token_id")
        generation.update(decoder_start_token_id=start, max_source=task.max_length)
    return Manifest(
        task=task.task,
        precision=form.precision,
        target=form.target,
        inputs=["input_ids", "attention_mask"],
        outputs=["logits"],
        max_sequence_length=task.max_length,
        model_type=task.model_type,
        quantization=quantization,
        files={p.name: sha256_file(p) for p in sorted(package_dir.iterdir()) if p.is_file()},
        generation=generation,
    )


def _generation_field(raw_dir: Path, config: dict[str, Any], key: str) -> Any:
    path = raw_dir / "generation_config.json"
    generation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return generation.get(key, config.get(key))
