"""Loading a package directory: manifest, files, tokenizer and session, checked before use."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.runtime.cpu import check_int8_cpus
from kiln.runtime.cuda_graphs import CudaGraphs
from kiln.runtime.errors import PackageError, ProviderMismatch
from kiln.runtime.manifest import GRAPH_INPUTS, MODEL_NAME, Manifest, inside, read_manifest, verify_files
from kiln.runtime.providers import (
    LENGTH_BUCKET,
    CudaBinding,
    ShapeProfile,
    bucketed,
    cache_key,
    default_cache_dir,
    tensorrt_options,
)
from kiln.runtime.session import PROVIDERS, SessionOptions, create_session, resolve_provider
from kiln.runtime.tokenize import Batch, TextEncoder

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass
class Package:
    """A loaded package: everything a pipeline needs, nothing it has to find out again."""

    directory: Path
    manifest: Manifest
    encoder: TextEncoder
    session: ort.InferenceSession | None  # None: a front-end process's copy, which only tokenizes

    binding: CudaBinding | CudaGraphs | None = None

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        if self.binding is not None:
            values = self.binding.run(batch.feeds)
        else:
            values = self.session.run(self.manifest.outputs, batch.feeds)
        return dict(zip(self.manifest.outputs, values, strict=True))


def load_package(directory: str | Path, options: SessionOptions | None = None, verify_hashes: bool = True) -> Package:
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_task(directory, manifest.task)
    if manifest.generation:
        raise PackageError(
            f"{directory}: a {manifest.task} package runs through kiln.runtime.generation (load_generator, or "
            "kiln.runtime.pipeline), not as one session"
        )
    verify_files(directory, manifest, check_hashes=verify_hashes)
    for required in (MODEL_NAME, "tokenizer.json"):
        if not inside(directory, required).is_file():
            raise PackageError(f"{directory}: missing {required}")
    options = options or SessionOptions()
    provider = resolve_provider(options.provider)
    if manifest.precision == "fp16" and provider == PROVIDERS["cpu"] and not options.allow_fp16_on_cpu:
        raise PackageError(
            f"{directory}: an fp16 package runs on a GPU (provider cuda or tensorrt); on CPU it would be slow "
            "and is refused unless allow_fp16_on_cpu is set"
        )
    if provider == PROVIDERS["cpu"]:
        check_int8_cpus(directory, manifest.quantization)
    if provider != PROVIDERS[manifest.target]:
        warnings.warn(_mismatch(directory, manifest.target, provider), ProviderMismatch, stacklevel=2)
    extra = None
    if provider == PROVIDERS["tensorrt"]:
        profile = ShapeProfile(max_batch=options.max_batch, max_length=bucketed(manifest.max_sequence_length))
        cache_dir = options.cache_dir or default_cache_dir()
        extra = tensorrt_options(cache_dir, manifest, manifest.inputs, profile, cache_key(manifest))
    graphed = _graph_session(directory, options) if options.cuda_graphs and provider == PROVIDERS["cuda"] else None
    session = graphed or create_session(directory / MODEL_NAME, options, extra)
    declared = [i.name for i in session.get_inputs()]
    unknown = [name for name in declared if name not in GRAPH_INPUTS]
    if unknown:
        raise PackageError(f"{directory}: model takes inputs kiln cannot build: {', '.join(unknown)}")
    _check_outputs(directory, manifest, session)
    on_gpu = provider != PROVIDERS["cpu"]
    try:
        encoder = TextEncoder.from_directory(
            directory, declared, manifest.max_sequence_length, pad_multiple=LENGTH_BUCKET if on_gpu else 1
        )
    except Exception as exc:  # tokenizers raises its own untyped errors on a broken file
        raise PackageError(f"{directory}: tokenizer.json cannot be loaded ({exc})") from exc
    package = Package(directory, manifest, encoder, session)
    if provider == PROVIDERS["cuda"]:
        package.binding = (CudaGraphs if graphed else CudaBinding)(session, manifest.outputs)
    return package


def load_tokenizing_package(directory: str | Path) -> Package:
    """A package as a front-end process of `kiln serve --frontends N` needs it: manifest, tokenizer
    and pipeline settings, no session (the engine process, which checked the files, runs the graph)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_task(directory, manifest.task)
    try:
        encoder = TextEncoder.from_directory(directory, list(manifest.inputs), manifest.max_sequence_length)
    except Exception as exc:  # tokenizers raises its own untyped errors on a broken file
        raise PackageError(f"{directory}: tokenizer.json cannot be loaded ({exc})") from exc
    return Package(directory, manifest, encoder, None)


def _check_outputs(directory: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
    """The manifest's outputs are the graph's, and a labelled task has one label per logit."""
    from kiln.runtime.tasks import SPECS

    shapes = {o.name: o.shape for o in session.get_outputs()}
    missing = [name for name in manifest.outputs if name not in shapes]
    if missing:
        raise PackageError(
            f"{directory}: kiln.json names outputs {missing} that {MODEL_NAME} does not have "
            f"(it has {', '.join(shapes)})"
        )
    if SPECS[manifest.task].labels:
        width = shapes[manifest.outputs[0]][-1]
        if not manifest.labels or (isinstance(width, int) and width != len(manifest.labels)):
            raise PackageError(
                f"{directory}: kiln.json has {len(manifest.labels)} labels for a model with {width} outputs per item"
            )


def _check_task(directory: Path, task: str) -> None:
    from kiln.runtime.tasks import SPECS  # the registry imports the pipelines, which import this module

    if task not in SPECS:
        raise PackageError(f"{directory}: unknown task {task!r}; kiln serves {', '.join(SPECS)}")


def _mismatch(directory: Path, target: str, provider: str) -> str:
    running = next(name for name, full in PROVIDERS.items() if full == provider)
    return (
        f"{directory}: this package's graph was shaped for {target} (kiln export --device {target}) and now runs "
        f"on {running}; answers are the same, speed is not: export it with --device {running} for this provider"
    )


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from exc


def _graph_session(directory: Path, options: SessionOptions) -> ort.InferenceSession | None:
    """A CUDA session that captures CUDA graphs, or None (with a warning) where onnxruntime refuses
    it: every node must run on the CUDA EP for a graph to be captured."""
    try:
        return create_session(directory / MODEL_NAME, options, {"enable_cuda_graph": "1"})
    except PackageError as exc:
        warnings.warn(f"{directory}: CUDA graphs are off for this package ({exc})", stacklevel=3)
        return None
