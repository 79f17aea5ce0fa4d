"""The export flow, stage by stage: resolve, export, optimise, reference, lower, assemble, gate,
write. Each stage is one module (kiln.export.*); this one only puts them in order.

Everything happens in a scratch directory beside the output; only a package that passed the gate
is renamed into place, so a failure never leaves anything half-written.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.export.assemble import assemble, draft_manifest, input_names, mask_token
from kiln.export.figures import Tolerance, tolerance_for
from kiln.export.gate import GateResult, run_gate
from kiln.export.generative import export_generator
from kiln.export.onnx_export import export_onnx
from kiln.export.optimize import optimize_graph
from kiln.export.original import Original, Reference, load_torch, reference, source_record, tool_versions
from kiln.export.output import check_output, move_into_place, scratch_dir
from kiln.export.precision import Scorer, lower_precision
from kiln.export.resolve import resolve_model
from kiln.export.targets import GraphForm, graph_form
from kiln.export.tasks import detect_task
from kiln.export.texts import TextSplit, split_texts
from kiln.runtime.cpu import cpu_name, int8_cpus_here, int8_kernel
from kiln.runtime.errors import ParityError, ProviderMismatch, ProviderUnavailable, UnsupportedModel
from kiln.runtime.manifest import MODEL_NAME, Manifest
from kiln.runtime.package import Package, load_package
from kiln.runtime.session import SessionOptions, create_session, provider_available
from kiln.runtime.tasks import spec_for
from kiln.runtime.tokenize import TextEncoder

Progress = Callable[[str, str], None]


@dataclass
class ExportOptions:
    model: str
    output: Path
    revision: str | None = None
    task: str | None = None
    quantize: str = "none"
    device: str = "cpu"  # the execution target the graph is shaped for (kiln.export.targets)
    int8_cpus: str = "any"  # the CPUs kiln's int8 must be exact on: any | vnni (kiln.runtime.cpu)
    opset: int = 17
    max_length: int | None = None
    calibration: Path | None = None
    validation: Path | None = None  # held-out text for the gate (else held out of the calibration text)
    validation_items: int = 400
    min_agreement: float | None = None  # None: 0.99 top-1 for encoders, 0.95 identical greedy for generators
    force: bool = False
    trust_remote_code: bool = False
    optimize: bool = True


@dataclass
class ExportResult:
    output: Path
    manifest: Manifest
    sizes: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


class Stages:
    """Progress and time per stage."""

    def __init__(self, progress: Progress):
        self.progress, self.seconds, self._clock = progress, {}, time.perf_counter()

    def done(self, name: str, message: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._clock, 2)
        self._clock = time.perf_counter()
        self.progress(name, f"{message} ({self.seconds[name]:.1f}s)")


def export(options: ExportOptions, progress: Progress = lambda stage, message: None) -> ExportResult:
    form = graph_form(options.device, options.quantize, options.int8_cpus)
    if form.int8_cpus == "vnni" and int8_cpus_here() != "vnni":  # the gate runs the package here
        raise UnsupportedModel(
            f"--int8-cpus {form.int8_cpus} is exported on such a CPU, since the gate proves the package by running "
            f"it; this one ({cpu_name()}, {int8_kernel()}) is not: export on a VNNI machine, or use --int8-cpus any"
        )
    output = Path(options.output).expanduser().absolute()
    check_output(output, options.force)
    texts = split_texts(options.calibration, options.validation, options.validation_items, form.calibrates)
    with scratch_dir(output) as work:
        return _export(options, form, texts, output, work, Stages(progress))


def _export(
    options: ExportOptions, form: GraphForm, texts: TextSplit, output: Path, work: Path, stages: Stages
) -> ExportResult:
    stages.progress("resolve", f"resolving {options.model}")
    resolved = resolve_model(options.model, options.revision)
    config = resolved.config()
    task = detect_task(resolved.path, config, options.task)
    if spec_for(task.task).generative:
        return export_generator(options, form, resolved, config, task, output, work, stages)
    if options.max_length:
        if options.max_length > task.max_length:
            raise UnsupportedModel(f"--max-length {options.max_length} is over the model's limit of {task.max_length}")
        task.max_length = options.max_length
    raw_dir = work / "onnx"
    original = Original(resolved, task, load_torch(resolved, task.task, options.trust_remote_code), raw_dir)
    stages.done("resolve", f"{task.model_type} for {task.task} from {resolved.path}")

    fp32_path = export_onnx(resolved.path, task.task, options.opset, raw_dir, options.trust_remote_code)
    stages.done("export", f"ONNX opset {options.opset}, {fp32_path.stat().st_size / 1e6:.1f} MB")

    fused: dict[str, Any] = {}
    if options.optimize and form.fusions:
        fused, fp32_path = _optimize(fp32_path, work / "optimized.onnx", config, form)
        stages.done("optimize", f"fused for {form.fusions}: {fused or 'nothing'}")

    encoder = TextEncoder.from_directory(raw_dir, input_names(fp32_path), task.max_length)
    session = create_session(fp32_path, SessionOptions())
    outputs = [o.name for o in session.get_outputs()]
    draft = draft_manifest(task, encoder.input_names, outputs, mask_token(raw_dir))
    pipe = spec_for(task.task).pipeline(Package(raw_dir, draft, encoder, session))
    tuning = reference(original, pipe, texts.calibration, outputs) if form.calibrates else None
    held_out = reference(original, pipe, texts.validation, outputs)
    stages.done("reference", f"PyTorch and transformers on {len(texts.validation)} held-out items")

    tolerance = tolerance_for(form.precision, options.min_agreement or 0.99)
    scorer = Scorer(raw_dir, draft, encoder, tuning) if tuning else None
    model_path, info = lower_precision(form, fp32_path, work, scorer, tolerance)
    stages.done("quantize", info.scheme if info else "kept fp32")

    package_dir = work / "package"
    extra = {"opset": options.opset, "source": source_record(resolved), "tools": tool_versions()}
    manifest = assemble(package_dir, raw_dir, model_path, draft, form, extra, info, fused)
    gate = _gate(package_dir, form, held_out, tolerance)
    manifest.parity = {**gate.report, "texts": texts.record()}
    if not gate.passed:
        raise ParityError("parity gate failed:\n  - " + "\n  - ".join(gate.failures), manifest.parity)
    manifest.write(package_dir)
    where = "CPU" + (f" and {form.target}" if "passed" in gate.report.get("on_target", {}) else "")
    stages.done("validate", f"parity passed on {len(held_out.inputs.encodings)} held-out items ({where})")

    sizes = {"fp32_onnx": fp32_path.stat().st_size, "package_model": (package_dir / MODEL_NAME).stat().st_size}
    move_into_place(package_dir, output)
    stages.done("write", f"package written to {output}")
    return ExportResult(output, manifest, sizes, stages.seconds)


def _optimize(path: Path, out: Path, config: dict[str, Any], form: GraphForm) -> tuple[dict[str, Any], Path]:
    try:
        return optimize_graph(path, out, config, form.precision == "int8-dynamic", form.fusions or "cpu"), out
    except Exception as exc:  # the optimizer is best-effort; the unfused graph is still correct
        return {"skipped": f"{type(exc).__name__}: {exc}"}, path


def _gate(package_dir: Path, form: GraphForm, held_out: Reference, tolerance: Tolerance) -> GateResult:
    """The gate on CPU everywhere, and again on the target's provider where this machine has it."""
    gate = run_gate(_gate_package(package_dir, "cpu"), held_out.answers, held_out.outputs, held_out.inputs, tolerance)
    gate.report["provider"] = "cpu"
    if form.target != "cpu" and provider_available(form.target):
        try:
            package = _gate_package(package_dir, form.target)
        except ProviderUnavailable as exc:  # in this onnxruntime build, but not startable on this machine
            gate.report["on_target"] = {"provider": form.target, "skipped": str(exc)}
            return gate
        on_target = run_gate(package, held_out.answers, held_out.outputs, held_out.inputs, tolerance)
        gate.report["on_target"] = {**on_target.report, "provider": form.target}
        gate.failures += [f"on {form.target}: {failure}" for failure in on_target.failures]
        gate.passed = gate.passed and on_target.passed
    return gate


def _gate_package(package_dir: Path, provider: str) -> Package:
    """The package as the gate loads it: fp16 allowed on CPU, no warning that the CPU is not its target."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderMismatch)
        return load_package(package_dir, SessionOptions(provider=provider, allow_fp16_on_cpu=True))
