"""Fuzzing that stays: property tests over request decoding, parameters and manifest loading. Whatever
arrives, the only failure is kiln's own error naming the problem (InvalidInput for a request,
PackageError for a package) — never a stray exception that would become INTERNAL or a traceback.
A fixed budget and a fixed seed keep `make test` fast and repeatable."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiln.proto import grpc_service_pb2 as pb
from kiln.runtime.errors import InvalidInput, PackageError
from kiln.runtime.manifest import read_manifest
from kiln.runtime.serve.http import read_infer_request
from kiln.runtime.serve.tensors import read_inputs
from kiln.runtime.tasks import SPECS

# KILN_FUZZ_EXAMPLES=20000 for a long hunt; the default keeps the suite fast
BUDGET = settings(
    max_examples=int(os.environ.get("KILN_FUZZ_EXAMPLES", 300)),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
shapes = st.lists(st.integers(min_value=-2, max_value=1 << 33), max_size=3)
datatypes = st.sampled_from(["BYTES", "FP32", "INT64", "INT32", "BOOL", "FP16", "UINT8", "NOPE", ""])


@BUDGET
@given(
    inputs=st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["text", "input_ids", "x"]), "datatype": datatypes, "shape": shapes},
            optional={"data": json_values, "parameters": json_values},
        ),
        max_size=3,
    ),
    extra=st.dictionaries(st.sampled_from(["parameters", "outputs", "id"]), json_values, max_size=3),
    binary=st.binary(max_size=64),
)
def test_http_request_decoding(inputs, extra, binary):
    with contextlib.suppress(InvalidInput):
        read_infer_request("m", "", {"inputs": inputs, **extra}, binary)


@BUDGET
@given(st.binary(max_size=256))
def test_grpc_request_decoding(raw):
    try:
        request = pb.ModelInferRequest.FromString(raw)
    except Exception:  # not a message at all: the lenient decoder turns this into INVALID_ARGUMENT
        return
    with contextlib.suppress(InvalidInput):
        read_inputs(request)


@BUDGET
@given(
    tensor=st.fixed_dictionaries({"name": st.just("text"), "datatype": datatypes, "shape": shapes}),
    raw=st.binary(max_size=64),
)
def test_grpc_tensor_decoding(tensor, raw):
    request = pb.ModelInferRequest()
    try:
        request.inputs.add(**tensor)
    except ValueError:  # protobuf itself refuses the shape (out of int64)
        return
    request.raw_input_contents.append(raw)
    with contextlib.suppress(InvalidInput):
        read_inputs(request)


@BUDGET
@given(task=st.sampled_from(sorted(SPECS)), raw=st.dictionaries(st.text(max_size=24), json_values, max_size=4))
def test_parameters(task, raw):
    spec = SPECS[task]
    raw.update({p.name: v for p, v in zip(spec.parameters, raw.values(), strict=False)})  # hit the real names too
    with contextlib.suppress(InvalidInput):
        spec.parse_params(raw)


@BUDGET
@given(st.dictionaries(st.sampled_from(["format_version", "task", "precision", "inputs", "outputs",
                                        "max_sequence_length", "labels", "files", "pooling", "max_batch_size",
                                        "target", "extra"]), json_values, max_size=8))  # fmt: skip
def test_manifest_loading(data):
    data.setdefault("format_version", 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kiln.json").write_text(json.dumps(data))
        with contextlib.suppress(PackageError):
            read_manifest(Path(tmp))
