"""kiln's lean runtime: onnxruntime + tokenizers + numpy, never torch/transformers/optimum."""

from __future__ import annotations

from pathlib import Path

from kiln.runtime.package import Package, load_package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.session import SessionOptions


def pipeline(
    package: str | Path | Package,
    provider: str = "cpu",
    threads: int = 0,
    batch_size: int = 8,
    allow_fp16_on_cpu: bool = False,
) -> Pipeline:
    """Load a package written by `kiln export` and return the pipeline for its task."""
    if not isinstance(package, Package):
        options = SessionOptions(provider=provider, intra_op_threads=threads, allow_fp16_on_cpu=allow_fp16_on_cpu)
        package = load_package(package, options)
    from kiln.runtime.tasks import spec_for  # the task registry imports every pipeline

    return spec_for(package.manifest.task).pipeline(package, batch_size=batch_size)


__all__ = ["Package", "Pipeline", "SessionOptions", "load_package", "pipeline"]
