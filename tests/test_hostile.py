"""Hostile input and overload, as an attacker would try them (issue 15's regression corpus): each
fails alone with a status that blames the right side, and the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import struct

import grpc
import numpy as np
import pytest
from conftest import run_kiln
from kiln.runtime.client import KilnClient
from kiln.runtime.errors import PackageError
from servers import LAYOUTS, burst, metric, running_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

TEXTS = ["Alice lives in Seoul.", "The central bank raised rates."]


@pytest.fixture(scope="module", **LAYOUTS)
def server(exported, request):
    flags = ("--max-queue-delay-ms", "30", "--frontends", request.param)
    with running_server(*flags, models={"cls": exported("bert", "text-classification")}) as running:
        yield running


def _infer(address: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def _text_request(texts: list[str], shape: list[int] | None = None, **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="cls")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)] if shape is None else shape)
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts))
    for name, value in params.items():
        if isinstance(value, str):
            request.parameters[name].string_param = value
    return request


def _token_request(ids, types) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="cls")
    for name, array in (("input_ids", ids), ("token_type_ids", types)):
        array = np.asarray(array, dtype=np.int64)
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def test_a_bad_request_fails_alone_among_batch_mates(server):
    """12 good requests and one with token_type_ids out of range, sent together to a batching model."""
    good = [_token_request([[101, 7592 % 300 + 5, 102]], [[0, 0, 0]]) for _ in range(12)]
    bad = _token_request([[101, 20, 102]], [[0, 5, 0]])
    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        futures = [pool.submit(_infer, server.address, r) for r in [*good, bad]]
        answers = [f.result().outputs[0].name for f in futures[:12]]
        with pytest.raises(grpc.RpcError) as failure:
            futures[12].result()
    assert answers == ["logits"] * 12
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_type_ids must be in [0, 2)" in failure.value.details()


@pytest.mark.parametrize(
    ("request_of", "needle"),
    [
        (lambda: _text_request(["x"], shape=[]), "scalar shape []"),
        (lambda: _text_request(["x"], shape=[1 << 40, 1 << 40]), "elements; the limit is"),
        (lambda: _text_request(["x"], truncation="false"), "'truncation' must be a boolean, got str 'false'"),
        (lambda: _token_request([[101, 5, 102]], [[0, 99, 0]]), "token_type_ids must be in [0, 2)"),
    ],
)
def test_client_mistakes_are_invalid_argument(server, request_of, needle):
    with pytest.raises(grpc.RpcError) as failure:
        _infer(server.address, request_of())
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in failure.value.details()


def test_an_undecodable_message_is_invalid_argument_and_a_stream_goes_on(server):
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as failure:
            raw(b"\xff\xff\xff garbage", timeout=10)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = _text_request(TEXTS).SerializeToString()
        replies = [
            pb.ModelStreamInferResponse.FromString(r)
            for r in stream(iter([good, b"\xff\xff garbage", good]), timeout=30)
        ]
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    assert "not a valid protobuf message" in replies[1].error_message


def test_metric_labels_come_only_from_served_models(server):
    with KilnClient(server.address) as client:
        for i in range(50):
            with pytest.raises(grpc.RpcError):
                client.classify(f"made-up-{i}\x07", TEXTS)
    page = __import__("urllib.request").request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert "made-up" not in page
    assert metric(server.metrics_url, "kiln_requests_total", model="(unknown)", code="NOT_FOUND") == 50


def test_the_queue_bound_bounds_everything_accepted(exported):
    from kiln.proto import kiln_pb2, kiln_pb2_grpc

    # a batch waits 5 s for company, so the whole burst arrives while the first 8 are held (with 300 ms,
    # a slow CI machine spread the burst over five windows and 40 were taken; with 2 s, a machine busy
    # with other builds spread it over four and 30 were)
    flags = ("--max-queue", "8", "--max-queue-delay-ms", "5000")
    with (
        running_server(*flags, models={"cls": exported("bert", "text-classification")}) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        stub = kiln_pb2_grpc.KilnStub(channel)
        request = kiln_pb2.ClassifyRequest(model="cls", texts=TEXTS[:1])
        codes = burst(running.address, "Classify", [request] * 64, timeout=30)  # each one text: at most 8 held
        assert codes.count("RESOURCE_EXHAUSTED") >= 40 and 1 <= codes.count("OK") <= 24, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        with pytest.raises(grpc.RpcError) as failure:  # more than the server could ever take: not retryable
            stub.Classify(kiln_pb2.ClassifyRequest(model="cls", texts=TEXTS * 10), timeout=30)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes at most 8 in one request" in failure.value.details()
        assert stub.Classify(kiln_pb2.ClassifyRequest(model="cls", texts=TEXTS), timeout=30).results


# ---- packages that are not what they claim ---------------------------------------------------------


def _broken(exported, tmp_path, change) -> str:
    package = tmp_path / "pkg"
    shutil.copytree(exported("bert", "text-classification"), package)
    manifest = json.loads((package / "kiln.json").read_text())
    change(package, manifest)
    (package / "kiln.json").write_text(json.dumps(manifest))
    return str(package)


def _rewrite(package, manifest, name: str, text: str) -> None:
    """A file changed and its hash updated to match: only loading it can tell."""
    from kiln.runtime.manifest import sha256_file

    (package / name).write_text(text)
    manifest["files"][name] = sha256_file(package / name)


def _link_outside(package, manifest):
    secret = package.parent / "elsewhere.onnx"
    shutil.move(package / "model.onnx", secret)
    os.symlink(secret, package / "model.onnx")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda p, m: m.update(max_sequence_length="256x"), "field max_sequence_length"),
        (lambda p, m: m.update(max_sequence_length=-5), "field max_sequence_length"),
        (lambda p, m: m.update(max_batch_size="1"), "field max_batch_size"),
        (lambda p, m: m.update(files=["model.onnx"]), "field files"),
        (lambda p, m: m.update(labels="abcd"), "field labels"),
        (lambda p, m: m.update(labels=[]), "has 0 labels"),
        (lambda p, m: m.update(outputs=["nope"]), "names outputs ['nope']"),
        (lambda p, m: m.update(surprise=1), "field surprise"),
        (lambda p, m: m["files"].update({"../../x": "0" * 64}), "not a plain name"),
        (lambda p, m: m["files"].update({"/proc/self/environ": "0" * 64}), "not a plain name"),
        (lambda p, m: _rewrite(p, m, "tokenizer.json", "{broken"), "tokenizer.json cannot be loaded"),
        (_link_outside, "leads outside the package"),
    ],
)
def test_a_broken_manifest_is_refused_with_exit_8(exported, tmp_path, change, needle):
    package = _broken(exported, tmp_path, change)
    result = run_kiln("predict", package, "hello")
    assert result.returncode == PackageError.exit_code, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
