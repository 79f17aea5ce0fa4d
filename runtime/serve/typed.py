"""kiln.v1: one typed RPC per task over the same models, batcher and error mapping."""

from __future__ import annotations

from typing import Any

from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc
from kiln.runtime.errors import InvalidInput
from kiln.runtime.serve.handler import ServerState, run_model
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.status import status_of

RPC_TASKS = {
    "Classify": "text-classification",
    "TagTokens": "token-classification",
    "Answer": "question-answering",
    "Embed": "feature-extraction",
    "FillMask": "fill-mask",
    "ZeroShot": "zero-shot-classification",
}


def model_info(model: ServedModel) -> pb.ModelInfo:
    m = model.manifest
    return pb.ModelInfo(
        name=model.name,
        task=m.task,
        precision=m.precision,
        labels=m.labels,
        max_sequence_length=m.max_sequence_length,
        provider=model.provider,
        source=str(m.source.get("model_id", "")),
        ready=True,
    )


def _check_task(model: ServedModel, rpc: str) -> None:
    if model.manifest.task != RPC_TASKS[rpc]:
        raise InvalidInput(
            f"model {model.name!r} is a {model.manifest.task} model; {rpc} needs a {RPC_TASKS[rpc]} model"
        )


def _classification(ranked: list[dict[str, Any]]) -> pb.Classification:
    return pb.Classification(
        labels=[pb.Label(label=r["label"], score=r["score"]) for r in ranked],
        truncated=any(r.get("truncated", False) for r in ranked),
    )


class KilnService(pb_grpc.KilnServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def _run(self, context, rpc: str, name: str, count: int, work) -> Any:
        def checked(model: ServedModel) -> Any:
            _check_task(model, rpc)
            return work(model)

        return await run_model(self.state, context, name, "", rpc, checked, count)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_info(m) for m in self.state.models.values()])

    async def GetModel(self, request, context):
        try:
            return model_info(self.state.model(request.model))
        except Exception as exc:
            await context.abort(*status_of(exc))

    async def Classify(self, request, context):
        top_k = None if request.top_k < 0 else (request.top_k or 1)

        def work(model: ServedModel) -> list[Any]:
            ranked = model.pipeline(
                list(request.texts),
                text_pair=list(request.text_pairs) or None,
                top_k=None,
                function_to_apply=request.function_to_apply or None,
                truncation=not request.no_truncation,
            )
            return [r if top_k is None else r[:top_k] for r in ranked]

        ranked = await self._run(context, "Classify", request.model, len(request.texts), work)
        return pb.ClassifyResponse(results=[_classification(r) for r in ranked])

    async def TagTokens(self, request, context):
        strategy = request.aggregation_strategy or "none"
        results = await self._run(
            context,
            "TagTokens",
            request.model,
            len(request.texts),
            lambda m: m.pipeline(list(request.texts), aggregation_strategy=strategy),
        )
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
                for entities in results
            ]
        )

    async def Answer(self, request, context):
        top_k = request.top_k or 1

        def work(model: ServedModel) -> list[Any]:
            answers = model.pipeline(
                list(request.questions),
                list(request.contexts),
                top_k=top_k,
                max_answer_len=request.max_answer_len or 15,
                handle_impossible_answer=request.handle_impossible_answer,
                doc_stride=request.doc_stride or None,
            )
            return [a if top_k > 1 else [a] for a in answers]

        results = await self._run(context, "Answer", request.model, len(request.questions), work)
        return pb.AnswerResponse(
            results=[
                pb.Answers(
                    answers=[
                        pb.Span(answer=a["answer"], score=a["score"], start=a["start"], end=a["end"]) for a in answers
                    ]
                )
                for answers in results
            ]
        )

    async def Embed(self, request, context):
        normalize = request.normalize if request.HasField("normalize") else None
        vectors = await self._run(
            context,
            "Embed",
            request.model,
            len(request.texts),
            lambda m: m.pipeline(list(request.texts), pooling=request.pooling or None, normalize_embeddings=normalize),
        )
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v.tolist()) for v in vectors], dimension=int(vectors.shape[1])
        )

    async def FillMask(self, request, context):
        results = await self._run(
            context,
            "FillMask",
            request.model,
            len(request.texts),
            lambda m: m.pipeline(list(request.texts), top_k=request.top_k or 5, targets=list(request.targets) or None),
        )
        response = pb.FillMaskResponse()
        for result in results:
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

    async def ZeroShot(self, request, context):
        results = await self._run(
            context,
            "ZeroShot",
            request.model,
            len(request.texts),
            lambda m: m.pipeline(
                list(request.texts),
                list(request.candidate_labels),
                hypothesis_template=request.hypothesis_template or "This example is {}.",
                multi_label=request.multi_label,
            ),
        )
        return pb.ZeroShotResponse(
            results=[
                pb.Classification(
                    labels=[
                        pb.Label(label=label, score=score)
                        for label, score in zip(r["labels"], r["scores"], strict=True)
                    ]
                )
                for r in results
            ]
        )
