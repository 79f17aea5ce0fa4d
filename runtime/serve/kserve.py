"""KServe v2 / Triton GRPCInferenceService: a thin adapter from protobuf to the data plane.

Text goes in as BYTES tensors and task answers come out (DESIGN.md, wire contract); clients that
tokenize themselves send INT64 `input_ids` (+ `attention_mask`, `token_type_ids`) and get the
graph's raw outputs. Errors become gRPC status codes here, through kiln.runtime.serve.status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.json_format import ParseDict
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from kiln.runtime.errors import KilnError
from kiln.runtime.serve.dataplane import Call, DataPlane, InferRequest
from kiln.runtime.serve.interceptors import Undecodable
from kiln.runtime.serve.status import status_of
from kiln.runtime.serve.tensors import decode_inputs, encode_outputs, parameters


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request, context):
        meta = await _call(context, self.plane.model_metadata, request.name, request.version)
        return ParseDict(meta, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        config = await _call(context, self.plane.model_config, request.name, request.version)
        return pb.ModelConfigResponse(config=ParseDict(config, pb.ModelConfig()))

    async def ModelStatistics(self, request, context):
        stats = await _call(context, self.plane.statistics, request.name, request.version)
        return ParseDict(stats, pb.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context)
        except KilnError as exc:
            await context.abort(*status_of(exc))

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        infer = InferRequest(
            model=request.model_name,
            version=request.model_version,
            inputs=decode_inputs(request),
            parameters=parameters(request.parameters),
            outputs=[o.name for o in request.outputs],
            id=request.id,
        )
        result = await self.plane.infer(infer, Call("kserve", context.time_remaining()))
        response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
        encode_outputs(response, result.outputs)
        return response

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each message answered on the stream in turn; a failing one gets an error message and the
        stream goes on."""
        async for request in request_iterator:
            if isinstance(request, Undecodable):
                yield pb.ModelStreamInferResponse(error_message=request.reason)
                continue
            try:
                response = await self._infer(request, context)
                yield pb.ModelStreamInferResponse(infer_response=response)
            except KilnError as exc:
                _, message = status_of(exc)
                yield pb.ModelStreamInferResponse(
                    error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
                )

    async def RepositoryIndex(self, request, context):
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self.plane.repository.index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(self, request, context):
        await _call_async(context, self.plane.repository.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await _call_async(context, self.plane.repository.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def _call(context: Any, function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except KilnError as exc:
        await context.abort(*status_of(exc))


async def _call_async(context: Any, function: Any, *args: Any) -> Any:
    try:
        return await function(*args)
    except KilnError as exc:
        await context.abort(*status_of(exc))
