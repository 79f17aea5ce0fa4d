"""KServe v2 / Triton GRPCInferenceService over kiln models.

Text goes in as BYTES tensors and task answers come out (DESIGN.md, wire contract); clients that
tokenize themselves send INT64 `input_ids` (+ `attention_mask`, `token_type_ids`) and get the
graph's raw outputs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from kiln.runtime.errors import InvalidInput
from kiln.runtime.serve.handler import ServerState, run_model
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.status import status_of
from kiln.runtime.serve.tensors import decode_inputs, encode_outputs, parameter, texts

VERSION = "0.1.0"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# (name, datatype, shape) per task, text path
TASK_INPUTS = {
    "text-classification": [("text", "BYTES", [-1]), ("text_pair", "BYTES", [-1])],
    "token-classification": [("text", "BYTES", [-1])],
    "question-answering": [("question", "BYTES", [-1]), ("context", "BYTES", [-1])],
    "feature-extraction": [("text", "BYTES", [-1])],
    "fill-mask": [("text", "BYTES", [-1])],
    "zero-shot-classification": [("text", "BYTES", [-1]), ("candidate_labels", "BYTES", [-1])],
}
OPTIONAL_INPUTS = {"text_pair"}


def task_outputs(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    task = model.manifest.task
    if task == "text-classification":
        return [("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("logits", "FP32", [-1, len(model.manifest.labels)])]
    if task == "question-answering":
        return [("answer", "BYTES", [-1]), ("score", "FP32", [-1]), ("start", "INT64", [-1]), ("end", "INT64", [-1])]
    if task == "feature-extraction":
        return [("embedding", "FP32", [-1, -1])]
    return [("entities" if task == "token-classification" else "result", "BYTES", [-1])]


def infer_text(model: ServedModel, tensors: dict[str, np.ndarray], params: Any) -> dict[str, np.ndarray]:
    """Run a text request through the model's pipeline; returns the task's output tensors."""
    task, pipe = model.manifest.task, model.pipeline
    truncation = bool(parameter(params, "truncation", True))
    if task == "text-classification":
        batch = texts(tensors, "text")
        pairs = texts(tensors, "text_pair", required=False)
        function = parameter(params, "function_to_apply")
        logits, truncated = pipe.logits(batch, pairs, truncation)  # the model runs once; labels come from its logits
        ranked = pipe.rank(logits, truncated, top_k=None, function_to_apply=function)
        return {
            "label": _bytes([r[0]["label"] for r in ranked]),
            "score": np.array([r[0]["score"] for r in ranked], dtype=np.float32),
            "logits": logits.astype(np.float32),
        }
    if task == "token-classification":
        strategy = parameter(params, "aggregation_strategy", "none")
        return {"entities": _json(pipe(texts(tensors, "text"), aggregation_strategy=strategy, truncation=truncation))}
    if task == "question-answering":
        answers = pipe(
            texts(tensors, "question"),
            texts(tensors, "context"),
            max_answer_len=int(parameter(params, "max_answer_len", 15)),
            handle_impossible_answer=bool(parameter(params, "handle_impossible_answer", False)),
            doc_stride=parameter(params, "doc_stride"),
        )
        return {
            "answer": _bytes([a["answer"] for a in answers]),
            "score": np.array([a["score"] for a in answers], dtype=np.float32),
            "start": np.array([a["start"] for a in answers], dtype=np.int64),
            "end": np.array([a["end"] for a in answers], dtype=np.int64),
        }
    if task == "feature-extraction":
        normalize = parameter(params, "normalize")
        vectors = pipe(
            texts(tensors, "text"),
            pooling=parameter(params, "pooling"),
            normalize_embeddings=None if normalize is None else bool(normalize),
            truncation=truncation,
        )
        return {"embedding": vectors}
    if task == "fill-mask":
        targets = parameter(params, "targets")
        result = pipe(
            texts(tensors, "text"),
            top_k=int(parameter(params, "top_k", 5)),
            targets=targets.split(",") if targets else None,
        )
        return {"result": _json(result)}
    labels = texts(tensors, "candidate_labels")
    result = pipe(
        texts(tensors, "text"),
        labels,
        hypothesis_template=parameter(params, "hypothesis_template", "This example is {}."),
        multi_label=bool(parameter(params, "multi_label", False)),
    )
    return {"result": _json(result)}


class _Tokens:
    """A pre-tokenized row, shaped like a tokenizers Encoding for the batcher."""

    def __init__(self, ids: np.ndarray, type_ids: np.ndarray):
        self.ids, self.type_ids = ids, type_ids


def infer_tokens(model: ServedModel, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pre-tokenized rows through the batcher; raw graph outputs padded back to the input length."""
    ids = _int_matrix(tensors, "input_ids")
    rows, width = ids.shape
    mask = _int_matrix(tensors, "attention_mask") if "attention_mask" in tensors else np.ones_like(ids)
    types = _int_matrix(tensors, "token_type_ids") if "token_type_ids" in tensors else np.zeros_like(ids)
    for name, other in (("attention_mask", mask), ("token_type_ids", types)):
        if other.shape != ids.shape:
            raise InvalidInput(f"input {name!r} has shape {list(other.shape)}, input_ids has {list(ids.shape)}")
    if width > model.manifest.max_sequence_length:
        raise InvalidInput(
            f"input_ids has {width} tokens; the model takes at most {model.manifest.max_sequence_length}"
        )
    vocab = model.package.encoder.tokenizer.get_vocab_size(with_added_tokens=True)
    if rows == 0 or width == 0:
        raise InvalidInput("input_ids is empty")
    if ids.min() < 0 or ids.max() >= vocab:
        raise InvalidInput(f"input_ids must be token ids in [0, {vocab}); got {ids.min()}..{ids.max()}")
    lengths = np.maximum(mask.sum(axis=1), 1)
    sequences = [_Tokens(ids[i, : lengths[i]], types[i, : lengths[i]]) for i in range(rows)]
    items = model.run_sequences(sequences)
    outputs = {}
    for name in model.manifest.outputs:
        parts = [item[name] for item in items]
        if name in model.pipeline.sequence_outputs:
            padded = np.zeros((rows, width, *parts[0].shape[1:]), dtype=np.float32)
            for i, part in enumerate(parts):
                padded[i, : len(part)] = part
            outputs[name] = padded
        else:
            outputs[name] = np.stack(parts).astype(np.float32)
    return outputs


