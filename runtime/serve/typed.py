"""kiln.v1: one typed RPC per task, a thin adapter over the data plane through each task's codec
(kiln.runtime.serve.typed_codec)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc
from kiln.runtime.errors import InvalidInput, KilnError
from kiln.runtime.serve.calls import grpc_call
from kiln.runtime.serve.dataplane import DataPlane
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.status import status_of
from kiln.runtime.serve.typed_codec import CODECS, GENERATE, TypedCodec
from kiln.runtime.tasks.generation import GenerateRequest


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


class KilnService(pb_grpc.KilnServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_info(m) for m in self.plane.repository.models.values()])

    async def GetModel(self, request, context):
        try:
            return model_info(self.plane.model(request.model))
        except KilnError as exc:
            await context.abort(*status_of(exc))

    async def _task(self, codec: TypedCodec, request: Any, context: Any) -> Any:
        call = grpc_call(context, codec.rpc, request.model)
        try:
            async with self.plane.counted(call):
                model = self.plane.model_for(request.model, "", call)
                if CODECS[model.manifest.task] is not codec:
                    tasks = " or ".join(task for task, c in CODECS.items() if c is codec)
                    task = model.manifest.task
                    raise InvalidInput(f"model {model.name!r} is a {task} model; {codec.rpc} needs a {tasks} model")
                texts, params = codec.read(request)
                answered = await self.plane.answer(model, texts, params, call)
                return codec.write(answered.answers, answered.params)
        except KilnError as exc:
            await context.abort(*status_of(exc))

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateChunk]:
        """A message per piece of text; the last carries finish_reason and the token counts."""
        call = grpc_call(context, "GenerateStream", request.model)
        try:
            async with self.plane.counted(call):
                texts, params = GENERATE.read(request)
                generate = GenerateRequest(texts["text_input"], params)
                model = self.plane.model_for(request.model, "", call)
                async for chunk in self.plane.generate_stream(model, generate, call):
                    yield pb.GenerateChunk(
                        text=chunk.text,
                        tokens=chunk.tokens,
                        finish_reason=chunk.finish_reason or "",
                        prompt_tokens=chunk.prompt_tokens,
                        generated_tokens=chunk.generated_tokens,
                        truncated=chunk.truncated,
                    )
        except KilnError as exc:
            await context.abort(*status_of(exc))


def _rpc(codec: TypedCodec) -> Any:
    async def handler(self: KilnService, request: Any, context: Any) -> Any:
        return await self._task(codec, request, context)

    handler.__name__ = codec.rpc
    return handler


for _codec in {codec.rpc: codec for codec in CODECS.values()}.values():  # one RPC per codec (Generate: 4 tasks)
    setattr(KilnService, _codec.rpc, _rpc(_codec))
