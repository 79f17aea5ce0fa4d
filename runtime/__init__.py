"""kiln's lean runtime: onnxruntime + tokenizers + numpy, never torch/transformers/optimum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.runtime.generation.package import Generator, load_generator
from kiln.runtime.manifest import read_manifest
from kiln.runtime.package import Package, load_package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.session import SessionOptions


def pipeline(
    package: str | Path | Package,
    provider: str = "cpu",
    threads: int = 0,
    batch_size: int = 8,
    allow_fp16_on_cpu: bool = False,
) -> Any:
    """Load a package written by `kiln export` and return the pipeline for its task (a
    GenerationPipeline for generators)."""
    from kiln.runtime.tasks import spec_for  # the task registry imports every pipeline

    options = SessionOptions(provider=provider, intra_op_threads=threads, allow_fp16_on_cpu=allow_fp16_on_cpu)
    if not isinstance(package, Package) and read_manifest(Path(package)).generation:
        generator = load_generator(package, options)
        return spec_for(generator.manifest.task).pipeline(generator, batch_size=batch_size)
    if not isinstance(package, Package):
        package = load_package(package, options)
    return spec_for(package.manifest.task).pipeline(package, batch_size=batch_size)


__all__ = ["Generator", "Package", "Pipeline", "SessionOptions", "load_package", "pipeline"]
