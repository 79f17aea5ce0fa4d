"""The export flow, stage by stage: resolve, export, optimise, quantise, validate, write.

Everything happens in a temporary directory beside the output; only a package that passed the
parity gate is renamed into place, so a failure never leaves anything half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.export import parity
from kiln.export.onnx_export import TOKENIZER_FILES, export_onnx
from kiln.export.optimize import optimize_graph
from kiln.export.qdq import quantize_qdq
from kiln.export.quantize import (
    Fidelity,
    QuantInfo,
    choose_float_layers,
    convert_fp16,
    head_matmuls,
    quantize_int8,
)
from kiln.export.resolve import ResolvedModel, resolve_model
from kiln.export.targets import GraphForm, graph_form
from kiln.export.tasks import DetectedTask, detect_task, torch_class
from kiln.export.texts import builtin_texts, read_texts
from kiln.runtime.errors import OutputError, ParityError, ProviderMismatch, ProviderUnavailable, UnsupportedModel
from kiln.runtime.manifest import MODEL_NAME, Manifest, sha256_file
from kiln.runtime.package import Package, load_package
from kiln.runtime.session import SessionOptions, create_session, provider_available
from kiln.runtime.tasks import TaskSpec, spec_for
from kiln.runtime.tokenize import TextEncoder

MAX_VALIDATION_ITEMS = 64
Progress = Callable[[str, str], None]


@dataclass
class ExportOptions:
    model: str
    output: Path
    revision: str | None = None
    task: str | None = None
    quantize: str = "none"
    device: str = "cpu"  # the execution target the graph is shaped for (kiln.export.targets)
    opset: int = 17
    max_length: int | None = None
    calibration: Path | None = None
    min_agreement: float = 0.99
    force: bool = False
    trust_remote_code: bool = False
    optimize: bool = True


@dataclass
class ExportResult:
    output: Path
    manifest: Manifest
    sizes: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


def export(options: ExportOptions, progress: Progress = lambda stage, message: None) -> ExportResult:
    form = graph_form(options.device, options.quantize)
    output = Path(options.output).expanduser().absolute()
    _check_output(output, options.force)
    texts = (read_texts(options.calibration) if options.calibration else builtin_texts())[:MAX_VALIDATION_ITEMS]
    work = _temporary_dir(output)
    try:
        return _export(options, form, output, texts, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export(
    options: ExportOptions, form: GraphForm, output: Path, texts: list[str], work: Path, progress: Progress
) -> ExportResult:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def stage_done(name: str, message: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        progress(name, f"{message} ({seconds[name]:.1f}s)")

    progress("resolve", f"resolving {options.model}")
    resolved = resolve_model(options.model, options.revision)
    config = resolved.config()
    spec = detect_task(resolved.path, config, options.task)
    if options.max_length:
        if options.max_length > spec.max_length:
            raise UnsupportedModel(f"--max-length {options.max_length} is over the model's limit of {spec.max_length}")
        spec.max_length = options.max_length
    torch_model = _load_torch(resolved, spec.task, options.trust_remote_code)
    stage_done("resolve", f"{spec.model_type} for {spec.task} from {resolved.path}")

    raw_dir = work / "onnx"
    fp32_path = export_onnx(resolved.path, spec.task, options.opset, raw_dir, options.trust_remote_code)
    stage_done("export", f"ONNX opset {options.opset}, {_mb(fp32_path)}")

    fused: dict[str, int] = {}
    if options.optimize and form.fusions:
        for_int8 = form.precision == "int8-dynamic"
        fused, fp32_path = _optimize(fp32_path, work / "optimized.onnx", config, for_int8, form.fusions)
        stage_done("optimize", f"fused for {form.fusions}: {fused or 'nothing'}")

    encoder = TextEncoder.from_directory(raw_dir, _input_names(fp32_path), spec.max_length)
    session = create_session(fp32_path, SessionOptions())
    outputs = [o.name for o in session.get_outputs()]
    draft = _draft_manifest(spec, encoder, outputs, _mask_token(raw_dir))
    task = spec_for(spec.task)
    # the validation items, encoded exactly as the task's pipeline encodes them
    inputs = parity.make_inputs(task.pipeline(Package(raw_dir, draft, encoder, session)), texts, draft.mask_token)
    reference = parity.run_torch(torch_model, encoder, inputs, outputs)
    expected = parity.hf_answers(task, _hf_pipeline(task, torch_model, raw_dir), inputs, reference, spec.pooling)
    precision = form.precision
    tolerance = parity.tolerance_for(precision, options.min_agreement)

    candidate = _Candidate(raw_dir, draft, encoder, inputs, reference, expected)
    model_path, info = _lower_precision(form, fp32_path, work, candidate, tolerance, texts)
    stage_done("quantize", info.scheme if info else "kept fp32")

    package_dir = work / "package"
    manifest = _assemble(package_dir, raw_dir, model_path, resolved, draft, form, options, info, fused)
    # the gate runs on CPU everywhere, and again on the target's provider where this machine has it
    timed_against = fp32_path if precision != "fp32" and form.target == "cpu" else None
    gate = parity.run_gate(_gate_package(package_dir, "cpu"), expected, reference, inputs, tolerance, timed_against)
    gate.report["provider"] = "cpu"
    if form.target != "cpu" and provider_available(form.target):
        try:
            on_target = parity.run_gate(
                _gate_package(package_dir, form.target), expected, reference, inputs, tolerance, None
            )
        except ProviderUnavailable as exc:  # in this onnxruntime build, but not startable on this machine
            gate.report["on_target"] = {"provider": form.target, "skipped": str(exc)}
        else:
            gate.report["on_target"] = {**on_target.report, "provider": form.target}
            gate.failures += [f"on {form.target}: {failure}" for failure in on_target.failures]
            gate.passed = gate.passed and on_target.passed
    manifest.parity = gate.report
    if not gate.passed:
        raise ParityError("parity gate failed:\n  - " + "\n  - ".join(gate.failures), gate.report)
    manifest.write(package_dir)
    where = "CPU" + (f" and {form.target}" if "passed" in gate.report.get("on_target", {}) else "")
    stage_done("validate", f"parity passed on {len(inputs.encodings)} items ({where})")

    sizes = {
        "fp32_onnx": fp32_path.stat().st_size,
        "package_model": (package_dir / MODEL_NAME).stat().st_size,
    }
    _move_into_place(package_dir, output)
    stage_done("write", f"package written to {output}")
    return ExportResult(output, manifest, sizes, seconds)


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise OutputError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} exists and is not a directory")


def _temporary_dir(output: Path) -> Path:
    """A scratch directory on the output's filesystem, so the final rename is atomic."""
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from exc


