"""KServe v2 / Triton GRPCInferenceService: a thin adapter from protobuf to the data plane.

Text goes in as BYTES tensors and task answers come out (docs/serving.md, the wire contract); clients that
tokenize themselves send INT64 `input_ids` (+ `attention_mask`, `token_type_ids`) and get the
graph's raw outputs. Errors become gRPC status codes here, through kiln.runtime.serve.status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.json_format import ParseDict
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from kiln.runtime.errors import KilnError
from kiln.runtime.serve.calls import grpc_call
from kiln.runtime.serve.dataplane import Call, DataPlane, InferRequest, InferResponse
from kiln.runtime.serve.interceptors import Undecodable
from kiln.runtime.serve.status import status_of
from kiln.runtime.serve.tensors import parameters, read_inputs, write_outputs
from kiln.runtime.tasks.generation import read_request
from kiln.runtime.wire import bytes_tensor


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
        stats = await _call_async(context, self.plane.statistics, request.name, request.version)
        return ParseDict(stats, pb.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        call = grpc_call(context, "kserve", request.model_name, request.id)
        try:
            async with self.plane.counted(call):
                return await self._infer(request, call)
        except KilnError as exc:
            await context.abort(*status_of(exc))

    async def _infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        infer = _infer_request(request)
        return _response(await self.plane.infer(self.plane.model_for(infer.model, infer.version, call), infer, call))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming: a generator's requests (decoupled) are answered side by side, each with
        one response per piece of text when asked to `stream`, in the order they finish; every other
        request gets one response, in the order the requests came. Every request's last response
        carries `triton_final_response`. A failing request gets an error message; the stream goes on."""
        responses: asyncio.Queue = asyncio.Queue()
        open_work = 1  # the reader, and each request it has started
        tasks: set[asyncio.Task] = set()

        async def read() -> None:
            nonlocal open_work
            previous: asyncio.Future | None = None  # the last in-order request's turn to answer
            try:
                async for request in request_iterator:
                    open_work += 1
                    turn = None
                    if not self._decoupled(request):
                        turn = asyncio.get_running_loop().create_future()
                    work = self._stream_one(request, context, responses, previous, turn)
                    previous = turn or previous
                    task = asyncio.create_task(work)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                responses.put_nowait(_END)

        reader = asyncio.create_task(read())
        try:
            while open_work:
                response = await responses.get()
                if response is _END:
                    open_work -= 1
                else:
                    yield response
        finally:
            for task in (reader, *tasks):
                task.cancel()

    def _decoupled(self, request: Any) -> bool:
        """Whether a stream's request is a generator's, answered side by side rather than in turn: the
        reader's routing peek, before the request is counted (its own lookup then checks draining)."""
        if isinstance(request, Undecodable):
            return False
        try:
            return self.plane.model(request.model_name, request.model_version).spec.generative
        except KilnError:
            return False

    async def _stream_one(
        self,
        request: Any,
        context: Any,
        responses: asyncio.Queue,
        after: asyncio.Future | None,
        turn: asyncio.Future | None,
    ) -> None:
        """Answer one request on the stream; an in-order one (`turn` set) waits for the request
        before it (`after`) to have answered."""
        ready: list[pb.ModelStreamInferResponse] = []
        send = ready.append if turn is not None else responses.put_nowait
        try:
            if isinstance(request, Undecodable):
                self.plane.count(Call("kserve-stream"), "INVALID_ARGUMENT")
                send(pb.ModelStreamInferResponse(error_message=request.reason))
                return
            call = Call("kserve-stream", context.time_remaining(), request.model_name)
            call.request_id = request.id or call.request_id  # a stream's requests: told apart by KServe's id
            try:
                async with self.plane.counted(call):
                    async for response in self._stream_responses(request, call):
                        send(pb.ModelStreamInferResponse(infer_response=response))
            except KilnError as exc:
                _, message = status_of(exc)
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                _final(failed)
                send(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
        finally:
            if after is not None:
                await asyncio.shield(after)
            for response in ready:
                responses.put_nowait(response)
            if turn is not None:
                turn.set_result(None)
            responses.put_nowait(_END)

    async def _stream_responses(self, request: pb.ModelInferRequest, call: Call) -> AsyncIterator[Any]:
        infer = _infer_request(request)  # decoded once, whichever way it is answered
        model = self.plane.model_for(infer.model, infer.version, call)
        generate = read_request(infer.inputs, infer.parameters) if model.spec.generative else None
        if generate is None or not generate.stream:
            response = _response(await self.plane.infer(model, infer, call))
            _final(response)
            yield response
            return
        async for chunk in self.plane.generate_stream(model, generate, call):
            response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            write_outputs(response, {"text_output": bytes_tensor([chunk.text])})
            if chunk.finish_reason is None:  # said outright: Triton's clients take a response without it as final
                response.parameters["triton_final_response"].bool_param = False
            else:
                _final(response, chunk.finish_reason)
                response.parameters["prompt_tokens"].int64_param = chunk.prompt_tokens
                response.parameters["generated_tokens"].int64_param = chunk.generated_tokens
            yield response

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


_END = object()  # a unit of stream work is done


def _infer_request(request: pb.ModelInferRequest) -> InferRequest:
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=read_inputs(request),
        parameters=parameters(request.parameters),
        outputs=[o.name for o in request.outputs],
        id=request.id,
        classification={
            o.name: parameters(o.parameters)["classification"]
            for o in request.outputs
            if "classification" in o.parameters
        },
    )


def _response(result: InferResponse) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
    write_outputs(response, result.outputs)
    return response


def _final(response: pb.ModelInferResponse, finish_reason: str | None = None) -> None:
    """Mark a request's last response, as Triton's decoupled models do."""
    response.parameters["triton_final_response"].bool_param = True
    if finish_reason is not None:
        response.parameters["finish_reason"].string_param = finish_reason


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
