"""KServe v2 tensors: decoding request inputs and encoding outputs, with errors that name the tensor."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.proto import grpc_service_pb2 as pb
from kiln.runtime.errors import InvalidInput
from kiln.runtime.wire import DTYPES, datatype_of, from_raw, to_raw

MAX_ELEMENTS = 1 << 28  # elements in one input tensor; far beyond any message size a server accepts
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def read_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    tensors = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} given twice")
        tensors[tensor.name] = decode_tensor(tensor, raw[index] if raw else None)
    return tensors


def element_count(name: str, shape: tuple[int, ...]) -> int:
    """Elements a shape holds, refusing what no request can carry (no numpy overflow)."""
    if not shape:
        raise InvalidInput(f"input {name!r} has a scalar shape []; give it at least one dimension, e.g. [1]")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: negative dimension in shape {list(shape)}")
    count = 1
    for dim in shape:
        count *= dim
    if count > MAX_ELEMENTS:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements; the limit is {MAX_ELEMENTS}")
    return count


def decode_tensor(tensor: Any, raw: bytes | None) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.shape)
    count = element_count(tensor.name, shape)
    datatype = tensor.datatype
    if raw is not None:
        return from_raw(tensor.name, datatype, shape, count, raw)
    if datatype == "BYTES":
        values = list(tensor.contents.bytes_contents)
        if len(values) != count:
            raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if datatype not in DTYPES:
        raise InvalidInput(f"input {tensor.name!r}: unsupported datatype {datatype!r}")
    dtype = np.dtype(DTYPES[datatype])
    values = getattr(tensor.contents, CONTENTS_FIELD.get(datatype, "fp32_contents"))
    if len(values) != count:
        raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
    return np.array(values, dtype=dtype).reshape(shape)


def write_outputs(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray]) -> None:
    """Outputs as raw_output_contents (BYTES length-prefixed), as tritonclient reads them."""
    for name, array in outputs.items():
        response.outputs.add(name=name, shape=list(array.shape), datatype=datatype_of(array))
        response.raw_output_contents.append(to_raw(array))


def parameters(params: Any) -> dict[str, Any]:
    """A protobuf parameter map (InferParameter values) as plain Python values."""
    out = {}
    for name, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        out[name] = getattr(value, kind) if kind else None
    return out


def classification(array: np.ndarray, count: Any, labels: list[str], name: str) -> np.ndarray:
    """Triton's classification extension (an output's `classification` parameter, tritonclient's
    `class_count`): the `count` highest values of each row of a [N, C] output as BYTES strings
    "value:index:label" (the label where the model has one per column), best first."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidInput(f"output {name!r}: 'classification' must be a positive integer, got {count!r}")
    if array.ndim != 2 or array.dtype.kind != "f":
        raise InvalidInput(
            f"output {name!r}: 'classification' needs a [N, classes] float output, this one is {array.dtype} "
            f"{list(array.shape)}"
        )
    named = labels if len(labels) == array.shape[1] else None
    order = np.argsort(-array, axis=1, kind="stable")[:, : min(count, array.shape[1])]
    rows = [
        [f"{row[i]:f}:{i}" + (f":{named[i]}" if named else "") for i in indices]
        for row, indices in zip(array, order, strict=True)
    ]
    return np.array([[text.encode() for text in row] for row in rows], dtype=object)
