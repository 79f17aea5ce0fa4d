"""KServe v2's side of each task, shared by gRPC and REST (as KServe's infer_type.py is): the output
tensors a task answers with and how its answers become them. The inputs are the task's own
(`TaskSpec.inputs`: what a task reads, by name, on every protocol). Every task has an entry (checked
at import, and by tests/test_tasks.py); the four generation tasks share one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.tasks import SPECS
from kiln.runtime.tasks.spec import Params, Tensor
from kiln.runtime.tasks.text_classification import Classified
from kiln.runtime.wire import bytes_tensor, json_tensor


@dataclass(frozen=True)
class KServeCodec:
    outputs: tuple[Tensor, ...]  # what metadata lists and the task answers with
    to_tensors: Callable[[Any, Params], dict[str, np.ndarray]]  # answers -> output tensors


def _text_classification(answers: Classified, params: Params) -> dict[str, np.ndarray]:
    """The best label and score per text, [N]; with top_k other than 1, the k best, [N, k] (-1: all)."""
    k = params["top_k"]
    ranked = [r[: k if k > 0 else None] for r in answers.ranked]
    label = bytes_tensor([x["label"] for r in ranked for x in r]).reshape(len(ranked), -1)
    score = np.array([[x["score"] for x in r] for r in ranked], dtype=np.float32)
    if k == 1:
        label, score = label[:, 0], score[:, 0]
    return {"label": label, "score": score, "logits": answers.logits.astype(np.float32)}


def _question_answering(answers: list[list[dict[str, Any]]], params: Params) -> dict[str, np.ndarray]:
    """The best answer per question, [N]; with top_k above 1, the k best, [N, k], a question with
    fewer possible answers padded with "" (score 0, start and end -1)."""
    k = params["top_k"]
    padding = {"answer": "", "score": 0.0, "start": -1, "end": -1}
    rows = [(a + [padding] * k)[:k] for a in answers]
    out = {
        "answer": bytes_tensor([x["answer"] for r in rows for x in r]).reshape(len(rows), k),
        "score": np.array([[x["score"] for x in r] for r in rows], dtype=np.float32),
        "start": np.array([[x["start"] for x in r] for r in rows], dtype=np.int64),
        "end": np.array([[x["end"] for x in r] for r in rows], dtype=np.int64),
    }
    return {name: value[:, 0] for name, value in out.items()} if k == 1 else out


def _generation(answers: list[Piece], params: Params) -> dict[str, Any]:
    return {"text_output": bytes_tensor([a.text for a in answers])}


def _json_per_text(name: str) -> KServeCodec:
    """One BYTES output holding a JSON document per text."""
    return KServeCodec((Tensor(name, "BYTES", (-1,)),), lambda answers, params: {name: json_tensor(answers)})


GENERATE = KServeCodec((Tensor("text_output", "BYTES", (-1,)),), _generation)
CODECS: dict[str, KServeCodec] = {
    "text-classification": KServeCodec(
        (Tensor("label", "BYTES", (-1,)), Tensor("score", "FP32", (-1,)), Tensor("logits", "FP32", (-1, "labels"))),
        _text_classification,
    ),
    "token-classification": _json_per_text("entities"),  # a list of entities per text
    "question-answering": KServeCodec(
        (
            Tensor("answer", "BYTES", (-1,)),
            Tensor("score", "FP32", (-1,)),
            Tensor("start", "INT64", (-1,)),
            Tensor("end", "INT64", (-1,)),
        ),
        _question_answering,
    ),
    "feature-extraction": KServeCodec(
        (Tensor("embedding", "FP32", (-1, "hidden")),),
        lambda vectors, params: {"embedding": vectors.astype(np.float32)},
    ),
    "fill-mask": _json_per_text("result"),  # the fills per text (a list per mask when several)
    "zero-shot-classification": _json_per_text("result"),  # {"sequence", "labels", "scores"} per text
    **{task: GENERATE for task, spec in SPECS.items() if spec.generative},
}
_missing = sorted(set(SPECS) - set(CODECS))
if _missing:  # a task added without its KServe codec fails at import, not at its first request
    raise ImportError(f"tasks without a KServe codec: {', '.join(_missing)}")
