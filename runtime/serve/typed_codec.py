"""kiln.v1, the typed API: each task's request and response messages, read and written here, so
task modules carry no protobuf. A task's entry names its RPC and how its request becomes the task's
texts and raw parameters, and how its answers become the response. Every task has one (checked at
import, and by tests/test_tasks.py); the four generation tasks share `Generate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.proto import kiln_pb2 as pb
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.generation.settings import REQUEST_FIELDS
from kiln.runtime.tasks import SPECS
from kiln.runtime.tasks.spec import Params, Texts
from kiln.runtime.tasks.text_classification import Classified


@dataclass(frozen=True)
class TypedCodec:
    rpc: str  # the kiln.v1 RPC
    read: Callable[[Any], tuple[Texts, Params]]  # request -> the task's texts and raw parameters
    write: Callable[[Any, Params], Any]  # answers -> response


def _text_classification_read(request: pb.ClassifyRequest) -> tuple[Texts, Params]:
    texts = {"text": list(request.texts)}
    if request.text_pairs:
        texts["text_pair"] = list(request.text_pairs)
    params = {
        "top_k": request.top_k or None,  # 0: unset (1); -1: all
        "function_to_apply": request.function_to_apply or None,
        "truncation": not request.no_truncation,
    }
    return texts, params


def _text_classification_write(answers: Classified, params: Params) -> pb.ClassifyResponse:
    top_k = params["top_k"] if params["top_k"] > 0 else None
    return pb.ClassifyResponse(
        results=[
            pb.Classification(
                labels=[pb.Label(label=r["label"], score=r["score"]) for r in ranked[:top_k]],
                truncated=any(r.get("truncated", False) for r in ranked),
            )
            for ranked in answers.ranked
        ]
    )


def _token_classification_read(request: pb.TagTokensRequest) -> tuple[Texts, Params]:
    return {"text": list(request.texts)}, {"aggregation_strategy": request.aggregation_strategy or None}


def _token_classification_write(answers: list[list[dict[str, Any]]], params: Params) -> pb.TagTokensResponse:
    return pb.TagTokensResponse(
        results=[
            pb.Entities(
                entities=[
                    pb.Entity(
                        entity=e.get("entity", e.get("entity_group")),
                        score=e["score"],
                        word=e["word"],
                        start=e["start"],
                        end=e["end"],
                        index=e.get("index", 0),
                    )
                    for e in entities
                ]
            )
            for entities in answers
        ]
    )


def _question_answering_read(request: pb.AnswerRequest) -> tuple[Texts, Params]:
    texts = {"question": list(request.questions), "context": list(request.contexts)}
    params = {
        "top_k": request.top_k or None,
        "max_answer_len": request.max_answer_len or None,
        "handle_impossible_answer": request.handle_impossible_answer,
        "doc_stride": request.doc_stride or None,
    }
    return texts, params


def _question_answering_write(answers: list[list[dict[str, Any]]], params: Params) -> pb.AnswerResponse:
    return pb.AnswerResponse(
        results=[
            pb.Answers(
                answers=[pb.Span(answer=a["answer"], score=a["score"], start=a["start"], end=a["end"]) for a in r]
            )
            for r in answers
        ]
    )


def _feature_extraction_read(request: pb.EmbedRequest) -> tuple[Texts, Params]:
    normalize_ = request.normalize if request.HasField("normalize") else None
    return {"text": list(request.texts)}, {"pooling": request.pooling or None, "normalize": normalize_}


def _feature_extraction_write(vectors: np.ndarray, params: Params) -> pb.EmbedResponse:
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=v.tolist()) for v in vectors], dimension=vectors.shape[1])


def _fill_mask_read(request: pb.FillMaskRequest) -> tuple[Texts, Params]:
    return {"text": list(request.texts)}, {"top_k": request.top_k or None, "targets": list(request.targets) or None}


def _fill_mask_write(answers: list[Any], params: Params) -> pb.FillMaskResponse:
    response = pb.FillMaskResponse()
    for result in answers:
        masks = result if result and isinstance(result[0], list) else [result]
        response.results.append(
            pb.FillMaskResult(
                masks=[
                    pb.MaskFills(
                        fills=[
                            pb.Fill(
                                token_str=f["token_str"], token=f["token"], score=f["score"], sequence=f["sequence"]
                            )
                            for f in fills
                        ]
                    )
                    for fills in masks
                ]
            )
        )
    return response


def _zero_shot_read(request: pb.ZeroShotRequest) -> tuple[Texts, Params]:
    texts = {"text": list(request.texts), "candidate_labels": list(request.candidate_labels)}
    return texts, {"hypothesis_template": request.hypothesis_template or None, "multi_label": request.multi_label}


def _zero_shot_write(answers: list[dict[str, Any]], params: Params) -> pb.ZeroShotResponse:
    return pb.ZeroShotResponse(
        results=[
            pb.Classification(
                labels=[
                    pb.Label(label=label, score=score) for label, score in zip(r["labels"], r["scores"], strict=True)
                ]
            )
            for r in answers
        ]
    )


def _generation_read(request: pb.GenerateRequest) -> tuple[Texts, Params]:
    params: Params = {}
    for name in REQUEST_FIELDS:
        if name == "stop":
            params["stop"] = list(request.stop) or None
        elif request.HasField(name):
            params[name] = getattr(request, name)
    params["truncate"] = request.truncate
    if request.HasField("return_full_text"):
        params["return_full_text"] = request.return_full_text
    return {"text_input": list(request.prompts)}, params


def _generation_write(answers: list[Piece], params: Params) -> pb.GenerateResponse:
    return pb.GenerateResponse(results=[_generation(a) for a in answers])


def _generation(answer: Piece) -> pb.Generation:
    return pb.Generation(
        text=answer.text,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        generated_tokens=answer.tokens,
        truncated=answer.truncated,
    )


GENERATE = TypedCodec("Generate", _generation_read, _generation_write)
CODECS: dict[str, TypedCodec] = {
    "text-classification": TypedCodec("Classify", _text_classification_read, _text_classification_write),
    "token-classification": TypedCodec("TagTokens", _token_classification_read, _token_classification_write),
    "question-answering": TypedCodec("Answer", _question_answering_read, _question_answering_write),
    "feature-extraction": TypedCodec("Embed", _feature_extraction_read, _feature_extraction_write),
    "fill-mask": TypedCodec("FillMask", _fill_mask_read, _fill_mask_write),
    "zero-shot-classification": TypedCodec("ZeroShot", _zero_shot_read, _zero_shot_write),
    **{task: GENERATE for task, spec in SPECS.items() if spec.generative},
}
_missing = sorted(set(SPECS) - set(CODECS))
if _missing:  # a task added without its kiln.v1 codec fails at import, not at its first request
    raise ImportError(f"tasks without a kiln.v1 codec: {', '.join(_missing)}")
