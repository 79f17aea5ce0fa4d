"""KServe v2 tensors: decoding request inputs and encoding outputs, with errors that name the tensor."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from kiln.proto import grpc_service_pb2 as pb
from kiln.runtime.errors import InvalidInput

DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
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


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
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
    if datatype == "BYTES":
        values = _parse_bytes(raw, tensor.name) if raw is not None else list(tensor.contents.bytes_contents)
        if len(values) != count:
            raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if datatype not in DTYPES:
        raise InvalidInput(f"input {tensor.name!r}: unsupported datatype {datatype!r}")
    dtype = np.dtype(DTYPES[datatype])
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {tensor.name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
                f"got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = getattr(tensor.contents, CONTENTS_FIELD.get(datatype, "fp32_contents"))
    if len(values) != count:
        raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
    return np.array(values, dtype=dtype).reshape(shape)


def _parse_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES elements on the wire: each a 4-byte little-endian length, then that many bytes."""
    values, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element of {length} bytes runs past the end of the data")
        values.append(raw[offset : offset + length])
        offset += length
    return values


def encode_outputs(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray]) -> None:
    """Outputs as raw_output_contents (BYTES length-prefixed), as tritonclient reads them."""
    for name, array in outputs.items():
        tensor = response.outputs.add(name=name, shape=list(array.shape))
        if array.dtype == object:
            tensor.datatype = "BYTES"
            response.raw_output_contents.append(
                b"".join(struct.pack("<I", len(v)) + v for v in (_as_bytes(x) for x in array.ravel()))
            )
        else:
            tensor.datatype = next(k for k, v in DTYPES.items() if np.dtype(v) == array.dtype)
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


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