def _move_into_place(package_dir: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    package_dir.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_torch(resolved: ResolvedModel, task: str, trust_remote_code: bool) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        model = torch_class(task).from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{resolved.model_id}: transformers cannot load it for {task}: {exc}") from exc
    return model.eval().float()


def _optimize(
    path: Path, out: Path, config: dict[str, Any], for_int8: bool, target: str
) -> tuple[dict[str, int], Path]:
    try:
        return optimize_graph(path, out, config, for_int8, target), out
    except Exception as exc:  # the optimizer is best-effort; the unfused graph is still correct
        return {"skipped": f"{type(exc).__name__}: {exc}"}, path  # type: ignore[dict-item]


def _gate_package(package_dir: Path, provider: str) -> Package:
    """The package as the gate loads it: fp16 allowed on CPU, no warning that the CPU is not its target."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderMismatch)
        return load_package(package_dir, SessionOptions(provider=provider, allow_fp16_on_cpu=True))


def _input_names(path: Path) -> list[str]:
    return [i.name for i in create_session(path, SessionOptions()).get_inputs()]


def _draft_manifest(spec: DetectedTask, encoder: TextEncoder, outputs: list[str], mask: str | None) -> Manifest:
    """What a pipeline needs to know of the package before it exists (the validation items, the
    int8 candidates are run through the task's pipeline)."""
    return Manifest(
        task=spec.task,
        precision="fp32",
        inputs=encoder.input_names,
        outputs=outputs,
        max_sequence_length=spec.max_length,
        labels=spec.labels,
        problem_type=spec.problem_type,
        model_type=spec.model_type,
        pooling=spec.pooling,
        mask_token=mask,
    )


@dataclass
class _Candidate:
    """What scoring a candidate int8 graph needs: the validation items and the original's answers."""

    raw_dir: Path
    draft: Manifest
    encoder: TextEncoder
    inputs: parity.Inputs
    reference: parity.Items
    expected: list[Any]

    @property
    def task(self) -> str:
        return self.draft.task

    def evaluate(self, path: Path) -> Fidelity:
        """Raw agreement (or cosine) and end-to-end agreement; the lower one counts."""
        session = create_session(path, SessionOptions())
        outputs = self.draft.outputs
        got = parity.run_onnx(session, self.encoder, self.inputs, outputs, alone=True)  # served per text
        raw = parity.compare(self.task, self.reference, got).fidelity()
        manifest = replace(self.draft, precision="int8-dynamic", max_batch_size=1)
        task = spec_for(self.task)
        answers = parity.kiln_answers(
            task, task.pipeline(Package(self.raw_dir, manifest, self.encoder, session)), self.inputs
        )
        e2e = task.gate.agreement(self.expected, answers)
        return Fidelity(score=min(raw.score, e2e.get("agreement", e2e.get("min_cosine", 1.0))), error=raw.error)


def _lower_precision(
    form: GraphForm,
    fp32_path: Path,
    work: Path,
    candidate: _Candidate,
    tolerance: parity.Tolerance,
    texts: list[str],
) -> tuple[Path, QuantInfo | None]:
    out = work / "lowered.onnx"
    if form.precision == "fp32":
        return fp32_path, None
    if form.precision == "fp16":
        return out, convert_fp16(fp32_path, out, fused=form.fusions is not None)
    target = tolerance.min_cosine if candidate.task == "feature-extraction" else tolerance.min_agreement
    if form.precision == "int8-static":
        return out, quantize_qdq(fp32_path, out, _one_text_feeds(candidate.encoder, texts), candidate.evaluate, target)
    heads = head_matmuls(fp32_path)  # the task head decides the answer directly and costs little: float
    feeds = _one_text_feeds(candidate.encoder, texts)
    # fastest first; each step trades speed for accuracy until the target is met
    info = quantize_int8(fp32_path, out, heads, feeds)
    reached = candidate.evaluate(out).score
    tried = {"hybrid": reached}
    if reached < target:
        info = quantize_int8(fp32_path, out, heads, feeds, rowwise_everywhere=True)
        reached = tried["rowwise"] = candidate.evaluate(out).score
    if reached < target:
        kept, trials = choose_float_layers(fp32_path, work, candidate.evaluate, target, heads, feeds)
        info = quantize_int8(fp32_path, out, kept, feeds, rowwise_everywhere=True)
        info.details["sensitivity"] = trials
    info.details["scores_tried"] = tried
    if info.quantized == 0:
        raise ParityError(
            f"int8 cannot reach {target:g} on this model (best with every encoder layer in int8: "
            f"{max(tried.values()):.4f}), not even with all but one layer back in float; export fp32 "
            "(--quantize none) or lower --min-agreement",
            {"quantization": info.details},
        )
    return out, info


def _one_text_feeds(encoder: TextEncoder, texts: list[str]) -> list[dict[str, Any]]:
    """Each calibration text as its own unpadded batch, the way int8 packages run."""
    return [encoder.pad([e]).feeds for e in encoder.encode(texts[:MAX_VALIDATION_ITEMS])]


def _mask_token(directory: Path) -> str | None:
    import json

    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            token = json.loads(path.read_text(encoding="utf-8")).get("mask_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return str(token)
    return None


def _assemble(
    package_dir: Path,
    raw_dir: Path,
    model_path: Path,
    resolved: ResolvedModel,
    draft: Manifest,
    form: GraphForm,
    options: ExportOptions,
    info: QuantInfo | None,
    fused: dict[str, int],
) -> Manifest:
    """The package directory: the lowered graph, the tokenizer files, and the manifest (the draft
    the gate's pipelines used, completed)."""
    package_dir.mkdir()
    shutil.copyfile(model_path, package_dir / MODEL_NAME)
    for name in TOKENIZER_FILES:
        if (raw_dir / name).is_file():
            shutil.copyfile(raw_dir / name, package_dir / name)
    manifest = replace(
        draft,
        precision=form.precision,
        target=form.target,
        inputs=_input_names(package_dir / MODEL_NAME),
        opset=options.opset,
        max_batch_size=1 if form.precision == "int8-dynamic" else 0,
        quantization={"optimized": fused, **(_quant_dict(info) if info else {"scheme": "none"})},
        source=_source(resolved),
        files={p.name: sha256_file(p) for p in sorted(package_dir.iterdir()) if p.is_file()},
        tools=_tool_versions(),
    )
    manifest.write(package_dir)
    return manifest


def _quant_dict(info: QuantInfo) -> dict[str, Any]:
    return {
        "scheme": info.scheme,
        "quantized_nodes": info.quantized,
        "kept_float": info.kept_float,
        **info.details,
    }


def _source(resolved: ResolvedModel) -> dict[str, Any]:
    hashed = {
        p.name: sha256_file(p)
        for p in sorted(resolved.path.iterdir())
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")
    }
    return {
        "model_id": resolved.model_id,
        "revision": resolved.revision,
        "commit": resolved.commit,
        "files": hashed,
    }


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in (
        "kiln-serve",
        "onnxruntime",
        "onnx",
        "optimum-onnx",
        "optimum",
        "transformers",
        "torch",
        "tokenizers",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def _hf_pipeline(task: TaskSpec, model: Any, tokenizer_dir: Path) -> Any:
    if task.gate.hf_task is None:
        return None
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return pipeline(task.gate.hf_task, model=model, tokenizer=tokenizer, device="cpu")


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"
