"""question-answering: extractive answer spans over contexts of any length."""

from __future__ import annotations

from typing import Any

from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.question_answering import QuestionAnsweringPipeline
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: QuestionAnsweringPipeline, texts: Texts, params: Params) -> Prepared:
    prepared = pipe.prepare(
        texts["question"],
        texts["context"],
        top_k=params["top_k"],
        max_answer_len=params["max_answer_len"],
        handle_impossible_answer=params["handle_impossible_answer"],
        max_seq_len=params["max_seq_len"],
        doc_stride=params["doc_stride"],
    )
    # one list of answers per question, whatever top_k is
    return Prepared(prepared.encodings, lambda outputs: _lists(prepared.finish(outputs), params["top_k"]))


def _lists(answers: list[Any], top_k: int) -> list[list[dict[str, Any]]]:
    return [a if top_k > 1 else [a] for a in answers]


SPEC = TaskSpec(
    task="question-answering",
    pipeline=QuestionAnsweringPipeline,
    inputs=(Tensor("question", "BYTES", (-1,)), Tensor("context", "BYTES", (-1,))),
    parameters=(
        Param("top_k", int, 1, minimum=1, help="answers per question (KServe: every output [N, k])"),
        Param("max_answer_len", int, 15, minimum=1, help="longest answer, in tokens"),
        Param("handle_impossible_answer", bool, False, help="allow the empty answer"),
        Param("max_seq_len", int, None, minimum=8, help="window length (default: min(model's, 384))"),
        Param("doc_stride", int, None, minimum=0, help="overlap of windows over a long context"),
    ),
    prepare=prepare,
)
