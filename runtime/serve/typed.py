"""kiln.v1: one typed RPC per task, a thin adapter over the data plane through each task's spec."""

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
from kiln.runtime.tasks import SPECS, TaskSpec, generation
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

    async def _task(self, spec: TaskSpec, request: Any, context: Any) -> Any:
        call = grpc_call(context, spec.rpc, request.model)
        try:
            async with self.plane.counted(call):
                model = self.plane.admit(request.model, "", call)
                if model.spec.rpc != spec.rpc:
                    raise InvalidInput(
                        f"model {model.name!r} is a {model.manifest.task} model; {spec.rpc} needs a {spec.task} model"
                    )
                texts, params = spec.from_typed(request)
                answered = await self.plane.answer(request.model, "", texts, params, call)
                return spec.to_typed(answered.answers, answered.params)
        except KilnError as exc:
            await context.abort(*status_of(exc))

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateChunk]:
        """A message per piece of text; the last carries finish_reason and the token counts."""
        call = grpc_call(context, "GenerateStream", request.model)
        try:
            async with self.plane.counted(call):
                texts, params = generation.from_typed(request)
                generate = GenerateRequest(texts["text_input"], params)
                async for chunk in self.plane.generate_stream(request.model, "", generate, call):
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


def _rpc(spec: TaskSpec) -> Any:
    async def handler(self: KilnService, request: Any, context: Any) -> Any:
        return await self._task(spec, request, context)

    handler.__name__ = spec.rpc
    return handler


for _spec in SPECS.values():  # one RPC per task, each read from the task's spec
    setattr(KilnService, _spec.rpc, _rpc(_spec))
