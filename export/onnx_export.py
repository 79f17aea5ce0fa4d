"""PyTorch to ONNX through optimum-onnx's exporter (never a hand-written one)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from kiln.export.task_exports import EXPORTS
from kiln.runtime.errors import UnsupportedModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spm.model",
    "chat_template.jinja",  # where transformers >= 4.43 saves a tokenizer's chat template
)


def export_onnx(model_dir: Path, task: str, opset: int, out_dir: Path, trust_remote_code: bool) -> Path:
    """Export the model to out_dir/model.onnx with a fast tokenizer beside it."""
    from optimum.exporters.onnx import main_export

    for name in ("optimum", "transformers", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's tracer warns about constants it folds; not actionable
            main_export(
                str(model_dir),
                output=out_dir,
                task=EXPORTS[task].optimum_task or task,
                opset=opset,
                library_name="transformers",  # raw encoder; pooling is the runtime's job
                do_validation=False,  # kiln's parity gate is stricter and runs next
                trust_remote_code=trust_remote_code,
                device="cpu",
            )
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedModel(f"optimum-onnx cannot export this model for {task}: {exc}") from exc
    _ensure_fast_tokenizer(model_dir, out_dir)
    return out_dir / "model.onnx"


def _ensure_fast_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """The runtime reads tokenizer.json only; convert a slow tokenizer once, here."""
    if (out_dir / "tokenizer.json").is_file():
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    if not tokenizer.is_fast:
        raise UnsupportedModel(f"{model_dir}: no fast tokenizer could be built (tokenizer.json)")
    tokenizer.save_pretrained(out_dir)
