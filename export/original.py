"""The original model, the side every package is compared with: PyTorch (its raw outputs) and the
`transformers` pipeline (its answers), and the record of where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.export.figures import Items
from kiln.export.gate import their_answers
from kiln.export.items import Inputs, make_inputs, run_torch
from kiln.export.resolve import ResolvedModel
from kiln.export.task_exports import EXPORTS
from kiln.export.tasks import DetectedTask, torch_class
from kiln.runtime.errors import UnsupportedModel
from kiln.runtime.manifest import sha256_file
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.tasks import spec_for


@dataclass
class Original:
    resolved: ResolvedModel
    task: DetectedTask
    model: Any  # the transformers model, in eval mode
    tokenizer_dir: Path  # where the exported tokenizer files are (the transformers pipeline reads them)


@dataclass
class Reference:
    """What the original gives on a set of items: its raw outputs and its task answers."""

    inputs: Inputs
    outputs: Items
    answers: list[Any]


def load_torch(resolved: ResolvedModel, task: str, trust_remote_code: bool) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        model = torch_class(task).from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{resolved.model_id}: transformers cannot load it for {task}: {exc}") from exc
    return model.eval().float()


def reference(original: Original, pipe: Pipeline, texts: list[str], outputs: list[str]) -> Reference:
    """The items made from `texts` as `pipe` encodes them, through PyTorch and transformers."""
    inputs = make_inputs(pipe, texts, pipe.manifest.mask_token)
    raw = run_torch(original.model, pipe.encoder, inputs, outputs)
    spec = spec_for(original.task.task)
    answers = their_answers(
        spec, _hf_pipeline(EXPORTS[spec.task].gate.hf_task, original), inputs, raw, original.task.pooling
    )
    return Reference(inputs, raw, answers)


def _hf_pipeline(hf_task: str | None, original: Original) -> Any:
    if hf_task is None:
        return None
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(original.tokenizer_dir)
    return pipeline(hf_task, model=original.model, tokenizer=tokenizer, device="cpu")


def source_record(resolved: ResolvedModel) -> dict[str, Any]:
    hashed = {
        p.name: sha256_file(p)
        for p in sorted(resolved.path.iterdir())
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")
    }
    return {"model_id": resolved.model_id, "revision": resolved.revision, "commit": resolved.commit, "files": hashed}


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in (
        "kiln-serve",
        "onnxruntime",
        "onnxruntime-gpu",
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