def _int_matrix(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    array = tensors[name]
    if array.dtype not in (np.int64, np.int32):
        raise InvalidInput(f"input {name!r} must be INT64 or INT32, got {array.dtype}")
    if array.ndim != 2:
        raise InvalidInput(f"input {name!r} must have shape [N, L], got {list(array.shape)}")
    return array.astype(np.int64)


def _bytes(values: list[str]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = [v.encode("utf-8") for v in values]
    return array


def _json(values: list[Any]) -> np.ndarray:
    return _bytes([json.dumps(v, ensure_ascii=False) for v in values])


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.state.draining and bool(self.state.models))

    async def ModelReady(self, request, context):
        ready = request.name in self.state.models and request.version in ("", "1") and not self.state.draining
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kiln", version=VERSION, extensions=["model_configuration", "statistics"])

    async def ModelMetadata(self, request, context):
        model = await self._model(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        inputs = [tensor(name=n, datatype=d, shape=s) for n, d, s in TASK_INPUTS[model.manifest.task]]
        inputs += [tensor(name=n, datatype="INT64", shape=[-1, -1]) for n in model.manifest.inputs]
        outputs = [tensor(name=n, datatype=d, shape=s) for n, d, s in task_outputs(model)]
        outputs += [
            tensor(name=n, datatype="FP32", shape=[-1, -1])
            for n in model.manifest.outputs
            if n not in {o.name for o in outputs}
        ]
        return pb.ModelMetadataResponse(
            name=model.name, versions=["1"], platform="onnxruntime_onnx", inputs=inputs, outputs=outputs
        )

    async def ModelConfig(self, request, context):
        model = await self._model(request.name, request.version, context)
        types = {"BYTES": pb.TYPE_STRING, "FP32": pb.TYPE_FP32, "INT64": pb.TYPE_INT64}
        inputs = [
            pb.ModelInput(name=n, data_type=types[d], dims=s, optional=n in OPTIONAL_INPUTS)
            for n, d, s in TASK_INPUTS[model.manifest.task]
        ]
        inputs += [
            pb.ModelInput(name=n, data_type=pb.TYPE_INT64, dims=[-1, -1], optional=True) for n in model.manifest.inputs
        ]
        outputs = [pb.ModelOutput(name=n, data_type=types[d], dims=s) for n, d, s in task_outputs(model)]
        options = model.batcher.options
        config = pb.ModelConfig(
            name=model.name,
            platform="onnxruntime_onnx",
            backend="kiln",
            max_batch_size=0,
            input=inputs,
            output=outputs,
            dynamic_batching=pb.ModelDynamicBatching(
                preferred_batch_size=[options.max_size], max_queue_delay_microseconds=int(options.max_delay * 1e6)
            ),
            parameters={
                "task": pb.ModelParameter(string_value=model.manifest.task),
                "precision": pb.ModelParameter(string_value=model.manifest.precision),
                "max_batch_tokens": pb.ModelParameter(string_value=str(options.max_tokens)),
                "max_sequence_length": pb.ModelParameter(string_value=str(model.manifest.max_sequence_length)),
            },
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        if request.name:
            models = [await self._model(request.name, request.version, context)]
        else:
            models = list(self.state.models.values())
        return pb.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    async def ModelInfer(self, request, context):
        try:
            tensors = decode_inputs(request)
        except InvalidInput as exc:
            await context.abort(*status_of(exc))
        requested = [o.name for o in request.outputs]
        model = await self._model(request.model_name, request.model_version, context)
        if any(name in tensors for name in TOKEN_INPUTS):
            rows = len(tensors.get("input_ids", []))

            def work(m: ServedModel) -> dict[str, np.ndarray]:
                return infer_tokens(m, tensors)
        else:
            rows = len(tensors.get(TASK_INPUTS[model.manifest.task][0][0], []))

            def work(m: ServedModel) -> dict[str, np.ndarray]:
                return infer_text(m, tensors, request.parameters)

        outputs = await run_model(self.state, context, model.name, request.model_version, "kserve", work, count=rows)
        response = pb.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
        try:
            encode_outputs(response, outputs, requested)
        except InvalidInput as exc:
            await context.abort(*status_of(exc))
        return response

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                response = await self.ModelInfer(request, _StreamContext(context))
                yield pb.ModelStreamInferResponse(infer_response=response)
            except _Aborted as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)

    async def _model(self, name: str, version: str, context) -> ServedModel:
        try:
            return self.state.model(name, version)
        except Exception as exc:
            await context.abort(*status_of(exc))


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _StreamContext:
    """A stream's per-message context: an abort answers that message, not the whole stream."""

    def __init__(self, context):
        self._context = context

    async def abort(self, code, message=""):
        raise _Aborted(code, message)

    def time_remaining(self):
        return self._context.time_remaining()


def _statistics(model: ServedModel) -> pb.ModelStatistics:
    s = model.stats

    def d(duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=duration.count, ns=duration.ns)

    with s.lock:
        return pb.ModelStatistics(
            name=model.name,
            version="1",
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=d(s.success),
                fail=d(s.fail),
                queue=d(s.queue),
                compute_input=d(s.compute_input),
                compute_infer=d(s.compute_infer),
                compute_output=d(s.compute_output),
            ),
            batch_stats=[
                pb.InferBatchStatistics(batch_size=size, compute_infer=d(dur))
                for size, dur in sorted(s.batches.items())
            ],
        )
