"""question-answering: extractive answer spans over contexts of any length."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.question_answering import QuestionAnsweringPipeline
from kiln.runtime.tasks.spec import Gate, Param, Params, TaskSpec, Tensor, Texts

# the gate asks these of every validation sentence (English and Korean, as the corpus is)
QUESTIONS = ("What happened?", "Who is it about?", "무엇에 관한 내용인가요?", "Where?")


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


def _items(texts: list[str], mask: str | None) -> Texts:
    return {"question": [QUESTIONS[i % len(QUESTIONS)] for i in range(len(texts))], "context": texts}


def _theirs(hf: Any, items: Texts, reference: Any, pooling: Any) -> list[Any]:
    return [hf(question=q, context=c) for q, c in zip(items["question"], items["context"], strict=True)]


def _agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    same = [(a["start"], a["end"]) == (b["start"], b["end"]) for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(same), "agreement": float(np.mean(same))}


SPEC = TaskSpec(
    task="question-answering",
    pipeline=QuestionAnsweringPipeline,
    head="ForQuestionAnswering",
    auto_class="AutoModelForQuestionAnswering",
    inputs=(Tensor("question", "BYTES", (-1,)), Tensor("context", "BYTES", (-1,))),
    parameters=(
        Param("top_k", int, 1, minimum=1, help="answers per question (KServe: every output [N, k])"),
        Param("max_answer_len", int, 15, minimum=1, help="longest answer, in tokens"),
        Param("handle_impossible_answer", bool, False, help="allow the empty answer"),
        Param("max_seq_len", int, None, minimum=8, help="window length (default: min(model's, 384))"),
        Param("doc_stride", int, None, minimum=0, help="overlap of windows over a long context"),
    ),
    prepare=prepare,
    gate=Gate(
        hf_task="question-answering",
        items=_items,
        theirs=_theirs,
        ours=lambda answers: [a[0] for a in answers],
        agreement=_agreement,
    ),
)
