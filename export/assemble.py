"""The package on disk: the lowered graph, the tokenizer files, and its manifest (kiln.json)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from kiln.export.onnx_export import TOKENIZER_FILES
from kiln.export.quantize import QuantInfo
from kiln.export.targets import GraphForm
from kiln.export.tasks import DetectedTask
from kiln.runtime.manifest import MODEL_NAME, Manifest, sha256_file
from kiln.runtime.session import SessionOptions, create_session


def input_names(path: Path) -> list[str]:
    return [i.name for i in create_session(path, SessionOptions()).get_inputs()]


def mask_token(directory: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            token = json.loads(path.read_text(encoding="utf-8")).get("mask_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return str(token)
    return None


def draft_manifest(task: DetectedTask, inputs: list[str], outputs: list[str], mask: str | None) -> Manifest:
    """What a pipeline needs to know of the package before it exists (the validation items and the
    int8 candidates are run through the task's pipeline)."""
    return Manifest(
        task=task.task,
        precision="fp32",
        inputs=inputs,
        outputs=outputs,
        max_sequence_length=task.max_length,
        labels=task.labels,
        problem_type=task.problem_type,
        model_type=task.model_type,
        pooling=task.pooling,
        mask_token=mask,
    )


def assemble(
    package_dir: Path,
    raw_dir: Path,
    model_path: Path,
    draft: Manifest,
    form: GraphForm,
    extra: dict[str, Any],
    info: QuantInfo | None,
    fused: dict[str, int],
) -> Manifest:
    """Write the package directory; the manifest is the draft completed (`extra`: opset, source,
    tools, the text split)."""
    package_dir.mkdir()
    shutil.copyfile(model_path, package_dir / MODEL_NAME)
    for name in TOKENIZER_FILES:
        if (raw_dir / name).is_file():
            shutil.copyfile(raw_dir / name, package_dir / name)
    manifest = replace(
        draft,
        precision=form.precision,
        target=form.target,
        inputs=input_names(package_dir / MODEL_NAME),
        max_batch_size=0 if info is None or info.details.get("batch_invariant", True) else 1,
        quantization={"optimized": fused, **(_quantization(info) if info else {"scheme": "none"})},
        files={p.name: sha256_file(p) for p in sorted(package_dir.iterdir()) if p.is_file()},
        **extra,
    )
    manifest.write(package_dir)
    return manifest


def _quantization(info: QuantInfo) -> dict[str, Any]:
    return {"scheme": info.scheme, "quantized_nodes": info.quantized, "kept_float": info.kept_float, **info.details}
