"""KServe v2 tensors on the wire, written once for the server (gRPC raw contents, REST's binary
extension) and kiln's client: the datatype names, and BYTES elements, each a 4-byte little-endian
length and then that many bytes."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
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


def bytes_tensor(values: list[str]) -> np.ndarray:
    """Texts as a BYTES tensor [N] (an object array of UTF-8 bytes)."""
    array = np.empty(len(values), dtype=object)
    array[:] = [v.encode("utf-8") for v in values]
    return array


def json_tensor(values: list[Any]) -> np.ndarray:
    """A JSON document per value, as a BYTES tensor [N]."""
    return bytes_tensor([json.dumps(v, ensure_ascii=False) for v in values])


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of an array (object arrays hold BYTES)."""
    if array.dtype == object:
        return "BYTES"
    return next(name for name, dtype in DTYPES.items() if np.dtype(dtype) == array.dtype)


def pack_bytes(values: Iterable[Any]) -> bytes:
    """BYTES elements, length-prefixed (a str is sent as UTF-8)."""
    items = (v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values)
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    """The BYTES elements in `raw`; what does not parse is refused, naming the tensor."""
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


def to_raw(array: np.ndarray) -> bytes:
    """A tensor's raw contents: BYTES length-prefixed, numbers in their own little-endian bytes."""
    if array.dtype == object:
        return pack_bytes(array.ravel())
    return np.ascontiguousarray(array).tobytes()


def from_raw(name: str, datatype: str, shape: tuple[int, ...], count: int, raw: bytes) -> np.ndarray:
    """A tensor of `count` elements in `shape` out of its raw contents, checked against both."""
    if datatype == "BYTES":
        values = unpack_bytes(raw, name)
        if len(values) != count:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    if datatype not in DTYPES:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r}")
    dtype = np.dtype(DTYPES[datatype])
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
