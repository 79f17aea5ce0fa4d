"""Which task a model is exported for, decided from its config and checked against its head."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.export.task_exports import EXPORTS
from kiln.runtime.errors import UnsupportedModel
from kiln.runtime.manifest import Pooling
from kiln.runtime.tasks import SPECS

# encoder families kiln exports; the value says how many position slots are reserved (RoBERTa's
# padding offset), which bounds the usable sequence length
ARCHITECTURES = {
    "bert": 0,
    "roberta": 2,
    "xlm-roberta": 2,
    "camembert": 2,
    "distilbert": 0,
    "electra": 0,
    "albert": 0,
    "mpnet": 2,
    "deberta": 0,
    "deberta-v2": 0,
}


# generator families kiln exports (optimum-onnx's graphs with past): the layout, the default task
GENERATORS = {
    "gpt2": ("decoder-only", "text-generation"),
    "gpt_neo": ("decoder-only", "text-generation"),
    "llama": ("decoder-only", "text-generation"),
    "qwen2": ("decoder-only", "text-generation"),
    "bart": ("encoder-decoder", "text2text-generation"),
    "mbart": ("encoder-decoder", "text2text-generation"),
    "t5": ("encoder-decoder", "text2text-generation"),
    "mt5": ("encoder-decoder", "text2text-generation"),
    "marian": ("encoder-decoder", "translation"),
}


@dataclass
class DetectedTask:
    """The task and everything about the model the package needs to know up front."""

    task: str
    model_type: str
    labels: list[str]
    problem_type: str | None
    max_length: int
    pooling: Pooling | None


def head_task(architecture: str) -> str | None:
    """The task a model's head is for, from its class name (BertForTokenClassification, ...)."""
    for task, export in EXPORTS.items():
        if export.from_head and architecture.endswith(export.head) and architecture[: -len(export.head)]:
            return task
    return None


def detect_task(path: Path, config: dict[str, Any], requested: str | None) -> DetectedTask:
    model_type = config.get("model_type", "")
    if model_type in GENERATORS:
        return _generator_task(path, config, requested)
    if requested is not None and requested in SPECS and SPECS[requested].generative:
        raise UnsupportedModel(
            f"{requested} needs a generator ({', '.join(sorted(GENERATORS))}); "
            f"{model_type or 'this model'!r} is not one"
        )
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(
            f"architecture {model_type or '(none)'!r} is not supported; kiln exports {', '.join(sorted(ARCHITECTURES))}"
        )
    architectures = config.get("architectures") or []
    head = head_task(architectures[0]) if architectures else "feature-extraction"
    if requested is not None and requested not in SPECS:
        raise UnsupportedModel(f"task {requested!r} is not supported; choose one of {', '.join(SPECS)}")
    task = requested or head
    if task is None:
        raise UnsupportedModel(f"cannot tell the task from architecture {architectures[0]!r}; pass --task")
    export = EXPORTS[task]
    if export.check_config is not None:
        export.check_config(config)
    elif task != head and task != "feature-extraction":  # any encoder gives embeddings
        raise UnsupportedModel(
            f"task {task!r} does not match the model's head ({architectures[0]} is for {head}); "
            "its weights would be random"
        )
    return DetectedTask(
        task=task,
        model_type=model_type,
        labels=_labels(config) if SPECS[task].labels else [],  # the head's labels (config id2label)
        problem_type=config.get("problem_type"),
        max_length=max_length(path, config),
        pooling=read_pooling(path) if export.pooling else None,
    )


def _generator_task(path: Path, config: dict[str, Any], requested: str | None) -> DetectedTask:
    layout, default = GENERATORS[config["model_type"]]
    task = requested or default
    if task not in SPECS or not SPECS[task].generative:
        generative = [name for name, spec in SPECS.items() if spec.generative]
        raise UnsupportedModel(
            f"{config['model_type']} is a generator; its tasks are {', '.join(generative)}, not {task!r}"
        )
    if (layout == "decoder-only") != (task == "text-generation"):
        raise UnsupportedModel(f"a {layout} model cannot be exported for {task}")
    return DetectedTask(task, config["model_type"], [], None, max_length(path, config), None)


def _labels(config: dict[str, Any]) -> list[str]:
    id2label = config.get("id2label") or {}
    count = len(id2label) or config.get("num_labels", 2)
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]


def max_length(path: Path, config: dict[str, Any]) -> int:
    """The longest input the model takes: its position table less reserved slots, capped by the
    tokenizer's model_max_length when that is set to something real."""
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 512
    limit = positions - ARCHITECTURES.get(config.get("model_type", ""), 0)
    # sentence-transformers truncates at its own max_seq_length; match it so embeddings agree
    for name, key in (("tokenizer_config.json", "model_max_length"), ("sentence_bert_config.json", "max_seq_length")):
        if (path / name).is_file():
            declared = json.loads((path / name).read_text(encoding="utf-8")).get(key)
            if isinstance(declared, int) and 0 < declared < limit:
                limit = declared
    return int(limit)


def read_pooling(path: Path) -> Pooling:
    """Pooling and normalisation from a sentence-transformers layout, else plain mean pooling."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling = Pooling(normalize=any(m.get("type", "").endswith("Normalize") for m in modules))
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((path / module["path"] / "config.json").read_text(encoding="utf-8"))
            for mode, key in (
                ("cls", "pooling_mode_cls_token"),
                ("max", "pooling_mode_max_tokens"),
                ("mean", "pooling_mode_mean_tokens"),
            ):
                if config.get(key):
                    pooling.mode = mode
    return pooling


def torch_class(task: str) -> Any:
    """The transformers Auto class that loads a model's head for a task."""
    import transformers

    return getattr(transformers, EXPORTS[task].auto_class)
